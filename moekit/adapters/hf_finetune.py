"""Fine-tuning a local transformers causal LM with adapters through moekit's trainer (``moekit finetune --hf``).

Dim legend: B batch, S sequence, V vocabulary.

The trainer trains anything behind moekit's language-model interface, ``model(x_BS, ctx) -> (logits_BSV, ctx)``
with a ``config`` that is a :class:`~moekit.models.ModelConfig`. :class:`HFCausalLM` puts a transformers
``*ForCausalLM`` behind it; its ``config`` records the transformers model's shape (vocabulary, width, layers,
heads) and the training context, which the data pipeline and the parameter/FLOP counts read. The weights are the
transformers folder's; nothing is downloaded (``local_files_only``).

Tokens: the folder's own tokenizer when it has one (``tokenizer.json`` or ``tokenizer_config.json``), else byte
ids, which need ``vocab_size >= 256``. The run folder is a normal one plus the adapter file and
:func:`~moekit.training.checkpoint.hf_base_path` (the folder's path and its transformers config), so
``load_run`` (``moekit eval`` / ``moekit sample``) rebuilds the model from the recorded config without reading
the folder's weights again: the checkpoint holds the whole adapted model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..configs import ConfigError
from ..models import ModelConfig
from ..types import RoutingContext
from .api import Adapters
from .finetune import Companion, FinetuneResult, apply_all

__all__ = ["HFCausalLM", "finetune_hf", "hf_model_config", "load_hf_causal_lm", "model_from_record"]

DEFAULT_CONTEXT = 128
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class HFCausalLM(nn.Module):
    """A transformers causal LM behind moekit's ``model(x_BS, ctx) -> (logits_BSV, ctx)`` interface.

    ``hf`` is the transformers model (``generate`` works on it, adapters included); ``config`` is the
    :class:`ModelConfig` describing its shape and the training context. Decoding goes through moekit's
    ``generate`` without a KV cache (``supports_kv_cache = False``): each step re-runs the window.
    """

    supports_kv_cache = False

    def __init__(self, hf: nn.Module, config: ModelConfig) -> None:
        super().__init__()
        self.hf, self.config = hf, config

    def forward(self, idx_BS: torch.Tensor, ctx: RoutingContext | None = None) -> tuple[torch.Tensor, RoutingContext]:
        ctx = ctx if ctx is not None else RoutingContext()
        logits_BSV = self.hf(input_ids=idx_BS, use_cache=False).logits
        return logits_BSV, ctx


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("finetune --hf needs transformers; pip install 'moekit[hf]'") from None
    return transformers


def _hf_config(path: Path):
    """The transformers config of a causal-LM folder, or a ConfigError saying what the folder is not."""
    tf = _transformers()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ConfigError(f"--hf {str(path)!r} is not a transformers model folder (no config.json); give a folder "
                          f"written by model.save_pretrained(...)")
    try:
        hc = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001  (transformers raises many kinds; all mean "not a model folder")
        raise ConfigError(f"--hf {str(path)!r}: its config.json is not a transformers config ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); give a folder written by save_pretrained") from None
    saved = list(getattr(hc, "architectures", None) or [])
    if saved and not any("CausalLM" in a or "LMHead" in a for a in saved):
        raise ConfigError(f"--hf {str(path)!r} holds a {saved[0]} (a {hc.model_type!r} model without a causal-LM "
                          f"head); finetune --hf trains causal language models (Llama, Qwen, Mixtral, ...). Encoders "
                          f"such as BERT take adapters through the library: moekit.adapters.apply(model, ...)")
    if type(hc) not in tf.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(f"--hf {str(path)!r} holds a {hc.model_type!r} model, which has no causal-LM class in "
                          f"transformers; finetune --hf trains causal language models (Llama, Qwen, Mixtral, ...). "
                          f"Encoders such as BERT take adapters through the library: moekit.adapters.apply(model, ...)")
    return hc


def hf_model_config(hc: Any, context: int) -> ModelConfig:
    """The :class:`ModelConfig` that describes a transformers config's shape, with the training ``context``."""
    dim, heads = int(hc.hidden_size), int(getattr(hc, "num_attention_heads", 1) or 1)
    if dim % heads or (dim // heads) % 2:  # ModelConfig wants an even head dim; it only describes the shape here
        heads = next((h for h in range(heads, 0, -1) if dim % h == 0 and (dim // h) % 2 == 0), 0)
        if not heads:
            raise ConfigError(f"the transformers model's hidden_size={dim} is odd; finetune --hf needs an even width")
    limit = getattr(hc, "max_position_embeddings", None)
    if limit is not None and context > int(limit):
        raise ConfigError(f"model.context={context} exceeds the transformers model's max_position_embeddings="
                          f"{limit}; use --model.context={limit} or less")
    return ModelConfig(vocab_size=int(hc.vocab_size), dim=dim, num_layers=int(hc.num_hidden_layers), num_heads=heads,
                       context=context, tie_embeddings=bool(getattr(hc, "tie_word_embeddings", False)))


def load_hf_causal_lm(path: str | Path) -> nn.Module:
    """The transformers causal LM saved in ``path`` (float32, local files only)."""
    path = Path(path)
    _hf_config(path)
    tf = _transformers()
    return tf.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)


def model_from_record(record: dict[str, Any], config: ModelConfig) -> HFCausalLM:
    """An :class:`HFCausalLM` of the recorded transformers config, randomly initialised (a checkpoint fills it)."""
    tf = _transformers()
    hf_cfg = dict(record["config"])
    hc = tf.AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    return HFCausalLM(tf.AutoModelForCausalLM.from_config(hc, dtype=torch.float32), config)


def finetune_hf(path: str | Path, out_dir: str | Path, method: str, *, targets: list[str] | None = None,
                options: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None, resume: bool = False,
                progress: bool = True, companions: list[Companion] | None = None) -> FinetuneResult:
    """Train ``method`` adapters on the frozen transformers causal LM in folder ``path`` into run folder ``out_dir``.

    Args:
        targets, options: as for :func:`moekit.adapters.apply`; module names are those of :class:`HFCausalLM`
            (``hf.model.layers.0.self_attn.q_proj``), so suffixes such as ``q_proj`` are the usual choice.
        overrides: dotted ``train.*`` / ``data.*`` overrides of the ``dense`` preset's training and data settings,
            and ``model.context`` (default ``min(128, max_position_embeddings)``).
        companions: further ``(method, targets, options)`` applied after ``method`` on other modules.
    """
    from ..recipes import load_preset
    from ..training import train, with_overrides
    from ..training.checkpoint import adapters_path, hf_base_path, read_json, write_json
    from ..training.runs import read_run_config
    path, out_dir = Path(path).resolve(), Path(out_dir)
    options, overrides = dict(options or {}), dict(overrides or {})
    wrong = [k for k in overrides if not k.startswith(("train.", "data.")) and k != "model.context"]
    if wrong:
        raise ConfigError(f"finetune --hf keeps the transformers model; only train.*, data.* and model.context can "
                          f"be overridden, not {wrong}")
    hc = _hf_config(path)
    has_tokenizer = any((path / name).is_file() for name in _TOKENIZER_FILES)
    if resume:
        record = read_json(hf_base_path(out_dir)) if hf_base_path(out_dir).is_file() else None
        if record is None or record.get("path") != str(path):
            raise ConfigError(f"{out_dir} is not a finetune --hf run of {str(path)!r} (its {hf_base_path(out_dir).name}"
                              f" names {None if record is None else record.get('path')!r}); resume with the same --hf")
        cfg = with_overrides(read_run_config(out_dir), overrides)
    else:
        if not has_tokenizer and int(hc.vocab_size) < 256:
            raise ConfigError(f"--hf {str(path)!r} has no tokenizer and vocab_size={hc.vocab_size}; byte ids need "
                              f"vocab_size >= 256: save a tokenizer into the folder (tokenizer.save_pretrained) or use "
                              f"a model with at least 256 tokens")
        limit = getattr(hc, "max_position_embeddings", None) or DEFAULT_CONTEXT
        context = int(overrides.pop("model.context", min(DEFAULT_CONTEXT, int(limit))))
        base = load_preset("dense")
        cfg = dataclasses.replace(base, name="hf-finetune", description=f"{method} adapters on {path.name}",
                                  model=hf_model_config(hc, context))
        cfg = with_overrides(cfg, {"data.tokenizer": str(path) if has_tokenizer else "bytes", **overrides})
    record = {"path": str(path), "config": hc.to_dict()}
    tf = _transformers()
    with torch.device("meta"):  # every adapter check (method, options, targets, ranks) before anything is written
        probe = apply_all(HFCausalLM(tf.AutoModelForCausalLM.from_config(hc), cfg.model), method, targets, options,
                          companions)
    if probe.num_trainable() == 0:
        raise ConfigError(f"nothing to train: {method} with {options} on {probe.names} has no trainable parameter")
    if not resume and adapters_path(out_dir).exists():
        raise ConfigError(f"{out_dir} already holds a fine-tuning run; pass --resume or choose another --out")
    holder: dict[str, Adapters] = {}

    def build(config: ModelConfig) -> nn.Module:
        return HFCausalLM(load_hf_causal_lm(path), config)

    def prepare(model: nn.Module) -> None:
        handle = apply_all(model, method, targets, options, companions)
        holder["adapters"] = handle
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_json(hf_base_path(out_dir), record)
            handle.save(adapters_path(out_dir))

    result = train(cfg, out_dir, resume=resume, progress=progress, prepare_model=prepare, build_model=build)
    handle = holder["adapters"]
    handle.save(adapters_path(out_dir))
    return FinetuneResult(result, handle.method, handle.num_trainable(), adapters_path(out_dir))
