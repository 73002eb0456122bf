"""Engine registry: engines are selected by name; ``auto`` picks the fastest that supports the inputs.

``auto`` ranks the engines that support the inputs by priority (compile-friendly ones first while
``torch.compile`` traces). A priority may depend on the inputs: ``sorted_blocked`` ranks above ``sorted`` on CPU
for experts no wider than the model, where it measured faster, and below it elsewhere.

An engine computes ``y_t = sum_k weights_tk * E_{ids_tk}(x_t)`` over the non-empty slots of a
:class:`~moekit.types.Routing`. Every engine is tested against ``reference``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..experts import ExpertBank
from ..types import Routing

__all__ = ["Engine", "register_engine", "get_engine", "resolve_engine", "ENGINES"]

EngineFn = Callable[[torch.Tensor, Routing, ExpertBank], torch.Tensor]
Priority = int | Callable[[torch.Tensor, ExpertBank], int]  # fixed, or computed from ``(x_TD, bank)``


@dataclass(frozen=True)
class Engine:
    """A named engine. ``supports(x, bank)`` returns None when it can run, else the reason it cannot."""

    name: str
    fn: EngineFn
    supports: Callable[[torch.Tensor, ExpertBank], str | None]
    priority: Priority  # higher is preferred by ``auto``; or ``(x_TD, bank) -> int`` when it depends on the inputs
    compile_friendly: bool = False  # traceable by torch.compile(fullgraph=True): ``auto`` prefers it there

    def __call__(self, x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> torch.Tensor:
        return self.fn(x_TD, routing, bank)

    def rank(self, x_TD: torch.Tensor, bank: ExpertBank) -> int:
        """This engine's priority for these inputs."""
        return self.priority(x_TD, bank) if callable(self.priority) else self.priority


ENGINES: dict[str, Engine] = {}


def _always(x: torch.Tensor, bank: ExpertBank) -> str | None:
    return None


def register_engine(name: str, priority: Priority = 0, supports=_always, compile_friendly: bool = False):
    """Decorator registering ``fn(x_TD, routing, bank) -> y_TD`` under ``name``."""

    def wrap(fn: EngineFn) -> EngineFn:
        ENGINES[name] = Engine(name, fn, supports, priority, compile_friendly)
        return fn

    return wrap


def get_engine(name: str) -> Engine:
    if name not in ENGINES:
        close = difflib.get_close_matches(name, list(ENGINES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown engine {name!r}{hint}; available: {sorted(ENGINES)} or 'auto'")
    return ENGINES[name]


def resolve_engine(name: str, x_TD: torch.Tensor, bank: ExpertBank) -> Engine:
    """The engine to run for ``name`` on these inputs; ``auto`` picks the best supported one (under
    ``torch.compile``, the best compile-friendly one: no graph break inside the layer)."""
    if name == "auto":
        compiling = torch.compiler.is_compiling()
        ranked = sorted(ENGINES.values(), key=lambda e: (-(compiling and e.compile_friendly), -e.rank(x_TD, bank)))
        for engine in ranked:
            if engine.supports(x_TD, bank) is None:
                return engine
        raise RuntimeError("no registered engine supports these inputs")  # reference supports everything
    engine = get_engine(name)
    reason = engine.supports(x_TD, bank)
    if reason is not None:
        raise ValueError(f"engine {name!r} cannot run here: {reason}; use engine='auto' or 'reference'")
    return engine
