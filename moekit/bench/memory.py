"""Memory estimates that let benchmarks and studies refuse what does not fit, before they start (issue 20).

Dim legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token, B batch, S sequence,
V vocabulary, L layers.

The estimates are deliberately simple upper-bound-ish sums (float32 unless said), meant to catch shapes that
are off by a large factor (a typo'd token count, a study scaled up beyond the machine) rather than to predict
the peak exactly:

- layer benchmark: every candidate's weights and weight gradients, plus per candidate the forward+backward
  temporaries of ``T`` tokens (gathered inputs, the ``T*K x F`` gate/up/activation products and their
  gradients, the outputs), held one candidate at a time;
- training run: weights, gradients and the two AdamW moments (4 copies of the parameters) plus the
  activations autograd keeps for a micro-batch (per layer about ``12 D + 4 K F`` floats per token for the
  block, ``3 V`` per token for the logits and their softmax), times the processes that run at once.
"""

from __future__ import annotations

import os

from ..configs import ConfigError

__all__ = ["available_memory_bytes", "layer_bench_bytes", "training_bytes", "check_fits", "format_bytes"]


def available_memory_bytes() -> int | None:
    """Memory the kernel says a new process can use without swapping (``MemAvailable``), or ``None``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def layer_bench_bytes(dim: int, hidden_dim: int, num_experts: int, top_k: int, shared: int, tokens: int,
                      candidates: int, element_size: int = 4) -> int:
    """Estimated peak bytes of ``moekit bench`` on one shape with ``candidates`` MoE implementations."""
    active = (top_k + shared) * hidden_dim
    moe_params = 3 * num_experts * hidden_dim * dim + 3 * shared * hidden_dim * dim + num_experts * dim
    weights = (candidates * moe_params + 3 * active * dim) * 2  # weights and their gradients
    # the input, its gradient, the random upstream gradient, the output; per assignment: gathered input and
    # output rows, gate/up/activation products and their gradients (the transformers candidates keep more)
    per_token = 6 * dim + top_k * (2 * dim + 6 * hidden_dim) + shared * 6 * hidden_dim + 2 * num_experts
    return (weights + 2 * tokens * per_token) * element_size


def training_bytes(cfg, processes: int = 1) -> int:
    """Estimated peak bytes of training ``cfg`` (a :class:`~moekit.training.RunConfig`) in ``processes``
    processes at once."""
    from ..models import count

    m, tc = cfg.model, cfg.train
    params = count(m).total_params
    tokens = tc.batch_size * m.context
    moe = m.moe  # the larger of a sparse and a dense layer's feed-forward activations, for every layer
    ffn = 4 * m.resolved_dense_hidden_dim
    if moe is not None:
        ffn = max(ffn, 4 * moe.active_hidden + 2 * moe.top_k * m.dim + 2 * moe.num_experts)
    per_token = m.num_layers * (12 * m.dim + ffn) + 3 * m.vocab_size
    return processes * 4 * (4 * params + tokens * per_token)


def check_fits(estimate: int, what: str, fix: str, available: int | None = None) -> None:
    """Raise :class:`~moekit.configs.ConfigError` when ``estimate`` exceeds the available memory.

    ``available`` defaults to :func:`available_memory_bytes`; an unknown amount lets everything through.
    """
    available = available_memory_bytes() if available is None else available
    if available is not None and estimate > available:
        raise ConfigError(f"{what} needs about {format_bytes(estimate)} of memory (estimated), but this machine "
                          f"has {format_bytes(available)} available; {fix}")
