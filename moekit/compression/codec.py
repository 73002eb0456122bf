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

import heapq
from functools import lru_cache

import torch

from ..training.checkpoint import CheckpointError

__all__ = ["MAX_SYMBOLS", "P_ZERO", "build_codebook", "check_codebook", "decode_rows", "encode_rows", "to_tunstall"]

P_ZERO, NUM_CODES, MAX_SYMBOLS, ZERO_SYMBOL, OFFSET = 0.885, 65536, 14, 4, 32768


@lru_cache(maxsize=2)
def _trie(p_zero: float = P_ZERO, num_codes: int = NUM_CODES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(child_N9, leaf_id_N, codebook)`` of the Tunstall trie."""
    p = [(1 - p_zero) / 2, p_zero, (1 - p_zero) / 2]
    sym_p = [p[s // 3] * p[s % 3] for s in range(9)]
    children: list[list[int]] = [[-1] * 9]
    depth, prob = [0], [1.0]
    path: list[tuple[int, ...]] = [()]
    heap = [(-1.0, 0)]
    leaves = 1
    while heap and leaves + 8 <= num_codes:
        _, node = heapq.heappop(heap)
        if depth[node] >= MAX_SYMBOLS:
            continue  # too long to expand: stays a leaf
        for s in range(9):
            children[node][s] = len(children)
            children.append([-1] * 9)
            depth.append(depth[node] + 1)
            prob.append(prob[node] * sym_p[s])
            path.append(path[node] + (s,))
            heapq.heappush(heap, (-prob[-1], len(children) - 1))
        leaves += 8
    child = torch.tensor(children, dtype=torch.long)
    is_leaf = (child < 0).all(dim=1)
    leaf_id = torch.full((len(children),), -1, dtype=torch.long)
    leaf_nodes = is_leaf.nonzero().flatten()
    leaf_id[leaf_nodes] = torch.arange(len(leaf_nodes))
    book = torch.zeros(len(leaf_nodes), 1 + MAX_SYMBOLS, dtype=torch.uint8)
    for i, n in enumerate(leaf_nodes.tolist()):
        book[i, 0] = depth[n]
        book[i, 1:1 + depth[n]] = torch.tensor(path[n], dtype=torch.uint8)
    return child, leaf_id, book


def build_codebook() -> torch.Tensor:
    """The shared codebook ``[codes, 1 + 14]`` uint8 (length, then symbols)."""
    return _trie()[2].clone()


def _symbols(q_RC: torch.Tensor) -> torch.Tensor:
    C = q_RC.shape[1]
    q = torch.nn.functional.pad(q_RC.long(), (0, C % 2), value=1)
    return q[:, 0::2] * 3 + q[:, 1::2]


def encode_rows(q_RC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes ``[R, C]`` in {0, 1, 2} -> ``(codes_N int16, offsets_{R+1} int64)``."""
    if q_RC.numel() and (q_RC.min() < 0 or q_RC.max() > 2):
        raise ValueError("the codec takes ternary codes 0, 1, 2")
    child, leaf_id, _ = _trie()
    sym_RL = _symbols(q_RC)
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
    R = offsets.numel() - 1
    L = (cols + 1) // 2
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
    q = torch.stack([out_RL // 3, out_RL % 3], dim=-1).view(R, 2 * L)
    return q[:, :cols]


def check_codebook(book: torch.Tensor, where: str) -> None:
    if book.dim() != 2 or book.shape[1] != 1 + MAX_SYMBOLS or book.dtype != torch.uint8 or book.shape[0] > NUM_CODES:
        raise CheckpointError(f"{where}: the codebook is {tuple(book.shape)} {book.dtype}; expected "
                              f"[<= {NUM_CODES}, {1 + MAX_SYMBOLS}] uint8")
    lens = book[:, 0]
    if bool((lens < 1).any()) or bool((lens > MAX_SYMBOLS).any()) or bool((book[:, 1:] > 8).any()):
        raise CheckpointError(f"{where}: the codebook holds invalid codewords; the file is corrupt")


def to_tunstall(bank):
    """A ``ternary`` :class:`~.bank.CompressedBank` re-stored entropy-coded (``tunstall``); lossless."""
    from .bank import BankSpec, CompressedBank
    s = bank.spec
    if s.format != "ternary":
        raise ValueError(f"only ternary banks can be entropy-coded, not {s.format!r}")
    streams, offsets = {}, {}
    for m in s.matrices():
        q = torch.cat([bank.codes(m, g) for g in range(s.num_stored)])
        streams[m], offsets[m] = encode_rows(q)
    spec = BankSpec(num_experts=s.num_experts, num_stored=s.num_stored, dim=s.dim, hidden_dim=s.hidden_dim,
                    activation=s.activation, use_bias=s.use_bias, format="tunstall", bits=2,
                    num_codes={m: int(v.numel()) for m, v in streams.items()})
    new = CompressedBank(spec)
    with torch.no_grad():
        for name, buf in bank.named_buffers():
            if not name.endswith("_planes"):
                getattr(new, name).copy_(buf)
        for m, stream in streams.items():
            getattr(new, f"{m}_codes").copy_(stream)
            counts = offsets[m][1:] - offsets[m][:-1]
            assert int(counts.max()) < 2 ** 15, "rows too long for int16 code counts"
            getattr(new, f"{m}_counts").copy_(counts)
    new.codebook = build_codebook()
    return new
