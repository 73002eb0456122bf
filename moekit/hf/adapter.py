"""What an architecture adapter declares, the registry of adapters, and the verified block conversion.

Dim legend: E experts, F expert hidden dim (HF ``intermediate``), D model dim (HF ``hidden``).

An :class:`Adapter` describes one transformers sparse-MoE block class by three pure functions:

- ``moe_config(block)``: the :class:`~moekit.MoEConfig` that computes what the block computes;
- ``to_moekit(hf)``: block-relative HF tensors -> moekit tensors, by *indexing only* (slices, strided views,
  transposes), so that the moekit layer shares the checkpoint's storage;
- ``to_hf(mk)``: the inverse. It copies only where HF packs two moekit tensors into one (``gate_up_proj``);
  a tensor whose layout is the same on both sides is passed through unchanged.

:func:`convert_block` checks every conversion: no HF tensor may be left unmapped, every moekit tensor must
have the shape its layer expects, and ``to_hf(to_moekit(hf))`` must reproduce every HF tensor bit for bit.
A conversion that would drop, duplicate or mis-shape an expert weight raises :class:`ConversionError`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..layers import MoE, MoEConfig

__all__ = ["Adapter", "ADAPTERS", "register_adapter", "adapter_for", "ConversionError", "convert_block",
           "export_block", "split_halves", "join_halves"]


class ConversionError(ValueError):
    """A conversion between a transformers block and a moekit layer would lose or mis-shape a weight."""


@dataclass(frozen=True)
class Adapter:
    """How one transformers sparse-MoE block class maps onto a moekit :class:`~moekit.MoE`.

    Attributes:
        name: architecture name (``mixtral``).
        block_class: the transformers class name of the sparse block (``MixtralSparseMoeBlock``).
        moe_config: builds the equivalent :class:`MoEConfig` from a block instance.
        to_moekit: HF tensors (block-relative names) -> moekit tensors (layer-relative names), views only.
        to_hf: moekit tensors -> HF tensors (copies only where HF packs tensors together).
        returns_scores: the block's forward returns ``(hidden, router_scores_TK)`` rather than a tensor.
    """

    name: str
    block_class: str
    moe_config: Callable[[nn.Module], MoEConfig]
    to_moekit: Callable[[Mapping[str, torch.Tensor], MoEConfig], dict[str, torch.Tensor]]
    to_hf: Callable[[Mapping[str, torch.Tensor], MoEConfig], dict[str, torch.Tensor]]
    returns_scores: bool = False


ADAPTERS: dict[str, Adapter] = {}  # keyed by transformers block class name


def register_adapter(adapter: Adapter) -> Adapter:
    ADAPTERS[adapter.block_class] = adapter
    return adapter


def adapter_for(module: nn.Module) -> Adapter | None:
    """The adapter of a transformers sparse-MoE block, or None for any other module."""
    return ADAPTERS.get(type(module).__name__)


def split_halves(packed_EXD: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the two halves of a ``[gate; up]`` packed tensor along ``dim`` (no copy)."""
    half = packed_EXD.shape[dim] // 2
    return packed_EXD.narrow(dim, 0, half), packed_EXD.narrow(dim, half, half)


def join_halves(first: torch.Tensor, second: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Pack two halves back into one tensor (a copy: HF stores them in one allocation)."""
    return torch.cat([first, second], dim=dim)


def _expected_shapes(cfg: MoEConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        moe = MoE(cfg)
    return {name: t.shape for name, t in moe.state_dict().items()}


def _check_same_keys(got: Mapping[str, object], want: Mapping[str, object], what: str, fix: str) -> None:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        hint = ""
        for name in extra:
            close = difflib.get_close_matches(name, missing, n=1)
            if close:
                hint = f"; {name!r} may be meant as {close[0]!r}"
                break
        raise ConversionError(f"{what}: missing {missing}, unexpected {extra}{hint}. {fix}")


def _hf_state(block: nn.Module) -> dict[str, torch.Tensor]:
    return dict(block.state_dict(keep_vars=True))


class _ReadRecorder(dict):
    """A dict that remembers which keys were read, to find block tensors an adapter never looked at."""

    def __init__(self, data: Mapping[str, torch.Tensor]) -> None:
        super().__init__(data)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return super().__getitem__(key)


def convert_block(block: nn.Module, adapter: Adapter, *, name: str = "moe", engine: str = "auto",
                  copy: bool = False, verify: bool = True) -> MoE:
    """A moekit :class:`MoE` computing what the transformers ``block`` computes, from the same weights.

    Args:
        block: a transformers sparse-MoE block that ``adapter`` describes.
        adapter: the block's :class:`Adapter`.
        name: the layer's name in a :class:`~moekit.RoutingContext`.
        engine: the moekit engine to run the experts with.
        copy: clone the weights; by default the layer's parameters are views of the block's storage
            (a block parameter whose layout is unchanged is reused as the same ``nn.Parameter`` object).
        verify: check that ``to_hf(to_moekit(hf))`` reproduces every HF tensor exactly (costs one temporary
            copy of the packed tensors of this block).

    Raises:
        ConversionError: an HF tensor is not mapped, a moekit tensor is missing or mis-shaped, or the mapping
            does not invert exactly.
    """
    cfg = replace(adapter.moe_config(block), engine=engine)
    hf = _hf_state(block)
    recorder = _ReadRecorder(hf)
    mk = adapter.to_moekit(recorder, cfg)
    unread = sorted(set(hf) - recorder.read)
    if unread:
        raise ConversionError(f"{adapter.name}: block tensors {unread} are not mapped by the adapter and would "
                              f"be dropped; the block differs from the {type(block).__name__} moekit knows")
    want = _expected_shapes(cfg)
    if "router.expert_bias" not in mk:
        mk["router.expert_bias"] = torch.zeros(cfg.num_experts, device=hf[next(iter(hf))].device)
    _check_same_keys(mk, want, f"{adapter.name} -> moekit ({type(block).__name__})",
                     "The block holds weights this adapter does not map; they would be dropped.")
    for key, shape in want.items():
        if mk[key].shape != shape:
            raise ConversionError(f"{adapter.name}: moekit tensor {key!r} would have shape {tuple(mk[key].shape)}, "
                                  f"the layer needs {tuple(shape)}; the adapter mis-reads the block's layout")
    if verify:
        back = adapter.to_hf({k: v.detach() for k, v in mk.items()}, cfg)
        _check_same_keys(back, hf, f"moekit -> {adapter.name} round trip",
                         "The adapter's to_hf does not rebuild every tensor of the block.")
        for key, value in hf.items():
            if back[key].shape != value.shape or not torch.equal(back[key], value.detach()):
                raise ConversionError(f"{adapter.name}: HF tensor {key!r} is not reproduced by the round trip "
                                      f"(an expert weight would be dropped, duplicated or mis-placed)")
    return _materialize(cfg, mk, hf, name=name, copy=copy)


def _materialize(cfg: MoEConfig, mk: dict[str, torch.Tensor], hf: dict[str, torch.Tensor], *, name: str,
                 copy: bool) -> MoE:
    """Build the layer on the meta device, then give it the mapped tensors (no initialisation work)."""
    with torch.device("meta"):
        moe = MoE(cfg, name=name)
    hf_params = {id(t): t for t in hf.values() if isinstance(t, nn.Parameter)}
    device = next(iter(mk.values())).device
    for key, value in mk.items():
        owner_name, _, attr = key.rpartition(".")
        owner = moe.get_submodule(owner_name) if owner_name else moe
        if attr in owner._buffers:
            owner._buffers[attr] = value.detach().clone() if copy else value  # buffers: the same tensor
        elif not copy and id(value) in hf_params:
            setattr(owner, attr, value)  # same layout: share the very Parameter object
        else:
            data = value.detach().clone(memory_format=torch.contiguous_format) if copy else value.detach()
            setattr(owner, attr, nn.Parameter(data, requires_grad=_source_requires_grad(value, hf)))
    moe.router.pending_counts = torch.zeros(cfg.num_experts, device=device)
    return moe


def _function_of(cfg: MoEConfig) -> MoEConfig:
    """``cfg`` without the settings that do not change the layer's function (engine, training losses)."""
    router = replace(cfg.router, aux_loss_coef=0.0, aux_loss_level="batch", z_loss_coef=0.0, jitter_eps=0.0,
                     bias_update_rate=0.0, use_selection_bias=cfg.router.use_selection_bias
                     or cfg.router.bias_update_rate > 0)
    return replace(cfg, engine="auto", router=router)


def _source_requires_grad(view: torch.Tensor, hf: dict[str, torch.Tensor]) -> bool:
    """Whether the HF parameter that ``view`` was cut from is trainable (frozen stays frozen)."""
    ptr = view.untyped_storage().data_ptr()
    for t in hf.values():
        if isinstance(t, nn.Parameter) and t.untyped_storage().data_ptr() == ptr:
            return t.requires_grad
    return True


def export_block(moe: MoE, block: nn.Module, adapter: Adapter) -> dict[str, torch.Tensor]:
    """HF tensors for ``block`` from a moekit layer, checked against the block's own names and shapes.

    Raises:
        ConversionError: the layer's configuration (experts, top-k, routing) differs from the block's, or a
            tensor is missing or mis-shaped.
    """
    want_cfg, have_cfg = _function_of(adapter.moe_config(block)), _function_of(moe.config)
    if want_cfg != have_cfg:
        diff = [f"{f}: layer {getattr(have_cfg, f)!r} vs block {getattr(want_cfg, f)!r}"
                for f in MoEConfig.__dataclass_fields__ if getattr(have_cfg, f) != getattr(want_cfg, f)]
        raise ConversionError(f"moekit layer {moe.name!r} does not compute what the {adapter.name} block "
                              f"computes: " + "; ".join(diff))
    out = adapter.to_hf({k: v.detach() for k, v in moe.state_dict().items()}, moe.config)
    hf = _hf_state(block)
    _check_same_keys(out, hf, f"moekit -> {adapter.name}", "The adapter does not fill every block tensor.")
    for key, value in hf.items():
        if out[key].shape != value.shape:
            raise ConversionError(f"{adapter.name}: {key!r} would have shape {tuple(out[key].shape)}, the block "
                                  f"needs {tuple(value.shape)}")
    return out
