"""The shipped studies of issue 17 plan in both modes, and every arm builds the model it claims to compare."""

import pytest
import torch

from moekit.compare import load_study, plan_study
from moekit.models import LanguageModel


@pytest.mark.parametrize("name,expect", [
    ("switchhead", {"switchhead": "switchhead", "switchhead-narrow": "switchhead", "dense-attention": "dense"}),
    ("mom", {"mom": "mom", "single-memory": "mom"}),
    ("routing-transformer", {"full": "dense", "local": "routing", "routing": "routing"}),
    ("drllm", {"all-layers": "dense", "drllm": "dense", "drllm-routers": "dense"}),
    ("moma", {"dense": "dense", "mixed-moe": "dense", "moma": "dense"}),
])
def test_study_plans_and_builds_its_arms(name, expect):
    for quick in (False, True):
        study = load_study(name, quick=quick)
        assert len(study.seeds) >= (2 if quick else 3)
        for spec in plan_study(study):
            model_cfg = spec.config.model
            assert model_cfg.attention == expect[spec.arm], spec.arm
            with torch.device("meta"):
                model = LanguageModel(model_cfg)
            if spec.arm == "single-memory":
                assert model.layers[0].attn.num_states == 1
            if spec.arm == "local":
                assert model.layers[0].attn.config.local_heads == model_cfg.num_heads
            if spec.arm in ("drllm", "drllm-routers"):
                assert model.depth_router is not None
                stage = "routers" if spec.arm == "drllm-routers" else "joint"
                assert model_cfg.depth_routing["stage"] == stage and (spec.init_from is not None) == (stage == "routers")
            if name == "moma":  # every arm reads the multimodal data; only the MoMa arm groups experts by modality
                assert spec.config.data.source == "multimodal" and model_cfg.vocab_size == 320
                groups = {"dense": None, "mixed-moe": 1, "moma": 2}[spec.arm]
                assert any(b.is_sparse for b in model.layers) == (groups is not None)
                if groups:
                    assert model.layers[0].ffn.num_modalities == groups
