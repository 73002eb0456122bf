"""BankSpec: the shape of a :class:`~moekit.compression.bank.CompressedBank`, and its storage formats.

Dim legend: E routing slots (the router's experts), G stored experts, F expert hidden dim, D model dim,
R rows, C columns, P bit planes.

Storage formats, per weight matrix ``m`` in ``w_gate`` (gated activations only), ``w_up``, ``w_down``:

- ``float``: ``m`` ``[G, R, C]`` float32.
- ``int``: ``m_planes`` ``[G, P=bits, R, ceil(C/8)]`` uint8 (:func:`~.quant.pack_bits`: byte-packed codes for
  1/2/4/8 bits, bit planes for 3/5/6/7), per-row
  ``m_scale``, ``m_zero`` ``[G, R]`` float16: ``w = (q - zero) * scale`` (RTN, GPTQ).
- ``ternary``: ``m_planes`` ``[G, 2, R, ceil(C/8)]`` and per-row ``m_lo``, ``m_hi`` float16: codes 0/1/2 are
  ``lo / 0 / hi`` (QMoE).
- ``tunstall``: the ternary codes entropy-coded (:mod:`.codec`): ``m_codes`` ``[N]`` int16, ``m_counts``
  ``[G*R]`` int16 (codes in each row; their prefix sums locate a row's stream) and ``m_lo``, ``m_hi``; the codebook is shared by the whole model.
- ``tunstall-fit``: as ``tunstall``, but each matrix has its own dictionary grown from its measured symbol
  frequencies, ``m_probs`` ``[9]`` float32 (the dictionary is regrown from them, not stored), rows are coded in
  segments of ``gcd(R, 16)`` rows, and only per-expert code counts ``m_ncodes`` ``[G]`` int32 are stored:
  segment boundaries follow from the codeword lengths.
- ``nested`` (D²MoE's MWQ, :mod:`.mwq`): ``m_planes`` ``[G, bits + levels, R, ceil(C/8)]`` (the base code's
  planes, then one sign plane per residual level), per-group ``m_scale``, ``m_zero`` ``[G, R, N]`` and
  ``m_rscale`` ``[G, levels, R, N]`` float16 (``N = ceil(C / group_size)``). ``active_levels`` picks how many
  residual planes the bank runs with: any prefix is a valid lower-bit expert.
- ``lowrank-sparse`` (MC-SMoE's second stage, :mod:`.mcsmoe`): ``W = L R + S`` with S row-sparse:
  ``m_L`` ``[G, R, rank]``, ``m_R`` ``[G, rank, C]``, the kept rows of S ``m_S`` ``[G, K_m, C]`` float32 and
  their row indices ``m_rows`` ``[G, K_m]`` int32 (``K_m = kept_rows[m]``, sorted, distinct). An expert runs as
  ``y = (x Rᵀ) Lᵀ``, plus ``x S_keptᵀ`` added into the kept output rows; W is never formed.

Biases (GPT-OSS, split BERT FFNs) stay float32, ``[G, F]`` / ``[G, D]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from ..experts.activations import is_gated

__all__ = ["FORMATS", "BankSpec"]

FORMATS = ("float", "int", "ternary", "tunstall", "tunstall-fit", "nested", "lowrank-sparse")


@dataclass(frozen=True, kw_only=True)
class BankSpec:
    """Everything needed to rebuild a :class:`CompressedBank` with empty buffers of the right shapes.

    Attributes:
        num_experts: routing slots E (the router's experts).
        num_stored: stored experts G.
        dim / hidden_dim: D and F.
        activation: the experts' activation.
        use_bias: whether the projections carry biases.
        format: one of :data:`FORMATS`.
        bits: bits per code (``int``), 2 for ``ternary`` / ``tunstall`` / ``tunstall-fit``, 32 for ``float``.
        num_codes: for ``tunstall`` / ``tunstall-fit``, the length of each matrix's code stream.
        levels / group_size: for ``nested``, the residual planes above the ``bits``-bit base, and the group size.
        rank / kept_rows: for ``lowrank-sparse``, the rank of ``L R`` and the kept rows of S per matrix.
        act_bits: simulated per-token activation quantisation of each projection's input (:mod:`.actquant`):
            0 (none, the default), 4 or 8 (EAQuant's A4/A8; MoTE's int8).
        act_clip: the activation clipping ratio in ``(0, 1]``.
        rotate: the stored weights are ``W H`` (block-Hadamard, folded in) and each projection's input is
            rotated online before it is quantised (EAQuant with rotation).
    """

    num_experts: int
    num_stored: int
    dim: int
    hidden_dim: int
    activation: str
    use_bias: bool = False
    format: str = "float"
    bits: int = 32
    num_codes: Mapping[str, int] | None = None
    levels: int = 0
    group_size: int = 128
    rank: int = 0
    kept_rows: Mapping[str, int] | None = None
    act_bits: int = 0
    act_clip: float = 1.0
    rotate: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"bank format {self.format!r} is unknown; choose one of {FORMATS}")
        from .actquant import ACT_BITS
        if self.act_bits not in ACT_BITS:
            raise ValueError(f"act_bits={self.act_bits} is not supported; choose one of {ACT_BITS} (0: float)")
        if not 0 < self.act_clip <= 1:
            raise ValueError(f"act_clip={self.act_clip} must be in (0, 1] (1: no clipping)")
        if not 1 <= self.num_stored <= self.num_experts:
            raise ValueError(f"num_stored={self.num_stored} must be between 1 and num_experts={self.num_experts}")
        if self.format == "lowrank-sparse":
            for m, (R, C) in self.matrices().items():
                if not 1 <= self.rank <= min(R, C):
                    raise ValueError(f"lowrank-sparse bank: rank={self.rank} must be between 1 and min{(R, C)} "
                                     f"of {m}")
                k = (self.kept_rows or {}).get(m)
                if not isinstance(k, int) or not 0 <= k <= R:
                    raise ValueError(f"lowrank-sparse bank: kept_rows[{m!r}]={k!r} must be an integer in [0, {R}]")

    def matrices(self) -> dict[str, tuple[int, int]]:
        """``{name: (rows, cols)}`` of the expert weight matrices."""
        F_, D = self.hidden_dim, self.dim
        out = {"w_gate": (F_, D)} if is_gated(self.activation) else {}
        return {**out, "w_up": (F_, D), "w_down": (D, F_)}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_codes"] = dict(self.num_codes) if self.num_codes else None
        d["kept_rows"] = dict(self.kept_rows) if self.kept_rows else None
        return d

    def buffer_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """``{buffer name: (shape, dtype)}``: what a file must hold for this bank."""
        G, E = self.num_stored, self.num_experts
        out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"slot_to_stored_E": ((E,), torch.int64)}
        for m, (R, C) in self.matrices().items():
            if self.format == "float":
                out[m] = ((G, R, C), torch.float32)
                continue
            if self.format == "lowrank-sparse":
                K = (self.kept_rows or {})[m]
                out[f"{m}_L"] = ((G, R, self.rank), torch.float32)
                out[f"{m}_R"] = ((G, self.rank, C), torch.float32)
                out[f"{m}_S"] = ((G, K, C), torch.float32)
                out[f"{m}_rows"] = ((G, K), torch.int32)
                continue
            if self.format == "nested":
                N = -(-C // self.group_size)
                out[f"{m}_planes"] = ((G, self.bits + self.levels, R, (C + 7) // 8), torch.uint8)
                out[f"{m}_scale"] = ((G, R, N), torch.float16)
                out[f"{m}_zero"] = ((G, R, N), torch.float16)
                out[f"{m}_rscale"] = ((G, self.levels, R, N), torch.float16)
                continue
            if self.format == "tunstall":
                out[f"{m}_codes"] = (((self.num_codes or {})[m],), torch.int16)
                out[f"{m}_counts"] = ((G * R,), torch.int16)
            elif self.format == "tunstall-fit":
                out[f"{m}_codes"] = (((self.num_codes or {})[m],), torch.int16)
                out[f"{m}_ncodes"] = ((G,), torch.int32)
                out[f"{m}_probs"] = ((9,), torch.float32)
            else:
                out[f"{m}_planes"] = ((G, self.bits, R, (C + 7) // 8), torch.uint8)
            names = ("scale", "zero") if self.format == "int" else ("lo", "hi")
            for p in names:
                out[f"{m}_{p}"] = ((G, R), torch.float16)
        if self.use_bias:
            if is_gated(self.activation):
                out["b_gate"] = ((G, self.hidden_dim), torch.float32)
            out["b_up"] = ((G, self.hidden_dim), torch.float32)
            out["b_down"] = ((G, self.dim), torch.float32)
        return out
