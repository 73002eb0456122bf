"""Routers along training, and per-seed paired differences, for the `moepp`, `topp` and `coe` studies
(docs/results.md, sections 2-4).

Usage (from the repository root, after the `moekit compare` runs):

    python docs/results/router_sharpening.py RUN_FOLDER [RUN_FOLDER ...] [--reference ARM] [--stats A,B] [--plot PNG]

The figures of docs/results.md sections 3-4 came from
`... /tmp/j31-runs/topp2x/runs/* --reference top2 --stats experts_per_token,load_cv` (and `moepp2x`, `--reference
moe`), and `routers_along_training.png` from `... /tmp/j31-runs/long/runs/* --reference top2
--stats experts_per_token,ffn_per_token,zc_share,load_cv --plot docs/results/routers_along_training.png`.

Each RUN_FOLDER is one `moekit train`/`moekit compare` run folder (`<arm>-seed<seed>-<hash>`); unfinished
runs are skipped. Its
`metrics.jsonl` validation records carry the per-layer routing statistics of that evaluation (the trainer writes
them since issue 20's rerun); this script averages each statistic over the MoE layers, then over seeds, per arm
and evaluation step, and prints Markdown tables of

- the variants' own figures along training: `experts_per_token` (top-p), `ffn_per_token`, `zc_share` and
  `drop_rate` (MoE++), with `load_cv` for every arm;
  (`drop_rate` of a top-p layer counts the unused padding slots of its variable-width selection, not
  dropped tokens: leave it out with `--stats`);
- validation bits/byte per seed and the paired difference of each arm to `--reference ARM` (per seed, mean, sd),
  at the end and at each evaluation.

With `--plot PATH` it also draws the statistics against training steps (one panel per statistic, one line per
arm, a band of ± sd over seeds where there are several).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

STATS = ("experts_per_token", "ffn_per_token", "zc_share", "drop_rate", "load_cv")
FOLDER = re.compile(r"^(?P<arm>.+)-seed(?P<seed>\d+)-[0-9a-f]+$")


def read_run(folder: Path) -> tuple[str, int, list[dict]] | None:
    match = FOLDER.match(folder.name)
    summary = folder / "summary.json"
    if not match or not summary.is_file() or "val_loss" not in json.loads(summary.read_text()):
        return None  # not a run folder, or not finished
    evals = []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "val_loss" in r:
            row = {"step": r["step"], "val_bpb": r["val_bpb"]}
            layers = r.get("layers") or {}
            for key in STATS:
                values = [v[key] for v in layers.values() if isinstance(v.get(key), (int, float))]
                if values:
                    row[key] = sum(values) / len(values)
            evals.append(row)
    return match["arm"], int(match["seed"]), evals


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--reference", default=None, help="arm for the paired differences")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--stats", default=",".join(STATS), help="comma-separated statistics to show")
    args = parser.parse_args()
    stats = tuple(k for k in args.stats.split(",") if k)
    runs: dict[str, dict[int, list[dict]]] = defaultdict(dict)
    for folder in args.folders:
        got = read_run(folder)
        if got and got[2]:
            runs[got[0]][got[1]] = got[2]
    for arm, seeds in sorted(runs.items()):
        keys = [k for k in stats if any(k in e for evals in seeds.values() for e in evals)]
        steps = sorted({e["step"] for evals in seeds.values() for e in evals})
        print(f"\n{arm} (seeds {sorted(seeds)}): mean ± sd over seeds at each evaluation\n")
        print("| step | bits/byte | " + " | ".join(keys) + " |")
        print("|---" * (2 + len(keys)) + "|")
        for step in steps:
            at = [e for evals in seeds.values() for e in evals if e["step"] == step]
            cells = [f"{step}", "{:.4f} ± {:.4f}".format(*mean_sd([e["val_bpb"] for e in at]))]
            for k in keys:
                vals = [e[k] for e in at if k in e]
                cells.append("{:.3f} ± {:.3f}".format(*mean_sd(vals)) if vals else "-")
            print("| " + " | ".join(cells) + " |")
    if args.reference and args.reference in runs:
        ref = {s: evals[-1]["val_bpb"] for s, evals in runs[args.reference].items()}
        print(f"\nfinal bits/byte, paired difference to {args.reference} (arm - reference) per seed\n")
        for arm, seeds in sorted(runs.items()):
            if arm == args.reference:
                continue
            diffs = {s: evals[-1]["val_bpb"] - ref[s] for s, evals in seeds.items() if s in ref}
            if diffs:
                m, sd = mean_sd(list(diffs.values()))
                per = ", ".join(f"seed {s}: {d:+.4f}" for s, d in sorted(diffs.items()))
                print(f"- {arm}: {per}; mean {m:+.4f} ± {sd:.4f} (n={len(diffs)})")
                curve = {s: {e["step"]: e["val_bpb"] for e in evals} for s, evals in seeds.items() if s in ref}
                ref_curve = {s: {e["step"]: e["val_bpb"] for e in runs[args.reference][s]} for s in curve}
                along = []
                for step in sorted(set.intersection(*(set(c) & set(ref_curve[s]) for s, c in curve.items()))):
                    m, sd = mean_sd([curve[s][step] - ref_curve[s][step] for s in curve])
                    along.append(f"{step}: {m:+.3f} ± {sd:.3f}")
                print(f"  along training (step: mean ± sd of the paired differences): {'; '.join(along)}")
    if args.plot:
        plot(runs, args.plot, stats)


def plot(runs: dict[str, dict[int, list[dict]]], path: Path, stats: tuple[str, ...] = STATS) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in stats if any(k in e for seeds in runs.values() for evals in seeds.values() for e in evals)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for arm, seeds in sorted(runs.items()):
            steps = sorted({e["step"] for evals in seeds.values() for e in evals if key in e})
            if not steps:
                continue
            ms, sds = zip(*(mean_sd([e[key] for evals in seeds.values() for e in evals
                                     if e["step"] == s and key in e]) for s in steps))
            line, = ax.plot(steps, ms, "o-", ms=3, label=f"{arm} (n={len(seeds)})")
            ax.fill_between(steps, [m - s for m, s in zip(ms, sds)], [m + s for m, s in zip(ms, sds)],
                            color=line.get_color(), alpha=0.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
