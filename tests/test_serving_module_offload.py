"""Offloading a model already in memory: a patched transformers model and a moekit model give the same bits as
their resident selves (reference engine), under tight budgets, and the experts file is the only copy."""

import copy
import dataclasses

import pytest
import torch

from moekit.layers import MoE
from moekit.serving.module_offload import offload_module


def _reference(model):
    for m in model.modules():
        if isinstance(m, MoE):
            m.config = dataclasses.replace(m.config, engine="reference")
    return model


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_patched_transformers_model_offloaded_gives_the_same_bits_and_tokens(tmp_path, arch):
    pytest.importorskip("transformers")
    import moekit.hf as mh
    from moekit.hf.tiny import tiny_model

    resident = _reference(mh.patch(tiny_model(arch, num_layers=3), engine="reference"))
    model = copy.deepcopy(resident)
    off = offload_module(model, tmp_path / "experts.safetensors", "25%", "lfu", prefetch="router")
    assert not any(".experts.w_" in n for n, _ in model.named_parameters())
    ids = torch.randint(2, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, resident(ids).logits)
    assert off.cache.stats.misses > 0 and off.cache.used_bytes <= off.cache.capacity_bytes
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids[:1], **kw), resident.generate(ids[:1], **kw))


def test_moekit_model_in_memory_offloaded_and_bad_input(tmp_path):
    from .serving_util import make_run
    from moekit.training import load_run

    _, resident, _ = load_run(make_run(tmp_path / "run"), "cpu")
    _reference(resident)
    model = copy.deepcopy(resident)
    offload_module(model, tmp_path / "e.safetensors", "12.5%", asynchronous=True, prefetch="router")
    tokens = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], resident(tokens)[0])
    with pytest.raises(ValueError, match="no MoE layer"):
        offload_module(torch.nn.Linear(3, 3), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not a folder"):
        offload_module(copy.deepcopy(resident), tmp_path / "missing" / "x.safetensors")
    with pytest.raises(ValueError, match="smaller than one expert"):
        offload_module(copy.deepcopy(resident), tmp_path / "y.safetensors", 10)
    assert not (tmp_path / "y.safetensors").exists()  # nothing written on a bad budget
