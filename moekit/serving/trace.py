"""Expert-access traces: record them while generating, save and load them, and profile an affinity table.

A trace is the sequence of forward passes of an offloaded model; each pass lists, per offloaded MoE layer, the
experts its tokens used and the experts the next layer's router predicted from this layer's input::

    {"format": "moekit-expert-trace", "version": 1,
     "model": {"num_experts": [E_0, ...], "expert_bytes": [bytes_0, ...]},
     "steps": [[{"experts": [0, 3], "predicted": [1, 3]}, ...], ...]}

The ``model`` part identifies the model a trace belongs to (experts and bytes per layer); replaying a trace on
another model is refused.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cache import Key
from .offload import Offload, load_offloaded
from .sampling import generate

__all__ = ["Trace", "affinity_table", "load_trace", "record_trace", "save_trace", "trace_of"]

_FORMAT = "moekit-expert-trace"


@dataclass
class Trace:
    """Recorded expert accesses (see the module docstring)."""

    num_experts: list[int]
    expert_bytes: list[int]
    steps: list[list[dict]] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.num_experts)

    def accesses(self) -> list[Key]:
        """Every demand access in order: ``(layer, expert)`` per expert per layer per step."""
        return [(layer, e) for step in self.steps for layer, entry in enumerate(step) for e in entry["experts"]]

    def to_dict(self) -> dict:
        return {"format": _FORMAT, "version": 1,
                "model": {"num_experts": self.num_experts, "expert_bytes": self.expert_bytes}, "steps": self.steps}

    def check_model(self, num_experts: Sequence[int], expert_bytes: Sequence[int], source: str = "trace") -> None:
        """Raise unless the trace was recorded on a model with these experts per layer and bytes per expert."""
        if list(num_experts) != self.num_experts or list(expert_bytes) != self.expert_bytes:
            raise ValueError(f"{source} was recorded on another model (experts per layer {self.num_experts}, "
                             f"bytes per expert {self.expert_bytes}; this run has {list(num_experts)}, "
                             f"{list(expert_bytes)}); record a trace of this run (moekit serve-sim RUN --prompt ...)")


def trace_of(offload: Offload) -> Trace:
    """The trace an :class:`Offload` has recorded so far."""
    store = offload.store
    return Trace([store.num_experts(i) for i in range(offload.num_layers)], list(store.expert_bytes),
                 [list(step) for step in offload.trace])


def record_trace(run_dir: str | Path, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> Trace:
    """Generate greedily from each prompt (one at a time) on the offloaded model and return the accesses."""
    _, model, offload = load_offloaded(run_dir, "100%")
    for ids in prompts:
        offload.new_request()
        generate(model, torch.tensor([list(ids)]), max_new_tokens)
    return trace_of(offload)


def save_trace(path: str | Path, trace: Trace) -> None:
    """Write the trace as JSON, atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(trace.to_dict()) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_trace(path: str | Path) -> Trace:
    """Read and validate a trace file (a clear ``ValueError`` for anything malformed)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace {str(path)!r} does not exist; record one with moekit serve-sim RUN --prompt TEXT "
                         f"--save-trace {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"trace {path} is not JSON ({e}); record it again") from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a moekit expert trace (no \"format\": \"{_FORMAT}\")")
    try:
        model = data["model"]
        num_experts = [int(n) for n in model["num_experts"]]
        expert_bytes = [int(b) for b in model["expert_bytes"]]
        steps = [[{"experts": [int(e) for e in entry["experts"]],
                   "predicted": [int(e) for e in entry.get("predicted", [])]} for entry in step]
                 for step in data["steps"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"trace {path} is malformed ({type(e).__name__}: {e}); record it again") from None
    for t, step in enumerate(steps):
        if len(step) != len(num_experts):
            raise ValueError(f"trace {path}: step {t} has {len(step)} layers, the model has {len(num_experts)}")
        for layer, entry in enumerate(step):
            if any(not 0 <= e < num_experts[layer] for e in entry["experts"] + entry["predicted"]):
                raise ValueError(f"trace {path}: step {t} layer {layer} names an expert outside "
                                 f"0..{num_experts[layer] - 1}")
    return Trace(num_experts, expert_bytes, steps)


def affinity_table(trace: Trace, fanout: int = 2) -> dict[Key, list[int]]:
    """``{(layer, e): the `fanout` experts of layer+1 that most often ran in the same pass after e}``.

    Profiled layer-to-layer transitions (MoETuner's ``T^l_{e,e'}``, ExFlow's inter-layer affinity), used as a
    prefetcher: after layer ``l`` chose experts ``S``, prefetch the union of the table's rows for ``S``.
    """
    counts: dict[Key, Counter] = defaultdict(Counter)
    for step in trace.steps:
        for layer in range(len(step) - 1):
            for e in step[layer]["experts"]:
                counts[(layer, e)].update(step[layer + 1]["experts"])
    return {key: [f for f, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:fanout]]
            for key, c in counts.items()}
