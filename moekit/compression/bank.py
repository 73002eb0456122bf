"""CompressedBank: an expert bank stored merged, pruned or quantised, dequantised one expert at a time as it runs.

Dim legend: E routing slots (the router's experts), G stored experts, F expert hidden dim, D model dim,
R rows, C columns, P bit planes.

The bank stands where an :class:`~moekit.experts.ExpertBank` stood inside a :class:`~moekit.MoE` and offers what
the ``reference`` engine uses (``num_experts`` and ``expert(x, e)``), so routing, shared experts, statistics and
every caller stay as they are. ``slot_to_stored_E`` maps the router's E slots onto the G stored experts: the
identity for quantisation and pruning, many-to-one for merging (M-SMoE keeps the router and points every slot
of a group at the one merged expert).

The storage formats (``float``, ``int``, ``ternary``, ``tunstall``, ``tunstall-fit``, ``nested``,
``lowrank-sparse``) and the buffers each one holds are described in :mod:`moekit.compression.bank_spec`, whose
:class:`BankSpec` and :data:`FORMATS` this module re-exports.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..experts.activations import hidden, is_gated
from .bank_spec import FORMATS, BankSpec
from .quant import RowGrid, pack_bits, unpack_bits

__all__ = ["FORMATS", "BankSpec", "CompressedBank", "expert_weights"]


def expert_weights(bank: nn.Module, e: int) -> dict[str, torch.Tensor]:
    """The float weights (and biases) of slot ``e`` of an ExpertBank or CompressedBank."""
    if isinstance(bank, CompressedBank):
        return bank.weights(e)
    out = {m: getattr(bank, m)[e].detach() for m in ("w_gate", "w_up", "w_down") if getattr(bank, m) is not None}
    for b in ("b_gate", "b_up", "b_down"):
        if getattr(bank, b, None) is not None:
            out[b] = getattr(bank, b)[e].detach()
    return out


class CompressedBank(nn.Module):
    """Stored-compressed experts behind the ExpertBank interface the ``reference`` engine reads.

    Build one with :meth:`from_float` or :meth:`from_quantized`; :meth:`empty` makes one to load a file into.
    """

    codebook: torch.Tensor | None = None  # set by the loader for ``tunstall`` banks (shared by every layer)
    active_levels: int | None = None  # ``nested`` banks: residual planes used (None: all)
    matmul: str = "dequantize"  # ``int`` banks: "int8" runs torch._int_mm on int8 activations (inference only)
    slot_to_stored_E: torch.Tensor

    def __init__(self, spec: BankSpec) -> None:
        super().__init__()
        self.spec = spec
        self.num_experts, self.dim, self.hidden_dim = spec.num_experts, spec.dim, spec.hidden_dim
        self.activation = spec.activation
        for name, (shape, dtype) in spec.buffer_shapes().items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))

    @property
    def gated(self) -> bool:
        return is_gated(self.activation)

    @classmethod
    def empty(cls, spec: BankSpec) -> CompressedBank:
        return cls(spec)

    @classmethod
    def from_float(cls, weights: Mapping[str, torch.Tensor], slot_to_stored_E: torch.Tensor, *, activation: str
                   ) -> CompressedBank:
        """A ``float`` bank from stacked weights ``{w_gate?, w_up: [G, F, D], w_down: [G, D, F], b_*?}``."""
        G, F_, D = weights["w_up"].shape
        spec = BankSpec(num_experts=len(slot_to_stored_E), num_stored=G, dim=D, hidden_dim=F_,
                        activation=activation, use_bias="b_up" in weights, format="float", bits=32)
        bank = cls(spec)
        with torch.no_grad():
            for name, t in weights.items():
                getattr(bank, name).copy_(t)
            bank.slot_to_stored_E.copy_(slot_to_stored_E)
        return bank

    @classmethod
    def from_quantized(cls, codes: Mapping[str, list[tuple[torch.Tensor, RowGrid]]], slot_to_stored_E: torch.Tensor,
                       *, activation: str, biases: Mapping[str, torch.Tensor] | None = None) -> CompressedBank:
        """An ``int`` or ``ternary`` bank from ``{matrix: [(codes_RC, grid) per stored expert]}``."""
        first = codes["w_up"][0][1]
        fmt, bits = ("ternary", 2) if first.kind == "ternary" else ("int", first.bits)
        G = len(codes["w_up"])
        F_, D = codes["w_up"][0][0].shape
        spec = BankSpec(num_experts=len(slot_to_stored_E), num_stored=G, dim=D, hidden_dim=F_,
                        activation=activation, use_bias=bool(biases), format=fmt, bits=bits)
        bank = cls(spec)
        with torch.no_grad():
            for m, per_expert in codes.items():
                for g, (q_RC, grid) in enumerate(per_expert):
                    if (grid.kind == "ternary") != (fmt == "ternary") or grid.bits != bits:
                        raise ValueError("every matrix of a bank must use the same grid kind and bits")
                    getattr(bank, f"{m}_planes")[g] = pack_bits(q_RC, bits)
                    first_R, second_R = grid._pair()
                    names = ("scale", "zero") if fmt == "int" else ("lo", "hi")
                    getattr(bank, f"{m}_{names[0]}")[g] = first_R.half()
                    getattr(bank, f"{m}_{names[1]}")[g] = second_R.half()
            for name, t in (biases or {}).items():
                getattr(bank, name).copy_(t)
            bank.slot_to_stored_E.copy_(slot_to_stored_E)
        return bank

    def _apply(self, fn, recurse=True):
        """Move the shared codebook with the buffers (``.to(device)``)."""
        out = super()._apply(fn, recurse)
        if self.codebook is not None:
            self.codebook = fn(self.codebook)
        return out

    def grid(self, m: str, g: int) -> RowGrid:
        if self.spec.format == "int":
            return RowGrid("minmax", self.spec.bits, scale_R=getattr(self, f"{m}_scale")[g].float(),
                           zero_R=getattr(self, f"{m}_zero")[g].float())
        return RowGrid("ternary", 2, lo_R=getattr(self, f"{m}_lo")[g].float(), hi_R=getattr(self, f"{m}_hi")[g].float())

    def codes(self, m: str, g: int) -> torch.Tensor:
        """Integer codes ``[R, C]`` of matrix ``m`` of stored expert ``g`` (quantised formats)."""
        R, C = self.spec.matrices()[m]
        if self.spec.format == "tunstall-fit":
            from .codec import codebook_for, decode_matrix
            ncodes = getattr(self, f"{m}_ncodes").long()
            start = int(ncodes[:g].sum())
            stream = getattr(self, f"{m}_codes")[start:start + int(ncodes[g])]
            return decode_matrix(stream, R, C, codebook_for(getattr(self, f"{m}_probs").cpu()))
        if self.spec.format == "tunstall":
            from .codec import decode_rows
            counts = getattr(self, f"{m}_counts").long()
            start = int(counts[:g * R].sum())
            offsets = torch.zeros(R + 1, dtype=torch.long)
            offsets[1:] = torch.cumsum(counts[g * R:(g + 1) * R], 0)
            stream = getattr(self, f"{m}_codes")[start:start + int(offsets[-1])]
            if self.codebook is None:
                raise RuntimeError("an entropy-coded bank needs its codebook; load it with moekit's loader")
            return decode_rows(stream, offsets - offsets[0], C, self.codebook)
        return unpack_bits(getattr(self, f"{m}_planes")[g], C)

    def matrix(self, m: str, g: int) -> torch.Tensor:
        """The float32 weight ``[R, C]`` of matrix ``m`` of stored expert ``g``, dequantised now."""
        if self.spec.format == "float":
            return getattr(self, m)[g]
        if self.spec.format == "lowrank-sparse":
            from .mcsmoe import lowrank_sparse_dense
            return lowrank_sparse_dense(*self._lowrank(m, g))
        if self.spec.format == "nested":
            from .mwq import reconstruct
            s, C = self.spec, self.spec.matrices()[m][1]
            levels = s.levels if self.active_levels is None else min(self.active_levels, s.levels)
            planes = getattr(self, f"{m}_planes")[g]
            signs = torch.stack([unpack_bits(planes[s.bits + k:s.bits + k + 1], C) * 2 - 1 for k in range(levels)]) \
                if levels else torch.zeros(0, 1, C)
            return reconstruct(unpack_bits(planes[:s.bits], C), signs, getattr(self, f"{m}_scale")[g],
                               getattr(self, f"{m}_zero")[g], getattr(self, f"{m}_rscale")[g], s.group_size, levels)
        return self.grid(m, g).dequantize(self.codes(m, g))

    def weights(self, e: int) -> dict[str, torch.Tensor]:
        g = int(self.slot_to_stored_E[e])
        out = {m: self.matrix(m, g) for m in self.spec.matrices()}
        for b in ("b_gate", "b_up", "b_down"):
            bias = self._buffers.get(b)
            if bias is not None:
                out[b] = bias[g]
        return out

    def expert(self, x_TD: torch.Tensor, e: int) -> torch.Tensor:
        """Run slot ``e`` on every row of ``x_TD``, dequantising only that expert's weights (or, for an ``int``
        bank with ``matmul = "int8"`` when no gradient is needed, through :mod:`.int8mm`)."""
        s = self.spec
        if self.matmul == "int8" and s.format == "int" and not s.act_bits and not s.rotate and not (
                torch.is_grad_enabled() and x_TD.requires_grad):
            return self._expert_int8(x_TD, e)
        if self.spec.format == "lowrank-sparse":
            return self._expert_lowrank(x_TD, e)
        w = self.weights(e)
        dtype = x_TD.dtype
        x_TD = self._act_in(x_TD)
        h_up = F.linear(x_TD, w["w_up"].to(dtype), _opt(w.get("b_up"), dtype))
        h_gate = F.linear(x_TD, w["w_gate"].to(dtype), _opt(w.get("b_gate"), dtype)) if self.gated else None
        h_TF = self._act_in(hidden(self.activation, h_gate, h_up))
        return F.linear(h_TF, w["w_down"].to(dtype), _opt(w.get("b_down"), dtype))

    def _act_in(self, x_TC: torch.Tensor) -> torch.Tensor:
        """A projection's input as the stored weights expect it: rotated (``rotate``), then fake-quantised."""
        s = self.spec
        if not s.rotate and not s.act_bits:
            return x_TC
        from .actquant import act_fake_quant, rotate
        return act_fake_quant(rotate(x_TC) if s.rotate else x_TC, s.act_bits, s.act_clip)

    def _lowrank(self, m: str, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(L [R, rank], R [rank, C], S_kept [K, C], rows [K])`` of matrix ``m`` of stored expert ``g``."""
        return (getattr(self, f"{m}_L")[g], getattr(self, f"{m}_R")[g], getattr(self, f"{m}_S")[g],
                getattr(self, f"{m}_rows")[g])

    def _expert_lowrank(self, x_TD: torch.Tensor, e: int) -> torch.Tensor:
        from .mcsmoe import lowrank_sparse_linear
        g = int(self.slot_to_stored_E[e])

        def linear(x: torch.Tensor, m: str, bias: str) -> torch.Tensor:
            b = self._buffers.get(bias)
            return lowrank_sparse_linear(x, *self._lowrank(m, g), None if b is None else b[g])

        h_up = linear(x_TD, "w_up", "b_up")
        h_gate = linear(x_TD, "w_gate", "b_gate") if self.gated else None
        return linear(hidden(self.activation, h_gate, h_up), "w_down", "b_down")

    def check_buffers(self, where: str) -> None:
        """Value checks a shape/dtype check cannot make (called by the loader): ``lowrank-sparse`` row indices
        must be distinct, sorted and inside the matrix."""
        if self.spec.format != "lowrank-sparse":
            return
        for m, (R, _) in self.spec.matrices().items():
            rows_GK = getattr(self, f"{m}_rows").long()
            ok = bool(((rows_GK >= 0) & (rows_GK < R)).all()) and bool((rows_GK.diff(dim=1) > 0).all())
            if not ok:
                raise ValueError(f"{where}: {m}_rows holds row indices that are not distinct, sorted and in "
                                 f"[0, {R}); the file is corrupt, re-run moekit compress")

    def _expert_int8(self, x_TD: torch.Tensor, e: int) -> torch.Tensor:
        from .int8mm import int8_linear, shifted_codes
        g, bits = int(self.slot_to_stored_E[e]), self.spec.bits

        def linear(x: torch.Tensor, m: str, bias: str) -> torch.Tensor:
            w8 = shifted_codes(self.codes(m, g), bits)
            b = self._buffers.get(bias)
            return int8_linear(x, w8, bits, getattr(self, f"{m}_scale")[g], getattr(self, f"{m}_zero")[g],
                               None if b is None else b[g])

        h_up = linear(x_TD, "w_up", "b_up")
        h_gate = linear(x_TD, "w_gate", "b_gate") if self.gated else None
        return linear(hidden(self.activation, h_gate, h_up), "w_down", "b_down")

    @classmethod
    def from_mwq(cls, mats: Mapping[str, list], slot_to_stored_E: torch.Tensor, *, activation: str,
                 biases: Mapping[str, torch.Tensor] | None = None) -> CompressedBank:
        """A ``nested`` bank from ``{matrix: [MWQ per stored expert]}``."""
        first = mats["w_up"][0]
        G = len(mats["w_up"])
        F_, D = first.codes_RC.shape
        spec = BankSpec(num_experts=len(slot_to_stored_E), num_stored=G, dim=D, hidden_dim=F_, activation=activation,
                        use_bias=bool(biases), format="nested", bits=first.bits, levels=first.signs_LRC.shape[0],
                        group_size=first.group_size)
        bank = cls(spec)
        with torch.no_grad():
            for m, per_expert in mats.items():
                for g, q in enumerate(per_expert):
                    planes = [pack_bits(q.codes_RC, spec.bits)]
                    planes += [pack_bits((q.signs_LRC[k] > 0).long(), 1) for k in range(spec.levels)]
                    getattr(bank, f"{m}_planes")[g] = torch.cat(planes)
                    getattr(bank, f"{m}_scale")[g] = q.scale_RN.half()
                    getattr(bank, f"{m}_zero")[g] = q.zero_RN.half()
                    getattr(bank, f"{m}_rscale")[g] = q.rscale_LRN.half()
            for name, t in (biases or {}).items():
                getattr(bank, name).copy_(t)
            bank.slot_to_stored_E.copy_(slot_to_stored_E)
        return bank

    def stored_bytes(self) -> int:
        """Bytes of the bank's tensors (what it adds to the file and to resident memory)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        s = self.spec
        return (f"slots={s.num_experts}, stored={s.num_stored}, dim={s.dim}, hidden_dim={s.hidden_dim}, "
                f"format={s.format}, bits={s.bits}, act_bits={s.act_bits}, rotate={s.rotate}")


def _opt(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)
