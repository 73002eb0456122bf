"""Patch a loaded transformers model in place: every sparse-MoE block becomes a moekit :class:`~moekit.MoE`
holding the same weights, behind a thin module that keeps the block's calling convention.

Dim legend: B batch, S sequence, T = B*S tokens, D model dim, E experts, K experts per token.

What transformers still sees after :func:`patch`:

- the block's return value (a tensor, or ``(hidden, router_scores_TK)`` for GPT-OSS);
- the router logits: transformers 5 records them with a forward hook on its router class (``OutputRecorder``)
  and computes the load-balancing loss from them when ``output_router_logits=True``. The patched block sends
  moekit's logits through a small identity module, :class:`RouterLogits`, on which the same hook is installed,
  so ``aux_loss`` is unchanged.

Everything else (generation, caches, ``loss.backward()``, ``save_pretrained`` after :func:`unpatch`) goes on
through transformers' own API. Routing statistics: ``with routing_context(model) as ctx: model(...)``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ..layers import MoE
from ..types import RoutingContext
from .adapter import ADAPTERS, Adapter, ConversionError, adapter_for, convert_block, export_block

__all__ = ["patch", "unpatch", "to_moekit", "from_moekit", "routing_context", "PatchedMoEBlock", "RouterLogits",
           "find_blocks"]


class RouterLogits(nn.Module):
    """Identity on the router logits ``[T, E]``: the place where transformers' output recorder hooks in."""

    def forward(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return logits_TE


class PatchedMoEBlock(nn.Module):
    """A moekit :class:`MoE` standing where a transformers sparse-MoE block stood.

    Attributes:
        moe: the layer (its parameters are views of the original block's storage).
        ctx: when set (see :func:`routing_context`), the layer records its losses and statistics there.
    """

    def __init__(self, moe: MoE, adapter: Adapter, hf_block_class: type, hf_config) -> None:
        super().__init__()
        self.moe = moe
        self.router_logits = RouterLogits()
        self.adapter_name = adapter.block_class
        self.returns_scores = adapter.returns_scores
        self.hf_block_class, self.hf_config = hf_block_class, hf_config
        self.ctx: RoutingContext | None = None

    def forward(self, hidden_states: torch.Tensor):
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        num_sequences = hidden_states.shape[0] if hidden_states.dim() == 3 else 1
        routing = self.moe.route(x_TD, self.ctx, num_sequences)
        self.router_logits(routing.logits_TE)
        y = self.moe.combine(x_TD, routing, self.ctx).view(hidden_states.shape)
        return (y, routing.weights_TK.to(y.dtype)) if self.returns_scores else y

    def extra_repr(self) -> str:
        return f"replaces={self.hf_block_class.__name__}"


def find_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module, Adapter]]:
    """``(qualified name, block, adapter)`` for every transformers sparse-MoE block that moekit can convert."""
    for name, module in model.named_modules():
        adapter = adapter_for(module)
        if adapter is not None:
            yield name, module, adapter


def _check_transformers() -> None:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise RuntimeError(f"moekit.hf needs transformers >= 5 (stacked expert weights); found "
                           f"{transformers.__version__}. Upgrade with: pip install -U 'transformers>=5'")


def _install_logit_hooks(model: nn.Module, taps: list[RouterLogits]) -> None:
    """Make transformers' output recorder see the patched blocks' router logits as ``router_logits``."""
    try:
        from transformers.utils.output_capturing import install_output_capuring_hook, maybe_install_capturing_hooks
    except ImportError:  # pragma: no cover - depends on the transformers version
        warnings.warn("this transformers version has no output recorder; output_router_logits will not see "
                      "the patched blocks' logits", stacklevel=3)
        return
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        maybe_install_capturing_hooks(model)  # hook the untouched modules now, as transformers would lazily
    for tap in taps:
        install_output_capuring_hook(tap, "router_logits", 0)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def patch(model: nn.Module, engine: str = "auto", *, copy: bool = False, verify: bool = True) -> nn.Module:
    """Replace every sparse-MoE block of a transformers model, in place, by a moekit layer on the same weights.

    Args:
        model: a loaded transformers model (any head) of a supported architecture.
        engine: moekit engine for the experts (``auto``, ``reference``, ``sorted``, ``grouped_mm``).
        copy: give the moekit layers their own contiguous weights instead of views of the checkpoint's. Only
            worth it where a view's layout slows an engine down or rules it out: GPT-OSS's interleaved
            gate/up views cannot feed CUDA ``grouped_mm`` (``auto`` then falls back to ``sorted``).
        verify: check each block's conversion round trip (see :func:`moekit.hf.adapter.convert_block`).

    Returns:
        ``model`` itself. Create the optimizer after patching: packed HF parameters (``gate_up_proj``) are
        replaced by moekit parameters that view the same storage.

    Raises:
        ValueError: the model has no block moekit knows (the message lists the supported block classes).
        ConversionError: a block's weights cannot be mapped without loss.
    """
    _check_transformers()
    blocks = list(find_blocks(model))
    if not blocks:
        if any(isinstance(m, PatchedMoEBlock) for m in model.modules()):
            return model
        raise ValueError(f"no sparse-MoE block found in {type(model).__name__}; supported block classes: "
                         f"{sorted(ADAPTERS)}")
    taps = []
    for name, block, adapter in blocks:
        moe = convert_block(block, adapter, name=name, engine=engine, copy=copy, verify=verify)
        patched = PatchedMoEBlock(moe, adapter, type(block), getattr(block.experts, "config", None))
        patched.train(block.training)
        _replace(model, name, patched)
        taps.append(patched.router_logits)
    _install_logit_hooks(model, taps)
    return model


def _rebuild_block(patched: PatchedMoEBlock) -> nn.Module:
    """A transformers block of the original class holding the moekit layer's weights."""
    if patched.hf_config is None:
        raise ConversionError(f"cannot rebuild {patched.hf_block_class.__name__}: its config was not recorded")
    with torch.device("meta"):
        block = patched.hf_block_class(patched.hf_config)
    tensors = export_block(patched.moe, block, ADAPTERS[patched.adapter_name])
    trainable = {n: p.requires_grad for n, p in block.named_parameters()}
    block.load_state_dict(tensors, assign=True)
    for n, p in block.named_parameters():
        p.requires_grad_(trainable[n])
    left = [n for n, t in [*block.named_parameters(), *block.named_buffers()] if t.is_meta]
    if left:
        raise ConversionError(f"rebuilt {type(block).__name__} has tensors no layer provided: {left}")
    return block.train(patched.training)


def unpatch(model: nn.Module) -> nn.Module:
    """Put transformers blocks back (with the moekit layers' current weights), e.g. before ``save_pretrained``.

    Tensors whose layout is the same on both sides are shared; packed ones (``gate_up_proj``) are copies.
    """
    patched = [(n, m) for n, m in model.named_modules() if isinstance(m, PatchedMoEBlock)]
    for name, module in patched:
        _replace(model, name, _rebuild_block(module))
    if patched:
        _reset_recorder_hooks(model)
    return model


def _reset_recorder_hooks(model: nn.Module) -> None:
    """Drop transformers' output-recorder hooks so that its next forward installs them on the rebuilt blocks."""
    for m in model.modules():
        for key, hook in list(m._forward_hooks.items()):
            if getattr(hook, "__qualname__", "").startswith("install_output_capuring_hook"):
                del m._forward_hooks[key]
        if getattr(m, "_output_capturing_hooks_installed", False):
            m._output_capturing_hooks_installed = False  # type: ignore[assignment]  # transformers' flag


def to_moekit(model: nn.Module, engine: str = "auto", *, copy: bool = False) -> dict[str, MoE]:
    """moekit layers for every sparse-MoE block of a transformers (or patched) model, keyed by module name.

    Args:
        copy: clone the weights (by default the layers view the model's storage).
    """
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, PatchedMoEBlock):
            out[name] = module.moe
        elif (adapter := adapter_for(module)) is not None:
            out[name] = convert_block(module, adapter, name=name, engine=engine, copy=copy)
    if not out:
        raise ValueError(f"no sparse-MoE block found in {type(model).__name__}; supported: {sorted(ADAPTERS)}")
    return out


def from_moekit(model: nn.Module, layers: Mapping[str, MoE]) -> nn.Module:
    """Write moekit layers into the sparse-MoE blocks of a transformers model (in place, by copy).

    Every block must receive a layer and every layer must find its block; the layer's configuration, names and
    shapes must match the block's, otherwise :class:`ConversionError` is raised and nothing is written.
    """
    blocks = {name: (block, adapter) for name, block, adapter in find_blocks(model)}
    if set(blocks) != set(layers):
        raise ConversionError(f"blocks without a layer: {sorted(set(blocks) - set(layers))}; layers without a "
                              f"block: {sorted(set(layers) - set(blocks))}")
    staged = {name: export_block(layers[name], block, adapter) for name, (block, adapter) in blocks.items()}
    with torch.no_grad():
        for name, tensors in staged.items():
            blocks[name][0].load_state_dict(tensors, strict=True)
    return model


@contextlib.contextmanager
def routing_context(model: nn.Module, collect_stats: bool = True) -> Iterator[RoutingContext]:
    """Route the patched blocks' losses and statistics into one :class:`RoutingContext` for a ``with`` body.

    Example::

        with moekit.hf.routing_context(model) as ctx:
            model(**batch)
        print(ctx.stats_table())
    """
    ctx = RoutingContext(collect_stats=collect_stats)
    blocks = [m for m in model.modules() if isinstance(m, PatchedMoEBlock)]
    if not blocks:
        raise ValueError("the model has no patched MoE block; call moekit.hf.patch(model) first")
    for block in blocks:
        block.ctx = ctx
    try:
        yield ctx
    finally:
        for block in blocks:
            block.ctx = None
