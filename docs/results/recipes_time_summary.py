"""Summarise the equal-CPU-time `recipes_time` study over its budgets (docs/results.md, section 13).

Usage (from the repository root, after `moekit compare recipes_time --budget S --out DIR_S` for each budget):

    python docs/results/recipes_time_summary.py /tmp/j29-runs/time-50 /tmp/j29-runs/time-100

Reads each study folder's `results.json` (written by `moekit compare`; runs record the CPU seconds of their
training steps at every validation) and writes, next to this script:
- `recipes_time_val_vs_cpu.png`: validation bits/byte against CPU seconds of training steps, mean ± sd over
  seeds, one line per arm and budget (solid: the largest budget), final values as markers;
- `recipes_time_summary.json`: per budget and arm the final bits/byte (mean, sd), the paired difference to
  dense (mean, sd, per seed), steps and tokens reached (mean, min, max), training tokens/s of CPU time and the
  paired difference to dense along the largest budget's curves (each run's curve interpolated linearly in CPU
  seconds onto a common grid, then paired by seed);
and prints the same as Markdown tables.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REF = "dense"


def _ms(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(m: float, sd: float | None, signed: bool = False) -> str:
    head = f"{m:+.3f}" if signed else f"{m:.3f}"
    return head if sd is None else f"{head} ± {sd:.3f}"


def load(folder: Path) -> dict:
    data = json.loads((folder / "results.json").read_text())
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


def plot(studies: list[dict]) -> None:
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
    ax.set_title("recipes_time: equal CPU time, mean ± sd over seeds (markers: final values)", fontsize=9)
    fig.tight_layout()
    fig.savefig(HERE / "recipes_time_val_vs_cpu.png", dpi=110)
    plt.close(fig)


def main(folders: list[str]) -> None:
    studies = sorted((load(Path(f)) for f in folders), key=lambda s: s["budget"])
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
    (HERE / "recipes_time_summary.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    plot(studies)


if __name__ == "__main__":
    main(sys.argv[1:])
