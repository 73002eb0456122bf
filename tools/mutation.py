"""Mutation testing of moekit's core packages with mutmut, one package at a time.

    python tools/mutation.py routing ops            # the packages to run (default: the five core ones)
    python tools/mutation.py routing --max-children 2 --work /tmp/moekit-mutation
    python tools/mutation.py layers --only "moekit/layers/moe.py"   # a part of a package
    python tools/mutation.py routing --survivors   # re-test the last run's survivors with the current tests
    python tools/mutation.py layers --only "moekit/layers/variants/*" --only "moekit/layers/attention/*" \
        --sample 200 --seed 0                      # a seeded random sample of 200 of the mutants

For each package the repository (``moekit/``, ``tests/``, ``pyproject.toml``) is copied to ``WORK/PACKAGE``;
there ``[tool.mutmut]`` is extended with ``only_mutate = ["moekit/PACKAGE/*"]`` and the package's fast test
subset (``TESTS`` below), and ``mutmut run`` is started. The per-package counts (killed, survived, timeout,
no tests, ...) are printed and written to ``WORK/PACKAGE/score.json``; ``mutmut results`` and
``mutmut show NAME`` inspect the survivors inside ``WORK/PACKAGE``. Nothing in the repository is changed.
Slow: minutes to hours per package on a small machine; see docs/testing.md for measured scores.

``--sample N`` (with ``--seed``) first generates every mutant of the selected files, then runs mutmut on a
seeded uniform random sample of ``N`` of them (without replacement) and reports the estimated score with a
95 % Wilson confidence interval. In the sampled score a mutant that no selected test runs ("no tests")
counts as not killed, so the estimate is conservative.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
# fast tests that exercise each package's behaviour (each subset runs in seconds)
TESTS: dict[str, list[str]] = {
    "routing": ["tests/test_routing.py", "tests/test_routing_exact.py", "tests/test_routing_reference.py",
                "tests/test_router_config_errors.py",
                "tests/test_guards.py",
                "tests/test_config.py", "tests/test_variants_topp.py", "tests/test_variants_moepp.py",
                "tests/test_variants_blockffn.py", "tests/test_variants_traps.py", "tests/test_variants_mumoe.py"],
    "ops": ["tests/test_engines.py", "tests/test_engines_frozen.py", "tests/test_hf_core.py",
            "tests/test_blocked_engine.py", "tests/test_triton_engine.py"],
    "dispatch": ["tests/test_engines.py", "tests/test_engines_frozen.py", "tests/test_ep_units.py", "tests/test_ep_threads.py",
                 "tests/test_dispatch_contracts.py", "tests/test_blocked_engine.py", "tests/test_triton_engine.py",
                 "tests/test_hf_core.py", "tests/test_compile.py::test_sorted_op_matches_reference",
                 "tests/test_compile.py::test_sorted_op_with_biases_one_token_and_empty_experts",
                 "tests/test_compile.py::test_opcheck_fake_and_autograd_registrations",
                 "tests/test_compile.py::test_auto_prefers_plain_sorted_eagerly"],
    "experts": ["tests/test_engines.py", "tests/test_engines_frozen.py", "tests/test_hf_core.py",
                "tests/test_experts_init.py",
                "tests/test_routing.py", "tests/test_upcycle.py"],
    "layers": ["tests/test_routing.py", "tests/test_routing_exact.py", "tests/test_engines.py",
               "tests/test_routing_reference.py", "tests/test_router_learns.py", "tests/test_moe_layer_stats.py",
               "tests/test_guards.py", "tests/test_config.py", "tests/test_variants_traps.py",
               "tests/test_step_hook.py", "tests/test_uoe.py",
               *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_layers_*.py")),
               *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_attention_*.py")),
               *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_variants_*.py"))],
    # the budget and time-clock code of the trainer, and the study/compare code (seconds-long quick studies)
    "training": ["tests/test_budget.py", "tests/test_throughput.py", "tests/test_display.py", "tests/test_time_clock.py",
                 "tests/test_first_hour.py", "tests/test_train.py", "tests/test_default_recipe.py"],
    "bench": ["tests/test_bench.py", "tests/test_bench_clock.py", "tests/test_bench_spread.py",
              "tests/test_step_speed.py"],  # (test_bench_environment reads benchmarks/, not copied)
    "compare": ["tests/test_compare_study.py", "tests/test_compare_report.py", "tests/test_compare.py",
                "tests/test_compare_two_stage.py",
                "tests/test_time_clock.py", "tests/test_default_recipe.py"],
}
CORE = ("routing", "ops", "dispatch", "experts", "layers")  # the default; training, bench, compare on request
STATUS = ("killed", "survived", "timeout", "no tests", "suspicious", "skipped", "segfault", "not checked",
          "caught by type check")


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def prepare(package: str, work: Path, only: list[str] | None = None) -> Path:
    dest = work / package
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "moekit", dest / "moekit", ignore=ignore)
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=ignore)
    (dest / "pyproject.toml").write_text(_pyproject(package, only))
    (dest / "only.json").write_text(json.dumps(only))  # --survivors reuses it
    return dest


def _pyproject(package: str, only: list[str] | None) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    config = tomllib.loads(text)["tool"]["mutmut"]
    block = ("\n[tool.mutmut]\n" + f"source_paths = {_toml_list(config['source_paths'])}\n"
             + f"only_mutate = {_toml_list(only or [f'moekit/{package}/*'])}\n"
             + f"pytest_add_cli_args = {_toml_list(config.get('pytest_add_cli_args', []))}\n"
             + f"pytest_add_cli_args_test_selection = {_toml_list(TESTS[package])}\n")
    return re.sub(r"\n\[tool\.mutmut\]\n(?:[^\[].*\n|\n)*", "\n", text) + block


def survivors(dest: Path) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=dest,
                         capture_output=True, text=True).stdout
    return [line.split(":")[0].strip() for line in out.splitlines()
            if line.strip().endswith((": survived", ": no tests"))]


def generate(dest: Path, env: dict[str, str]) -> list[str]:
    """Generate every mutant in ``dest`` (mutmut's own first step of ``run``, without running tests); their names."""
    code = ("import os\n"
            "from mutmut.__main__ import create_mutants, set_mutant_under_test, store_lines_covered_by_tests\n"
            "from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir, setup_source_paths\n"
            "set_mutant_under_test('mutant_generation')\n"
            "os.makedirs('mutants', exist_ok=True)\n"
            "copy_src_dir(); copy_also_copy_files(); setup_source_paths(); store_lines_covered_by_tests()\n"
            "create_mutants(1)\n")
    subprocess.run([sys.executable, "-c", code], cwd=dest, env=env, check=True, capture_output=True)
    return sorted(results(dest))


def results(dest: Path) -> dict[str, str]:
    """Every generated mutant's name and status (``killed``, ``survived``, ``not checked``...)."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=dest,
                         capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        if ":" in line:
            name, status = line.rsplit(":", 1)
            found[name.strip()] = status.strip()
    return found


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % for the default ``z``)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def sample_score(dest: Path, names: list[str]) -> dict[str, object]:
    """Counts over the sampled mutants; the score counts "no tests" as not killed."""
    found = results(dest)
    statuses = [found.get(name, "not checked") for name in names]
    counts = {s: statuses.count(s) for s in STATUS}
    killed = counts["killed"] + counts["timeout"]
    judged = killed + counts["survived"] + counts["no tests"]
    low, high = wilson(killed, judged)
    return {**counts, "sample": len(names), "score": round(killed / judged, 4) if judged else None,
            "ci95": [round(low, 4), round(high, 4)]}


def score(dest: Path) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=dest,
                         capture_output=True, text=True).stdout
    counts = {s: 0 for s in STATUS}
    for line in out.splitlines():
        if ":" in line:
            status = line.rsplit(":", 1)[1].strip()
            counts[status] = counts.get(status, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("packages", nargs="*", default=list(CORE), choices=list(TESTS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/moekit-mutation"))
    parser.add_argument("--max-children", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--only", action="append",
                        help="glob of the files to mutate (default: moekit/PACKAGE/*); may be repeated")
    parser.add_argument("--sample", type=int, metavar="N",
                        help="run a seeded random sample of N mutants and report the score with a 95%% interval")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    parser.add_argument("--survivors", action="store_true",
                        help="copy the current tests into the last run's folder and re-run its survivors only")
    args = parser.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    for package in args.packages:
        names: list[str] = []
        sampled: list[str] = []
        if args.survivors:
            dest = args.work / package
            if args.only is None and (dest / "only.json").exists():
                args.only = json.loads((dest / "only.json").read_text())
            names = survivors(dest)
            sample_file = dest / "sample.json"
            if sample_file.exists():
                sampled = json.loads(sample_file.read_text())
                names = [n for n in names if n in set(sampled)]
            shutil.rmtree(dest / "tests")
            shutil.copytree(ROOT / "tests", dest / "tests", ignore=shutil.ignore_patterns("__pycache__"))
            shutil.rmtree(dest / "mutants" / "tests", ignore_errors=True)
            shutil.copytree(ROOT / "tests", dest / "mutants" / "tests", ignore=shutil.ignore_patterns("__pycache__"))
            for folder in (dest, dest / "mutants"):
                (folder / "pyproject.toml").write_text(_pyproject(package, args.only))
            (dest / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)  # map the new tests to mutants
        else:
            dest = prepare(package, args.work, args.only)
            if args.sample:
                every = generate(dest, env)
                sampled = sorted(random.Random(args.seed).sample(every, min(args.sample, len(every))))
                (dest / "sample.json").write_text(json.dumps(sampled, indent=1) + "\n")
                names = sampled
                print(f"== {package}: {len(every)} mutants, sampled {len(sampled)} (seed {args.seed})", flush=True)
        if args.survivors and not names:
            print(f"== {package}: no survivors to re-run", flush=True)
            continue
        print(f"== {package}: mutmut in {dest}", flush=True)
        subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children), *names],
                       cwd=dest, env=env)
        counts_out: dict[str, object]
        if sampled:
            counts_out = sample_score(dest, sampled)
        else:
            counts = score(dest)
            judged = counts["killed"] + counts["survived"] + counts["timeout"]
            counts_out = {**counts,
                          "score": round((counts["killed"] + counts["timeout"]) / judged, 4) if judged else None}
        (dest / "score.json").write_text(json.dumps(counts_out, indent=1) + "\n")
        print(f"== {package}: {json.dumps(counts_out)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
