"""Summarise an equal-CPU-time study run at several budgets (docs/results.md, sections 12 and 13).

Usage (from the repository root, after `moekit compare STUDY --budget S --out DIR_S` for each budget):

    python docs/results/time_budget_summary.py --name recipes_time /tmp/j29-runs/time-50 /tmp/j29-runs/time-100
    python docs/results/time_budget_summary.py --name default-recipe-time \
        docs/results/default-recipe-time_120_results.json DIR_300 DIR_900

Reads each study's `results.json` (a folder written by `moekit compare`, or a copy of its `results.json`; runs
record the CPU seconds of their training steps at every validation) and writes, next to this script:
- `NAME_val_vs_cpu.png`: validation bits/byte against CPU seconds of training steps, mean ± sd over
  seeds, one line per arm and budget (solid: the largest budget), final values as markers;
- `NAME_vs_budget.png` (two budgets or more): final bits/byte against the budget, mean ± sd over seeds, and
  the paired difference to dense per budget, mean ± sd;
- `NAME_summary.json`: per budget and arm the final bits/byte (mean, sd), the paired difference to
  dense (mean, sd, per seed), steps and tokens reached (mean, min, max), training tokens/s of CPU time and the
  paired difference to dense along the largest budget's curves (each run's curve interpolated linearly in CPU
  seconds onto a common grid, then paired by seed);
and prints the same as Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
REF = "dense"


def _ms(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(m: float, sd: float | None, signed: bool = False) -> str:
    head = f"{m:+.3f}" if signed else f"{m:.3f}"
    return head if sd is None else f"{head} ± {sd:.3f}"


def load(path: Path) -> dict:
    data = json.loads((path / "results.json" if path.is_dir() else path).read_text())
    runs = [r for r in data["runs"] if r["finished"]]
    out: dict = {"budget": data["budget"]["amount"], "clock": data["budget"].get("clock", "wall"), "arms": {}}
    for arm in [a["arm"] for a in data["arms"]]:
        rs = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        if rs:
            out["arms"][arm] = {r["seed"]: r for r in rs}
    return out


def interp(curve: list[tuple[float, float]], t: float) -> float | None:
    """bits/byte at CPU second ``t`` by linear interpolation between validations (None outside the curve)."""
    for (t0, y0), (t1, y1) in zip(curve, curve[1:]):
        if t0 <= t <= t1:
            return y0 if t1 == t0 else y0 + (y1 - y0) * (t - t0) / (t1 - t0)
    return None


def summarise(study: dict) -> dict:
    arms, out = study["arms"], {}
    ref = arms.get(REF, {})
    for arm, runs in arms.items():
        s = [r["summary"] for r in runs.values()]
        bpb = [x["val_bpb"] for x in s]
        row = {"seeds": sorted(runs), "bpb": _ms(bpb), "steps": [x["step"] for x in s],
               "tokens": [x["tokens"] for x in s],
               "tokens_per_cpu_s": _ms([x["tokens"] / x["cpu_time_s"] for x in s]),
               "cpu_time_s": _ms([x["cpu_time_s"] for x in s]), "wall_time_s": _ms([x["wall_time_s"] for x in s]),
               "flops": _ms([x["tokens"] * x["flops_per_token"] for x in s])}
        if arm != REF:
            paired = {seed: runs[seed]["summary"]["val_bpb"] - ref[seed]["summary"]["val_bpb"]
                      for seed in runs if seed in ref}
            row["delta"] = _ms(list(paired.values()))
            row["delta_per_seed"] = paired
        out[arm] = row
    return out


def along(study: dict, step_s: float = 5.0) -> dict:
    """Paired Δ to dense along the curves, on a grid of CPU seconds every run covers."""
    curves = {arm: {seed: [(p["cpu_time"], p["val_bpb"]) for p in r["val_curve"]] for seed, r in runs.items()}
              for arm, runs in study["arms"].items()}
    start = max(c[0][0] for runs in curves.values() for c in runs.values())
    end = min(c[-1][0] for runs in curves.values() for c in runs.values())
    grid, t = [], step_s * (int(start // step_s) + 1)
    while t <= end:
        grid.append(t)
        t += step_s
    out = {}
    for arm, runs in curves.items():
        if arm == REF:
            continue
        rows = []
        for t in grid:
            d = [interp(c, t) - interp(curves[REF][seed], t) for seed, c in runs.items()  # type: ignore[operator]
                 if seed in curves[REF]]
            rows.append((t, *_ms(d)))
        out[arm] = rows
    return out


def plot(studies: list[dict], name: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    biggest = max(s["budget"] for s in studies)
    for study in studies:
        style = "-" if study["budget"] == biggest else "--"
        for i, (arm, runs) in enumerate(study["arms"].items()):
            curves = [[(p["cpu_time"], p["val_bpb"]) for p in r["val_curve"]] for r in runs.values()]
            start, end = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
            grid = [start + (end - start) * k / 40 for k in range(41)]
            vals = [[interp(c, t) for c in curves] for t in grid]
            mean = [statistics.fmean(v) for v in vals]  # type: ignore[arg-type]
            sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]  # type: ignore[arg-type]
            label = f"{arm} ({study['budget']:g} s, n={len(curves)})"
            ax.plot(grid, mean, style, color=colors[i], label=label, lw=1.3)
            ax.fill_between(grid, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                            color=colors[i], alpha=0.15, lw=0)
            finals = [r["summary"]["val_bpb"] for r in runs.values()]
            ax.errorbar([statistics.fmean(r["summary"]["cpu_time_s"] for r in runs.values())],
                        [statistics.fmean(finals)], yerr=[statistics.stdev(finals) if len(finals) > 1 else 0],
                        fmt="o", color=colors[i], ms=4, capsize=3)
    ax.set_xlabel("CPU seconds of training steps per run (one torch thread)")
    ax.set_ylabel("validation bits / byte")
    ax.set_ylim(top=4.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"{name}: equal CPU time, mean ± sd over seeds (markers: final values)", fontsize=9)
    fig.tight_layout()
    fig.savefig(HERE / f"{name}_val_vs_cpu.png", dpi=110)
    plt.close(fig)


def plot_budgets(studies: list[dict], record: dict, name: str) -> None:
    """Final bits/byte and the paired difference to dense against the budget, mean ± sd over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    arms = list(dict.fromkeys(arm for s in studies for arm in s["arms"]))
    budgets = [s["budget"] for s in studies]
    for i, arm in enumerate(arms):
        rows = [record["budgets"][f"{b:g}"].get(arm) for b in budgets]
        pts = [(b, r) for b, r in zip(budgets, rows) if r is not None]
        xs = [b for b, _ in pts]
        for axis, key in ((ax, "bpb"), (bx, "delta")):
            if arm == REF and key == "delta":
                continue
            m = [r[key][0] for _, r in pts]
            sd = [r[key][1] or 0.0 for _, r in pts]
            axis.plot(xs, m, "o-", color=colors[i % len(colors)], label=arm, lw=1.3, ms=4)
            axis.fill_between(xs, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                              color=colors[i % len(colors)], alpha=0.15, lw=0)
    bx.axhline(0.0, color="black", lw=0.8)
    for axis in (ax, bx):
        axis.set_xscale("log")
        axis.minorticks_off()
        axis.set_xticks(budgets, [f"{b:g}" for b in budgets])
        axis.set_xlabel("budget: CPU seconds of training steps per run")
        axis.grid(alpha=0.3)
    ax.set_ylabel("final validation bits / byte")
    bx.set_ylabel("Δ bits / byte vs dense (paired by seed; < 0: MoE ahead)")
    ax.legend(fontsize=8)
    ax.set_title(f"{name}: final value, mean ± sd over seeds", fontsize=9)
    bx.set_title("difference to dense, mean ± sd over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(HERE / f"{name}_vs_budget.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="recipes_time", help="prefix of the files written next to this script")
    p.add_argument("studies", nargs="+", help="study folders written by moekit compare, or their results.json")
    args = p.parse_args(argv)
    studies = sorted((load(Path(f)) for f in args.studies), key=lambda s: s["budget"])
    record: dict = {"budgets": {}}
    for study in studies:
        rows = summarise(study)
        record["budgets"][f"{study['budget']:g}"] = rows
        print(f"\n**{study['budget']:g} CPU seconds**\n")
        print("| arm | bits/byte | Δ vs dense (paired) | per-seed Δ | steps (seeds) | tokens/CPU-s | wall s |")
        print("|---|---|---|---|---|---|---|")
        for arm, r in rows.items():
            delta = _fmt(*r["delta"], signed=True) if "delta" in r else "(reference)"
            per = ", ".join(f"{d:+.3f}" for d in r.get("delta_per_seed", {}).values()) or "-"
            print(f"| {arm} | {_fmt(*r['bpb'])} | {delta} | {per} | {', '.join(map(str, r['steps']))} | "
                  f"{r['tokens_per_cpu_s'][0]:,.0f} | {r['wall_time_s'][0]:.0f} |")
    last = studies[-1]
    rows = along(last)
    record["along_largest"] = {arm: [list(x) for x in v] for arm, v in rows.items()}
    print(f"\n**Paired Δ to dense along the {last['budget']:g} s curves** (CPU seconds: mean ± sd)\n")
    for arm, v in rows.items():
        print(f"- {arm}: " + "; ".join(f"{t:g}: {_fmt(m, sd, True)}" for t, m, sd in v[::2]))
    (HERE / f"{args.name}_summary.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    plot(studies, args.name)
    if len(studies) > 1:
        plot_budgets(studies, record, args.name)


if __name__ == "__main__":
    main()
