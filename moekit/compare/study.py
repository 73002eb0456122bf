"""A study: the arms (presets plus overrides) to compare under one budget, on the same data and seeds.

A study is a TOML file. Shipped studies live in ``moekit/recipes/studies/`` (``moekit compare --list``);
users write their own and pass the path. The format::

    description = "one line"
    claim = "what the paper says should happen (shown in the report)"
    base = "default"            # preset under every arm that is not a complete preset itself
    reference = "dense"         # the arm whose loss the others are compared with (paired by seed)
    seeds = [0, 1, 2]
    metrics = ["experts_per_token"]   # variant statistics to tabulate (keys of the per-layer routing stats)
    evals = 8                   # validation points per run (equal-tokens / equal-FLOPs budgets)

    [budget]
    kind = "flops"              # "tokens" (same tokens), "flops" (same training FLOPs) or "time" (same seconds)
    flops = 6e12                # or tokens = 1_000_000, or seconds = 120
    # clock = "cpu"             # time budgets only: "wall" (default) or "cpu" (training-step CPU seconds)

    [overrides]                 # every arm; dotted keys or nested tables
    "model.dim" = 128

    [[arms]]
    name = "dense"
    preset = "dense"            # default: the base
    overrides = { "model.dense_hidden_dim" = 512 }

    [[arms]]
    name = "routers"
    preset = "drllm"
    init_from = "dense"         # start from that arm's trained weights (same seed); see below
    overrides = { "model.depth_routing.stage" = "routers" }

    [quick]                     # --quick: a seconds-long version for tests and smoke checks
    seeds = [0]
    budget = { kind = "flops", flops = 2e9 }
    overrides = { "model.dim" = 32 }          # laid over every arm after its own overrides
    arms = { dense = { "model.dense_hidden_dim" = 128 } }

How an arm's config is built: the arm's preset (a *complete* preset, with ``model.dim``, stands alone; a
variant preset such as ``coe`` that only sets the feed-forward is laid over ``base``), then the study's
``overrides``, the arm's ``overrides``, in quick mode the quick ``overrides`` and the quick arm overrides,
then command-line overrides. The seed and the budget come last (see :mod:`moekit.compare.plan`).

Two-stage arms (``init_from``): the arm's runs start from the final weights of the named arm's run with the same
seed, which trains first (a paper's "train the base, then add X to it": Dr.LLM's routers on a trained model).
Every tensor of that run must load into the arm's model with the same shape; tensors the arm adds (new routers)
keep their fresh initialisation. The source arm must itself train from scratch (one level), and stays in the
study's comparison like any arm. What the arm trains is up to its config (e.g. ``stage = "routers"`` freezes the
base); its budget counts its own steps only.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from ..configs import ConfigError, check, check_choice
from ..recipes import read_toml

__all__ = ["Budget", "Arm", "Study", "load_study", "list_studies", "flatten_overrides"]

BudgetKind = Literal["tokens", "flops", "time"]
BUDGET_KINDS = ("tokens", "flops", "time")
TIME_CLOCKS = ("wall", "cpu")
_BUDGET_FIELD = {"tokens": "tokens", "flops": "flops", "time": "seconds"}


@dataclass(frozen=True, kw_only=True, slots=True)
class Budget:
    """What every arm gets the same amount of.

    Attributes:
        kind: ``tokens``: equal training tokens; ``flops``: equal training FLOPs (forward + backward, from
            :func:`moekit.models.count`), so an arm with more FLOPs per token takes fewer steps; ``time``:
            equal time (``train.max_seconds``, counted by ``clock``).
        amount: tokens, FLOPs or seconds.
        clock: time budgets only (``train.time_clock``): ``wall`` counts wall time of training and validation,
            which is only fair on an otherwise idle machine; ``cpu`` counts each run's CPU seconds in training
            steps, which other jobs on a shared machine do not eat into (run with ``--threads 1``).
    """

    kind: BudgetKind
    amount: float
    clock: Literal["wall", "cpu"] = "wall"

    def __post_init__(self) -> None:
        check_choice("budget", "kind", self.kind, BUDGET_KINDS)
        check(self.amount > 0, f"budget {_BUDGET_FIELD[self.kind]}={self.amount} must be positive")
        check_choice("budget", "clock", self.clock, TIME_CLOCKS)
        check(self.kind == "time" or self.clock == "wall",
              f"budget clock={self.clock!r} applies to time budgets only (kind = \"time\"), not kind={self.kind!r}; "
              f"remove clock or set kind = \"time\"")

    @classmethod
    def from_table(cls, table: Any, where: str) -> "Budget":
        if not isinstance(table, dict) or "kind" not in table:
            raise ConfigError(f"{where} must be a table like {{kind = \"flops\", flops = 1e12}} "
                              f"(kinds: {', '.join(BUDGET_KINDS)})")
        kind = table["kind"]
        check_choice(where, "kind", kind, BUDGET_KINDS)
        key = _BUDGET_FIELD[kind]
        extra = set(table) - {"kind", key, "clock"}  # a clock on another kind: Budget says why not
        allowed = f"{key} = ..." + (" (and optionally clock = \"wall\" or \"cpu\")" if kind == "time" else "")
        check(key in table and not extra, f"{where} of kind {kind!r} takes exactly one amount, {allowed}; "
                                          f"got keys {sorted(table)}")
        try:
            amount = float(table[key])
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.{key}={table[key]!r} is not a number") from None
        return cls(kind=kind, amount=amount, clock=table.get("clock", "wall"))

    def describe(self) -> str:
        if self.kind == "tokens":
            return f"equal training tokens ({self.amount:,.0f} per run)"
        if self.kind == "flops":
            return f"equal training FLOPs ({self.amount:.3g} per run)"
        if self.clock == "cpu":
            return f"equal CPU time ({self.amount:g} CPU seconds of training steps per run)"
        return f"equal wall time ({self.amount:g} s of training per run)"


@dataclass(frozen=True, kw_only=True, slots=True)
class Arm:
    """One configuration under comparison: a preset plus dotted overrides."""

    name: str
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # another arm whose trained weights (same seed) this arm starts from

    def __post_init__(self) -> None:
        check(bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name),
              f"arm name {self.name!r} must be non-empty and use letters, digits, '-', '_' or '.' only "
              f"(it names the run folders)")


@dataclass(frozen=True, kw_only=True, slots=True)
class Study:
    """A parsed study file (see the module docstring for the format)."""

    name: str
    description: str = ""
    claim: str = ""
    base: str = "default"
    reference: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    metrics: tuple[str, ...] = ()
    evals: int = 8
    budget: Budget
    overrides: dict[str, Any] = field(default_factory=dict)
    arms: tuple[Arm, ...]
    source: str = ""
    quick: bool = False

    def __post_init__(self) -> None:
        names = [a.name for a in self.arms]
        check(len(names) >= 1, f"study {self.name!r} has no [[arms]]; add at least one")
        check(len(set(names)) == len(names), f"study {self.name!r}: arm names repeat ({names}); make them unique")
        check(self.reference is None or self.reference in names,
              f"study {self.name!r}: reference={self.reference!r} is not an arm (arms: {names})")
        check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds),
              f"study {self.name!r}: seeds={list(self.seeds)} must be a non-empty list of distinct integers")
        check(self.evals >= 1, f"study {self.name!r}: evals={self.evals} must be >= 1")
        by_name = {a.name: a for a in self.arms}
        for a in self.arms:
            if a.init_from is None:
                continue
            check(a.init_from != a.name, f"study {self.name!r}: arm {a.name!r} has init_from={a.init_from!r}, "
                                         f"itself; name the arm whose trained weights it starts from")
            check(a.init_from in by_name, f"study {self.name!r}: arm {a.name!r} has init_from={a.init_from!r}, "
                                          f"which is not an arm (arms: {names})")
            check(by_name[a.init_from].init_from is None,
                  f"study {self.name!r}: arm {a.name!r} starts from arm {a.init_from!r}, which itself starts "
                  f"from {by_name[a.init_from].init_from!r}; init_from must name an arm trained from scratch")

    def with_budget(self, amount: float | None = None, clock: str | None = None) -> "Study":
        """The study with its budget amount (tokens, FLOPs or seconds, per its kind) and/or clock replaced."""
        b = self.budget
        return replace(self, budget=Budget(kind=b.kind, amount=b.amount if amount is None else amount,
                                           clock=b.clock if clock is None else clock))  # type: ignore[arg-type]

    def with_arms(self, names: list[str]) -> "Study":
        """The study with only the named arms (in the study's order); the reference arm must stay."""
        known = [a.name for a in self.arms]
        unknown = [n for n in names if n not in known]
        check(not unknown, f"--arms {' '.join(unknown)}: no such arm in study {self.name!r} (arms: {known})")
        check(self.reference is None or self.reference in names,
              f"--arms must keep the reference arm {self.reference!r}: the others are compared with it")
        needed = [f"{a.name} (starts from {a.init_from})" for a in self.arms
                  if a.name in names and a.init_from is not None and a.init_from not in names]
        check(not needed, f"--arms must keep the arms that others start from: {', '.join(needed)}; add them")
        return replace(self, arms=tuple(a for a in self.arms if a.name in names))

    def with_seeds(self, num_seeds: int) -> "Study":
        """The first ``num_seeds`` seeds of the study (continued 0, 1, 2, ... past its own list)."""
        check(num_seeds >= 1, f"--seeds {num_seeds} must be >= 1")
        seeds = list(self.seeds[:num_seeds])
        candidate = 0
        while len(seeds) < num_seeds:
            if candidate not in seeds:
                seeds.append(candidate)
            candidate += 1
        return replace(self, seeds=tuple(seeds))


def flatten_overrides(table: Any, where: str, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"dim": 64}, "train.lr": 1e-3}`` -> ``{"model.dim": 64, "train.lr": 1e-3}``."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table of config overrides, got {table!r}")
    out = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            out.update(flatten_overrides(value, where, dotted))
        else:
            out[dotted] = value
    return out


_TOP_KEYS = ("description", "claim", "base", "reference", "seeds", "metrics", "evals", "budget", "overrides",
             "arms", "quick")


def study_from_dict(data: dict[str, Any], name: str, source: str = "", quick: bool = False) -> Study:
    """A :class:`Study` from a parsed TOML file; ``quick`` applies its ``[quick]`` table."""
    for key in data:
        if key not in _TOP_KEYS:
            close = difflib.get_close_matches(key, _TOP_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"study {name!r}: unknown key {key!r}{hint} (valid: {', '.join(_TOP_KEYS)})")
    if "budget" not in data:
        raise ConfigError(f"study {name!r} has no [budget] table; add e.g. budget = {{kind = \"tokens\", "
                          f"tokens = 1000000}}")
    raw_arms = data.get("arms")
    if not isinstance(raw_arms, list) or not all(isinstance(a, dict) for a in raw_arms):
        raise ConfigError(f"study {name!r}: arms must be an array of tables ([[arms]] name = ..., preset = ...)")
    arms = []
    for i, a in enumerate(raw_arms):
        unknown = set(a) - {"name", "preset", "overrides", "init_from"}
        check(not unknown, f"study {name!r}: arm {i} has unknown keys {sorted(unknown)} "
                           f"(valid: name, preset, overrides, init_from)")
        check("name" in a, f"study {name!r}: arm {i} has no name")
        init_from = a.get("init_from")
        check(init_from is None or isinstance(init_from, str),
              f"study {name!r}: arm {a['name']!r} has init_from={init_from!r}; give the name of another arm")
        arms.append(Arm(name=str(a["name"]), preset=a.get("preset"), init_from=init_from,
                        overrides=flatten_overrides(a.get("overrides", {}), f"arms.{a['name']}.overrides")))
    fields: dict[str, Any] = dict(
        name=name, description=str(data.get("description", "")), claim=str(data.get("claim", "")),
        base=str(data.get("base", "default")), reference=data.get("reference"),
        seeds=tuple(int(s) for s in data.get("seeds", (0, 1, 2))),
        metrics=tuple(str(m) for m in data.get("metrics", ())), evals=int(data.get("evals", 8)),
        budget=Budget.from_table(data["budget"], "budget"),
        overrides=flatten_overrides(data.get("overrides", {}), "overrides"), arms=tuple(arms), source=source)
    if quick:
        fields = _apply_quick(fields, data.get("quick"), name)
    return Study(**fields)


def _apply_quick(fields: dict[str, Any], quick: Any, name: str) -> dict[str, Any]:
    if not isinstance(quick, dict):
        raise ConfigError(f"study {name!r} has no [quick] table, so --quick cannot shrink it; add one "
                          f"(seeds, budget, overrides, arms) or run without --quick")
    unknown = set(quick) - {"seeds", "budget", "overrides", "arms", "evals"}
    check(not unknown, f"study {name!r}: [quick] has unknown keys {sorted(unknown)} "
                       f"(valid: seeds, budget, overrides, arms, evals)")
    common = flatten_overrides(quick.get("overrides", {}), "quick.overrides")
    per_arm = quick.get("arms", {})
    names = [a.name for a in fields["arms"]]
    for arm in per_arm:
        check(arm in names, f"study {name!r}: quick.arms.{arm} names no arm (arms: {names})")
    fields["arms"] = tuple(
        replace(a, overrides={**a.overrides, **common,
                              **flatten_overrides(per_arm.get(a.name, {}), f"quick.arms.{a.name}")})
        for a in fields["arms"])
    if "seeds" in quick:
        fields["seeds"] = tuple(int(s) for s in quick["seeds"])
    if "budget" in quick:
        fields["budget"] = Budget.from_table(quick["budget"], "quick.budget")
    if "evals" in quick:
        fields["evals"] = int(quick["evals"])
    fields["name"], fields["quick"] = f"{name}-quick", True
    return fields


def _study_files() -> dict[str, Any]:
    root = resources.files("moekit.recipes").joinpath("studies")
    return {e.name[:-5]: e for e in root.iterdir() if e.name.endswith(".toml")}


def list_studies() -> list[tuple[str, str]]:
    """``(name, description)`` of every shipped study, sorted by name."""
    return [(n, str(read_toml(e, e.read_text()).get("description", ""))) for n, e in sorted(_study_files().items())]


def load_study(name_or_path: str | Path, quick: bool = False) -> Study:
    """A shipped study by name (``moe-vs-dense``) or a study TOML file by path."""
    text_name = str(name_or_path)
    files = _study_files()
    if text_name in files:
        entry = files[text_name]
        return study_from_dict(read_toml(entry, entry.read_text()), text_name, text_name, quick)
    path = Path(text_name)
    if path.suffix == ".toml" or path.exists():
        return study_from_dict(read_toml(path), path.stem, str(path), quick)
    close = difflib.get_close_matches(text_name, list(files), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown study {text_name!r}{hint}; shipped studies: {', '.join(sorted(files))} "
                      f"(or give the path of a study .toml file)")
