"""Weight quantisers shared by the compression methods, and the bit-plane packing of their codes.

Dim legend: R rows (output channels), C columns (input channels), P bit planes.

- Round-to-nearest, asymmetric min-max per row (``b`` bits, ``2^b`` levels): the RTN baseline, and the grid
  GPTQ (P4) rounds onto. ``scale_R = (max_R - min_R) / (2^b - 1)``, ``zero_R = round(-min_R / scale_R)``,
  ``q = clamp(round(w / scale) + zero, 0, 2^b - 1)``, ``w_hat = (q - zero) * scale``.
- QMoE's ternary rounding (spec §4): per row ``m- = min(min_R, 0)``, ``m+ = max(max_R, 0)``; ``w -> m+`` if
  ``w > m+/2``, ``m-`` if ``w < m-/2``, else 0. Codes 0, 1, 2 stand for ``m-``, 0, ``m+``.

Codes are packed by :func:`pack_bits` (byte-packed for 1/2/4/8 bits, bit planes otherwise), so a b-bit matrix
costs exactly ``b`` bits per weight (rows padded to a multiple of 8 codes) plus its per-row parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "RowGrid",
    "dequantize_rows",
    "minmax_grid",
    "pack_bits",
    "quantize_rows",
    "rtn",
    "ternary_grid",
    "unpack_bits",
]


@dataclass(frozen=True)
class RowGrid:
    """A per-row quantisation grid: ``w_hat = (q - zero_R) * scale_R`` for integer codes ``q``, or, for the
    ternary grid, ``q ∈ {0, 1, 2} -> {lo_R, 0, hi_R}``.

    Attributes:
        kind: ``minmax`` (``bits`` bits, asymmetric) or ``ternary`` (QMoE).
        bits: bits per code (2 for ternary: three levels stored in two bits).
        scale_R / zero_R: minmax parameters (float32 here; stored as float16 on disk).
        lo_R / hi_R: ternary extremes ``m-`` (<= 0) and ``m+`` (>= 0).
    """

    kind: str
    bits: int
    scale_R: torch.Tensor | None = None
    zero_R: torch.Tensor | None = None
    lo_R: torch.Tensor | None = None
    hi_R: torch.Tensor | None = None

    def _pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = (self.lo_R, self.hi_R) if self.kind == "ternary" else (self.scale_R, self.zero_R)
        assert a is not None and b is not None, "grid built without its parameters"
        return a, b

    def quantize(self, w_RC: torch.Tensor) -> torch.Tensor:
        """Integer codes (int64) of ``w`` on this grid; ``w_RC`` may hold a subset of columns (GPTQ)."""
        a, b = self._pair()
        if self.kind == "ternary":
            lo, hi = a[:, None], b[:, None]
            codes = torch.ones_like(w_RC, dtype=torch.long)
            codes = torch.where(w_RC > hi / 2, 2, codes)
            return torch.where(w_RC < lo / 2, 0, codes)
        levels = 2 ** self.bits - 1
        return torch.clamp(torch.round(w_RC / a[:, None]) + b[:, None], 0, levels).long()

    def dequantize(self, q_RC: torch.Tensor) -> torch.Tensor:
        a, b = self._pair()
        if self.kind == "ternary":
            lo, hi = a[:, None], b[:, None]
            return torch.where(q_RC == 2, hi, torch.where(q_RC == 0, lo, torch.zeros_like(hi)))
        return (q_RC.float() - b[:, None]) * a[:, None]

    def round(self, w_RC: torch.Tensor) -> torch.Tensor:
        """``dequantize(quantize(w))``: the nearest grid value of every entry."""
        return self.dequantize(self.quantize(w_RC))


def minmax_grid(w_RC: torch.Tensor, bits: int) -> RowGrid:
    """Asymmetric per-row min-max grid with ``2^bits`` levels (the range always contains 0)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is not supported; choose 1 to 8")
    w = w_RC.float()
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    scale = (hi - lo) / (2 ** bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale is exact
    zero = torch.round(-lo / scale)
    return RowGrid("minmax", bits, scale_R=scale, zero_R=zero)


def ternary_grid(w_RC: torch.Tensor) -> RowGrid:
    """QMoE's ternary grid: per row ``{min(min_R, 0), 0, max(max_R, 0)}``."""
    w = w_RC.float()
    return RowGrid("ternary", 2, lo_R=w.min(dim=1).values.clamp(max=0), hi_R=w.max(dim=1).values.clamp(min=0))


def quantize_rows(w_RC: torch.Tensor, grid: RowGrid) -> torch.Tensor:
    return grid.quantize(w_RC.float())


def dequantize_rows(q_RC: torch.Tensor, grid: RowGrid) -> torch.Tensor:
    return grid.dequantize(q_RC)


def rtn(w_RC: torch.Tensor, bits: int) -> tuple[torch.Tensor, RowGrid]:
    """Round-to-nearest per output channel: ``(codes_RC, grid)``."""
    grid = minmax_grid(w_RC, bits)
    return grid.quantize(w_RC.float()), grid


def pack_bits(q_RC: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits)`` into ``[bits, R, ceil(C/8)]`` uint8 (exactly ``bits`` bits a code).

    Widths that divide 8 (1, 2, 4, 8) are byte-packed, ``8 / bits`` consecutive codes per byte (low bits first),
    the row's bytes laid out over the ``bits`` slots: decoding is a few shifts, or nothing for 8 bits. Other
    widths (3, 5, 6, 7) are stored as bit planes: slot ``p`` holds bit ``p`` of every code, 8 codes a byte.
    """
    R, C = q_RC.shape
    nb = (C + 7) // 8
    q = torch.nn.functional.pad(q_RC.to(torch.int32), (0, nb * 8 - C))
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32) * bits
        row_bytes = (q.view(R, -1, per) << shifts).sum(-1).to(torch.uint8)  # [R, bits * nb]
        return row_bytes.view(R, bits, nb).permute(1, 0, 2).contiguous()
    shifts = torch.arange(8, dtype=torch.int32)
    planes = []
    for p in range(bits):
        bit_RC8 = ((q >> p) & 1).view(R, -1, 8)
        planes.append((bit_RC8 << shifts).sum(-1).to(torch.uint8))
    return torch.stack(planes)


def unpack_bits(packed_PRc: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits` (the width is the number of slots ``P``): int64 codes ``[R, cols]``."""
    P, R, nbytes = packed_PRc.shape
    if 8 % P == 0:
        row_bytes = packed_PRc.permute(1, 0, 2).reshape(R, P * nbytes)
        if P == 8:
            return row_bytes[:, :cols].long()
        per = 8 // P
        shifts = torch.arange(per, dtype=torch.uint8) * P
        codes = (row_bytes[:, :, None] >> shifts) & (2 ** P - 1)
        return codes.view(R, -1)[:, :cols].long()
    shifts32 = torch.arange(8, dtype=torch.int32)
    b = packed_PRc.to(torch.int32)
    q = torch.zeros(R, nbytes * 8, dtype=torch.int32, device=packed_PRc.device)
    for p in range(P):
        q |= ((b[p][:, :, None] >> shifts32) & 1).view(R, -1) << p
    return q[:, :cols].long()
