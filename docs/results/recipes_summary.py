"""Summarise the `recipes` study over several FLOP budgets (docs/results.md, section 11).

Usage (from the repository root, after `moekit compare recipes --budget B --out DIR_B` for each budget):

    python docs/results/recipes_summary.py /tmp/j26-runs/recipes-2e12 /tmp/j26-runs/recipes-6e12 \
        --speed /tmp/j26-runs/speed/speed.txt

Reads each study folder's `results.json` (written by `moekit compare`) and writes, next to this script:
- `recipes_val_vs_flops.png`: validation bits/byte against training FLOPs, mean ± sd over seeds: each budget's
  validation curves (solid: the largest budget, dashed/dotted: smaller ones) and final values (markers);
- `recipes_summary.json`: per budget and arm the final bits/byte (mean, sd), the paired difference to dense
  (mean, sd, per seed), tokens/s (mean, sd) and training FLOP/s, the per-evaluation paired differences to
  dense along the largest budget's curve, and the equal-wall-time estimate described below;
and prints the same as Markdown tables.

Equal wall time is *estimated*, not run: an arm's training speed is its median tokens/s × its FLOPs/token
(FLOP/s), from `--speed` (the alternating measurement of `recipes_speed.sh`) or else pooled over the study's runs. At the wall time the slower of (arm, dense) needs for the smallest budget,
and at the wall time the faster needs for the largest, the other model reaches budget × speed ratio FLOPs; its
bits/byte there is interpolated linearly in log10(FLOPs) between its final values at the two budgets (each a
complete run with its own learning-rate schedule). Readings that would need extrapolation are marked.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REF = "dense"
SPEED_FILE: str | None = None


def _ms(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def load(folder: Path) -> dict:
    data = json.loads((folder / "results.json").read_text())
    runs = [r for r in data["runs"] if r["finished"]]
    arms = [a["arm"] for a in data["arms"]]
    out: dict = {"budget": data["budget"]["amount"], "arms": {}}
    for arm in arms:
        rs = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        if not rs:
            continue
        s0 = rs[0]["summary"]
        fpt = s0["flops_per_token"]
        tps = [r["summary"]["tokens_per_s"] for r in rs]
        curves = []
        for r in rs:
            tok_per_step = r["summary"]["tokens"] / r["summary"]["step"]
            curves.append({p["step"]: (p["step"] * tok_per_step * fpt, p["val_bpb"]) for p in r["val_curve"]})
        out["arms"][arm] = {"seeds": [r["seed"] for r in rs], "final": {r["seed"]: r["summary"]["val_bpb"] for r in rs},
                            "fpt": fpt, "tps": tps, "curves": curves,
                            "flops": statistics.fmean(r["summary"]["tokens"] * fpt for r in rs)}
    return out


def interp_log(x: float, x0: float, y0: float, x1: float, y1: float) -> tuple[float, bool]:
    t = (math.log10(x) - math.log10(x0)) / (math.log10(x1) - math.log10(x0))
    return y0 + t * (y1 - y0), 0.0 <= t <= 1.0


def main(folders: list[str]) -> None:
    budgets = sorted((load(Path(f)) for f in folders), key=lambda b: b["budget"])
    summary: dict = {"budgets": [], "speed": {}, "equal_time": [], "curve_diffs": {}}
    arms = list(budgets[-1]["arms"])
    # speed: medians of the alternating measurement (recipes_speed.sh's speed.txt) if given, else of the study runs
    measured: dict[str, list[float]] = {}
    if SPEED_FILE is not None:
        for line in Path(SPEED_FILE).read_text().split("\n"):
            if line.strip():
                name, _, tps_ = line.split()
                measured.setdefault(name, []).append(float(tps_))
    speed = {}
    for arm in arms:
        tps = measured.get(arm) or [t for b in budgets if arm in b["arms"] for t in b["arms"][arm]["tps"]]
        fpt = budgets[-1]["arms"][arm]["fpt"]
        speed[arm] = statistics.median(tps) * fpt
        summary["speed"][arm] = {"tokens_per_s_median": statistics.median(tps), "tokens_per_s_all": tps,
                                 "source": "alternating measurement" if arm in measured else "study runs",
                                 "flops_per_token": fpt, "flop_per_s": speed[arm]}
    for arm in arms:
        summary["speed"][arm]["flop_per_s_vs_dense"] = speed[arm] / speed[REF]
        summary["speed"][arm]["tokens_per_s_vs_dense"] = (summary["speed"][arm]["tokens_per_s_median"]
                                                          / summary["speed"][REF]["tokens_per_s_median"])
    print("speed:", {a: (round(v["tokens_per_s_median"]), round(v["flop_per_s_vs_dense"], 3))
                     for a, v in summary["speed"].items()})
    print("| budget | arm | seeds | bits/byte | Δ vs dense (paired) | Δ per seed | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for b in budgets:
        rows = {}
        ref = b["arms"][REF]["final"]
        for arm, a in b["arms"].items():
            bpb = _ms(list(a["final"].values()))
            common = sorted(set(a["final"]) & set(ref))
            deltas = [a["final"][s] - ref[s] for s in common]
            delta = _ms(deltas) if arm != REF else None
            tps = _ms(a["tps"])
            rows[arm] = {"seeds": a["seeds"], "bpb_mean": bpb[0], "bpb_sd": bpb[1], "delta_mean": delta and delta[0],
                         "delta_sd": delta and delta[1], "delta_per_seed": dict(zip(common, deltas)),
                         "tokens_per_s_mean": tps[0], "tokens_per_s_sd": tps[1], "train_flops": a["flops"]}
            d = "(reference)" if delta is None else f"{delta[0]:+.4f} ± {delta[1] or 0:.4f}"
            per = "-" if delta is None else ", ".join(f"{x:+.3f}" for x in deltas)
            print(f"| {b['budget']:.0e} | {arm} | {len(a['seeds'])} | {bpb[0]:.4f} ± {bpb[1] or 0:.4f} | {d} | {per} "
                  f"| {tps[0]:,.0f} ± {tps[1] or 0:,.0f} |")
        summary["budgets"].append({"flops": b["budget"], "arms": rows})
    # paired differences along the largest budget's curve
    big = budgets[-1]
    ref_curves = big["arms"][REF]["curves"]
    print("\nPaired Δ bits/byte vs dense along the largest budget's curve (eval step: mean ± sd)")
    for arm, a in big["arms"].items():
        if arm == REF:
            continue
        # evaluations are paired by index (arms whose steps differ by a few still evaluate at the same fractions)
        n = min(len(c) for c in a["curves"] + ref_curves)
        rows = []
        for k in range(n):
            pts = [sorted(c.items())[k][1] for c in a["curves"]]
            refs = [sorted(c.items())[k][1] for c in ref_curves]
            m, sd = _ms([p[1] - q[1] for p, q in zip(pts, refs)])
            rows.append({"step": sorted(a["curves"][0])[k], "flops": pts[0][0], "delta_mean": m, "delta_sd": sd})
        summary["curve_diffs"][arm] = rows
        print(arm, "; ".join(f"{r['step']}: {r['delta_mean']:+.3f}±{r['delta_sd'] or 0:.3f}" for r in rows))
    # equal wall time estimate
    lo, hi = budgets[0], budgets[-1]
    if lo is hi:
        finish(summary, budgets)
        return
    print("\nEqual-wall-time estimate (interpolated in log FLOPs between the two budgets' final values)")
    print("| arm | FLOP/s vs dense | wall time | arm bits/byte | dense bits/byte | arm − dense |")
    print("|---|---|---|---|---|---|")

    def bpb_at(arm: str, flops: float) -> tuple[float, bool]:
        y0 = statistics.fmean(lo["arms"][arm]["final"].values())
        y1 = statistics.fmean(hi["arms"][arm]["final"].values())
        return interp_log(flops, lo["budget"], y0, hi["budget"], y1)

    for arm in arms:
        if arm == REF:
            continue
        r = speed[arm] / speed[REF]
        for label, budget, who in (("slower model's time for the small budget", lo["budget"], "slow"),
                                   ("faster model's time for the large budget", hi["budget"], "fast")):
            # the model whose own run defines the wall time: the slower one for the small budget, else the faster
            timed_is_arm = (r < 1) == (who == "slow")
            final = lo if budget == lo["budget"] else hi
            if timed_is_arm:
                arm_bpb = statistics.fmean(final["arms"][arm]["final"].values())
                dense_bpb, ok = bpb_at(REF, budget / r)
                seconds = budget / speed[arm]
            else:
                dense_bpb = statistics.fmean(final["arms"][REF]["final"].values())
                arm_bpb, ok = bpb_at(arm, budget * r)
                seconds = budget / speed[REF]
            flag = "" if ok else " (extrapolated)"
            summary["equal_time"].append({"arm": arm, "speed_ratio": r, "reading": label, "seconds": seconds,
                                          "arm_bpb": arm_bpb, "dense_bpb": dense_bpb, "interpolated": ok})
            print(f"| {arm} | {r:.2f} | {seconds:,.0f} s ({label}) | {arm_bpb:.4f} | {dense_bpb:.4f} | "
                  f"{arm_bpb - dense_bpb:+.4f}{flag} |")
    finish(summary, budgets)


def finish(summary: dict, budgets: list[dict]) -> None:
    (HERE / "recipes_summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    plot(budgets, HERE / "recipes_val_vs_flops.png")


def plot(budgets: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    big = budgets[-1]
    markers = "sD^v"
    styles = [":", "--", "-"]
    for i, arm in enumerate(big["arms"]):
        c = colors[i % len(colors)]
        for j, b in enumerate(budgets):
            if arm not in b["arms"]:
                continue
            a = b["arms"][arm]
            last = j == len(budgets) - 1
            steps = sorted(set.intersection(*(set(cv) for cv in a["curves"])))
            xs = [a["curves"][0][s][0] for s in steps]
            ys = [[cv[s][1] for cv in a["curves"]] for s in steps]
            m = [statistics.fmean(y) for y in ys]
            sd = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
            ax.plot(xs, m, styles[j - len(budgets)] if len(budgets) <= 3 else "-", color=c, lw=1.4 if last else 1.0,
                    label=f"{arm} ({b['budget']:.0e} run{'s' if len(a['curves']) > 1 else ''}, n={len(a['curves'])})")
            ax.fill_between(xs, [u - v for u, v in zip(m, sd)], [u + v for u, v in zip(m, sd)], color=c,
                            alpha=0.18 if last else 0.10, lw=0)
            fin = list(a["final"].values())
            mu, s_ = statistics.fmean(fin), (statistics.stdev(fin) if len(fin) > 1 else 0.0)
            ax.errorbar([a["flops"]], [mu], yerr=[s_], fmt=markers[j % 4], color=c, ms=6, capsize=3,
                        mfc=c if last else "white")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (moekit.models.count)")
    ax.set_ylabel("validation bits / byte")
    ax.set_ylim(top=min(ax.get_ylim()[1], 4.2))
    ax.grid(alpha=0.3, which="both")
    budget_txt = ", ".join(f"{b['budget']:.0e}" for b in budgets)
    ax.set_title(f"recipes at equal training FLOPs ({budget_txt} per run): validation curves and final values, "
                 "mean ± sd over seeds", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--speed" in args:
        i = args.index("--speed")
        SPEED_FILE = args[i + 1]
        del args[i:i + 2]
    main(args)
