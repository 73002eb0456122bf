"""QMoE's dictionary codec for ternary weights (Frantar & Alistarh 2023, arXiv 2310.16795; spec §4).

Dim legend: R rows, C columns, L symbols per row (``ceil(C/2)``), N codes, W longest codeword (14 symbols).

A symbol is a *pair* of ternary codes ``(a, b)``, ``a, b ∈ {0: m-, 1: zero, 2: m+}``, numbered ``3a + b`` (9
values). The dictionary holds up to 65,536 codewords, the most probable symbol sequences (at most 14 symbols,
28 weights) under an i.i.d. model with ``P(0) = 0.885`` and ``P(±) = 0.0575``: a Tunstall code grown with a
priority queue from the root, always expanding the most probable leaf into its 9 children. Its leaves form a
complete prefix-free set, so the greedy longest match is a walk down the trie to a leaf; every row is encoded on
its own into a stream of 16-bit codes (stored as ``int16``, offset by 32768), and per-row offsets mark where each
row starts. A row whose end falls inside the trie is completed with zero-symbols (``(1, 1)``); decoding knows
the row length and drops them. Encoding walks all rows in lockstep (one step per symbol) and decoding is a table
gather, so neither loops over weights in Python.

The codebook is one ``uint8`` tensor ``[codes, 1 + W]``: column 0 the codeword length, then its symbols.
"""

from __future__ import annotations

import bisect
import heapq
import math
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from ..training.checkpoint import CheckpointError

if TYPE_CHECKING:
    from .bank import CompressedBank

__all__ = [
    "MAX_SYMBOLS",
    "P_ZERO",
    "build_codebook",
    "check_codebook",
    "codebook_for",
    "decode_matrix",
    "decode_rows",
    "encode_matrix",
    "encode_rows",
    "paper_probabilities",
    "row_offsets",
    "segment_rows",
    "symbol_probabilities",
    "to_tunstall",
]

P_ZERO, NUM_CODES, MAX_SYMBOLS, ZERO_SYMBOL, OFFSET = 0.885, 65536, 14, 4, 32768


def paper_probabilities(p_zero: float = P_ZERO) -> tuple[float, ...]:
    """The 9 symbol probabilities of the paper's i.i.d. model: ``P(a) P(b)`` with ``P(0) = p_zero``."""
    p = [(1 - p_zero) / 2, p_zero, (1 - p_zero) / 2]
    return tuple(p[s // 3] * p[s % 3] for s in range(9))


def symbol_probabilities(q_RC: torch.Tensor) -> torch.Tensor:
    """Measured symbol (code pair) frequencies of ternary codes ``[R, C]``, Laplace-smoothed: ``[9]`` float32.

    The fitted dictionary (:func:`fit_codebook`) is grown from these instead of the paper's fixed ``P(0) = 0.885``;
    add-one smoothing keeps every symbol encodable.
    """
    counts = torch.bincount(_symbols(q_RC).flatten(), minlength=9).double() + 1
    return (counts / counts.sum()).float()


def _key(probs: torch.Tensor | tuple[float, ...] | None) -> tuple[float, ...]:
    if probs is None:
        return paper_probabilities()
    if isinstance(probs, torch.Tensor):
        if probs.shape != (9,) or not bool(torch.isfinite(probs).all()) or bool((probs <= 0).any()):
            raise CheckpointError(f"symbol probabilities must be 9 positive finite values, got {probs.tolist()}")
        return tuple(float(v) for v in probs.float().tolist())
    return tuple(float(v) for v in probs)


@lru_cache(maxsize=4)
def _trie(sym_p: tuple[float, ...], num_codes: int = NUM_CODES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(child_N9, leaf_id_N, codebook)`` of the Tunstall trie grown from the symbol probabilities ``sym_p``.

    Deterministic in ``sym_p`` (ties in the priority queue go to the older node), so a file that stores only the
    9 probabilities rebuilds exactly the dictionary it was encoded with.
    """
    parent, symbol, depth, prob = [-1], [0], [0], [1.0]
    first_child = [-1]
    heap = [(-1.0, 0)]
    leaves = 1
    while heap and leaves + 8 <= num_codes:
        _, node = heapq.heappop(heap)
        if depth[node] >= MAX_SYMBOLS:
            continue  # too long to expand: stays a leaf
        first_child[node] = len(parent)
        for s in range(9):
            parent.append(node)
            symbol.append(s)
            depth.append(depth[node] + 1)
            prob.append(prob[node] * sym_p[s])
            first_child.append(-1)
            heapq.heappush(heap, (-prob[-1], len(parent) - 1))
        leaves += 8
    first = torch.tensor(first_child, dtype=torch.long)
    child = torch.where(first[:, None] >= 0, first[:, None] + torch.arange(9), torch.full((1, 9), -1))
    is_leaf = first < 0
    leaf_id = torch.full((len(parent),), -1, dtype=torch.long)
    leaf_nodes = is_leaf.nonzero().flatten()
    leaf_id[leaf_nodes] = torch.arange(len(leaf_nodes))
    par, sym, dep = torch.tensor(parent), torch.tensor(symbol), torch.tensor(depth)
    book = torch.zeros(len(leaf_nodes), 1 + MAX_SYMBOLS, dtype=torch.uint8)
    book[:, 0] = dep[leaf_nodes].to(torch.uint8)
    at, pos = leaf_nodes.clone(), dep[leaf_nodes].clone()  # walk every leaf up to the root at once
    rows = torch.arange(len(leaf_nodes))
    while bool((pos > 0).any()):
        live = pos > 0
        book[rows[live], pos[live]] = sym[at[live]].to(torch.uint8)
        at = torch.where(live, par[at].clamp_min(0), at)
        pos = torch.where(live, pos - 1, pos)
    return child, leaf_id, book


@lru_cache(maxsize=64)
def _book(sym_p: tuple[float, ...]) -> torch.Tensor:
    return _trie(sym_p)[2]


def build_codebook(probs: torch.Tensor | tuple[float, ...] | None = None) -> torch.Tensor:
    """The codebook ``[codes, 1 + 14]`` uint8 (length, then symbols): the paper's (``probs=None``) or one grown
    from 9 symbol probabilities (:func:`symbol_probabilities`)."""
    return _book(_key(probs)).clone()


def codebook_for(probs: torch.Tensor | None) -> torch.Tensor:
    """Like :func:`build_codebook` without the copy (read-only use by the decoder; cached)."""
    return _book(_key(probs))


def _symbols(q_RC: torch.Tensor) -> torch.Tensor:
    C = q_RC.shape[1]
    q = torch.nn.functional.pad(q_RC.long(), (0, C % 2), value=1)
    return q[:, 0::2] * 3 + q[:, 1::2]


def encode_rows(q_RC: torch.Tensor, probs: torch.Tensor | tuple[float, ...] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes ``[R, C]`` in {0, 1, 2} -> ``(codes_N int16, offsets_{R+1} int64)``, with the dictionary of
    ``probs`` (None: the paper's)."""
    if q_RC.numel() and (q_RC.min() < 0 or q_RC.max() > 2):
        raise ValueError("the codec takes ternary codes 0, 1, 2")
    return _encode_symbols(_symbols(q_RC), probs)


def _encode_symbols(sym_RL: torch.Tensor, probs: torch.Tensor | tuple[float, ...] | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every row of symbols ``[R, L]`` on its own, all rows in lockstep."""
    child, leaf_id, _ = _trie(_key(probs))
    R, L = sym_RL.shape
    node = torch.zeros(R, dtype=torch.long)
    rows, steps, codes = [], [], []
    all_rows = torch.arange(R)

    def emit(t: int) -> None:
        nonlocal node
        done = leaf_id[node] >= 0
        rows.append(all_rows[done])
        steps.append(torch.full((int(done.sum()),), t))
        codes.append(leaf_id[node[done]])
        node = torch.where(done, 0, node)

    for t in range(L):
        node = child[node, sym_RL[:, t]]
        emit(t)
    while bool((node != 0).any()):  # complete unfinished rows with zero symbols
        node = torch.where(node != 0, child[node, ZERO_SYMBOL].clamp_min(0), node)
        emit(L)
    row, step, code = torch.cat(rows), torch.cat(steps), torch.cat(codes)
    order = torch.argsort(row * (L + 1) + step, stable=True)
    offsets = torch.zeros(R + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.bincount(row, minlength=R), 0)
    return (code[order] - OFFSET).to(torch.int16), offsets


def decode_rows(codes_N: torch.Tensor, offsets: torch.Tensor, cols: int, codebook: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_rows`: int64 codes ``[R, cols]``."""
    R, L = offsets.numel() - 1, (cols + 1) // 2
    out_RL = _decode_symbols(codes_N, offsets, L, codebook)
    return torch.stack([out_RL // 3, out_RL % 3], dim=-1).view(R, 2 * L)[:, :cols]


def _decode_symbols(codes_N: torch.Tensor, offsets: torch.Tensor, L: int, codebook: torch.Tensor) -> torch.Tensor:
    """Symbols ``[R, L]`` of a stream whose row ``r`` holds codes ``offsets[r]:offsets[r+1]``."""
    R = offsets.numel() - 1
    ids = codes_N.long() + OFFSET
    entries = codebook[ids].long()
    lens_N, syms_NW = entries[:, 0], entries[:, 1:]
    row_N = torch.repeat_interleave(torch.arange(R), offsets[1:] - offsets[:-1])
    ends = torch.cumsum(lens_N, 0)
    starts = ends - lens_N
    row_first = torch.zeros(R + 1, dtype=torch.long)
    row_first[1:] = torch.cumsum(torch.zeros(R, dtype=torch.long).index_add_(0, row_N, lens_N), 0)
    start_in_row = starts - row_first[row_N]
    j = torch.arange(MAX_SYMBOLS)
    pos_NW = start_in_row[:, None] + j
    keep = (j < lens_N[:, None]) & (pos_NW < L)
    out_RL = torch.full((R, L), ZERO_SYMBOL, dtype=torch.long)
    out_RL[row_N[:, None].expand_as(pos_NW)[keep], pos_NW[keep]] = syms_NW[keep]
    return out_RL


def row_offsets(codes_N: torch.Tensor, rows: int, cols: int, codebook: torch.Tensor) -> torch.Tensor:
    """Recover the per-row offsets ``[rows + 1]`` of a stream of :func:`encode_rows` codes without storing them.

    Every row starts at the trie's root and its last codeword is the first whose cumulative length reaches the
    row's ``ceil(cols / 2)`` symbols (only that one can carry padding), so the boundaries follow from the
    codeword lengths alone: one binary search per row.
    """
    return _segment_offsets(codes_N, rows, (cols + 1) // 2, codebook)


def _segment_offsets(codes_N: torch.Tensor, rows: int, L: int, codebook: torch.Tensor) -> torch.Tensor:
    lens = codebook[codes_N.long() + OFFSET, 0].long()
    ends = torch.cumsum(lens, 0).tolist()
    offsets, start, base = [0], 0, 0
    for _ in range(rows):
        k = bisect.bisect_left(ends, base + L, lo=start)
        if k >= len(ends):
            raise CheckpointError(f"the code stream ends inside row {len(offsets) - 1} of {rows}; the file is corrupt")
        base, start = ends[k], k + 1
        offsets.append(start)
    if start != len(ends):
        raise CheckpointError(f"the code stream holds {len(ends) - start} codes after its {rows} rows; the file is "
                              f"corrupt")
    return torch.tensor(offsets, dtype=torch.long)


SEGMENT_ROWS = 16


def segment_rows(rows: int) -> int:
    """Rows per independently coded segment of a ``tunstall-fit`` matrix: ``gcd(rows, 16)``, so segments never
    straddle two experts and the per-segment padding (at most one codeword) is spread over up to 16 rows."""
    return math.gcd(rows, SEGMENT_ROWS)


def encode_matrix(q_RC: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
    """``tunstall-fit`` stream of ternary codes ``[R, C]`` (R a multiple of :func:`segment_rows`): the rows'
    symbols are concatenated in groups of ``segment_rows(R)`` rows and each group coded on its own."""
    if q_RC.numel() and (q_RC.min() < 0 or q_RC.max() > 2):
        raise ValueError("the codec takes ternary codes 0, 1, 2")
    sym_RL = _symbols(q_RC)
    R, L = sym_RL.shape
    k = segment_rows(R)
    return _encode_symbols(sym_RL.reshape(R // k, k * L), probs)[0]


def decode_matrix(codes_N: torch.Tensor, rows: int, cols: int, codebook: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_matrix` for one matrix of ``rows`` rows: int64 codes ``[rows, cols]``."""
    k, L = segment_rows(rows), (cols + 1) // 2
    offsets = _segment_offsets(codes_N, rows // k, k * L, codebook)
    out_RL = _decode_symbols(codes_N, offsets, k * L, codebook).view(rows, L)
    return torch.stack([out_RL // 3, out_RL % 3], dim=-1).view(rows, 2 * L)[:, :cols]


def check_codebook(book: torch.Tensor, where: str) -> None:
    if book.dim() != 2 or book.shape[1] != 1 + MAX_SYMBOLS or book.dtype != torch.uint8 or book.shape[0] > NUM_CODES:
        raise CheckpointError(f"{where}: the codebook is {tuple(book.shape)} {book.dtype}; expected "
                              f"[<= {NUM_CODES}, {1 + MAX_SYMBOLS}] uint8")
    lens = book[:, 0]
    if bool((lens < 1).any()) or bool((lens > MAX_SYMBOLS).any()) or bool((book[:, 1:] > 8).any()):
        raise CheckpointError(f"{where}: the codebook holds invalid codewords; the file is corrupt")


def to_tunstall(bank: CompressedBank, *, fit: bool = False) -> CompressedBank:
    """A ``ternary`` :class:`~.bank.CompressedBank` re-stored entropy-coded; lossless.

    ``fit=False``: format ``tunstall``, the paper's layout: the paper's fixed dictionary (shared by the model, set
    as ``bank.codebook``) and per-row code counts. ``fit=True``: format ``tunstall-fit``: each matrix gets a
    dictionary grown from its own measured symbol frequencies (stored as 9 float32 probabilities, ``m_probs``;
    the loader regrows the dictionary from them), rows are coded in segments of :func:`segment_rows` rows
    (:func:`encode_matrix`), and only per-expert code counts are stored, since segment boundaries follow from
    the codeword lengths.
    """
    from .bank import BankSpec, CompressedBank
    s = bank.spec
    if s.format != "ternary":
        raise ValueError(f"only ternary banks can be entropy-coded, not {s.format!r}")
    streams, offsets, probs = {}, {}, {}
    for m, (R, _) in s.matrices().items():
        q = torch.cat([bank.codes(m, g) for g in range(s.num_stored)])
        probs[m] = symbol_probabilities(q) if fit else None
        if fit:
            per_expert = [encode_matrix(q[g * R:(g + 1) * R], probs[m]) for g in range(s.num_stored)]
            streams[m] = torch.cat(per_expert)
            offsets[m] = torch.tensor([len(c) for c in per_expert], dtype=torch.int32)
        else:
            streams[m], offsets[m] = encode_rows(q, probs[m])
    spec = BankSpec(num_experts=s.num_experts, num_stored=s.num_stored, dim=s.dim, hidden_dim=s.hidden_dim,
                    activation=s.activation, use_bias=s.use_bias, format="tunstall-fit" if fit else "tunstall",
                    bits=2, num_codes={m: int(v.numel()) for m, v in streams.items()})
    new = CompressedBank(spec)
    with torch.no_grad():
        for name, buf in bank.named_buffers():
            if not name.endswith("_planes"):
                getattr(new, name).copy_(buf)
        for m, stream in streams.items():
            getattr(new, f"{m}_codes").copy_(stream)
            if fit:
                getattr(new, f"{m}_ncodes").copy_(offsets[m])
                getattr(new, f"{m}_probs").copy_(probs[m])
                continue
            counts = offsets[m][1:] - offsets[m][:-1]
            assert int(counts.max()) < 2 ** 15, "rows too long for int16 code counts"
            getattr(new, f"{m}_counts").copy_(counts)
    if not fit:
        new.codebook = build_codebook()
    return new
