"""Mutation testing of moekit's core packages with mutmut, one package at a time.

    python tools/mutation.py routing ops            # the packages to run (default: all five)
    python tools/mutation.py routing --max-children 2 --work /tmp/moekit-mutation
    python tools/mutation.py layers --only "moekit/layers/moe.py"   # a part of a package
    python tools/mutation.py routing --survivors   # re-test the last run's survivors with the current tests

For each package the repository (``moekit/``, ``tests/``, ``pyproject.toml``) is copied to ``WORK/PACKAGE``;
there ``[tool.mutmut]`` is extended with ``only_mutate = ["moekit/PACKAGE/*"]`` and the package's fast test
subset (``TESTS`` below), and ``mutmut run`` is started. The per-package counts (killed, survived, timeout,
no tests, ...) are printed and written to ``WORK/PACKAGE/score.json``; ``mutmut results`` and
``mutmut show NAME`` inspect the survivors inside ``WORK/PACKAGE``. Nothing in the repository is changed.
Slow: minutes to hours per package on a small machine; see docs/testing.md for measured scores.
"""

from __future__ import annotations

import argparse
import json
import os
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
    "ops": ["tests/test_engines.py", "tests/test_engines_frozen.py", "tests/test_hf_core.py"],
    "dispatch": ["tests/test_engines.py", "tests/test_engines_frozen.py", "tests/test_ep_units.py",
                 "tests/test_hf_core.py"],
    "experts": ["tests/test_engines.py", "tests/test_engines_frozen.py", "tests/test_hf_core.py",
                "tests/test_experts_init.py",
                "tests/test_routing.py", "tests/test_upcycle.py"],
    "layers": ["tests/test_routing.py", "tests/test_routing_exact.py", "tests/test_engines.py",
               "tests/test_routing_reference.py", "tests/test_router_learns.py", "tests/test_moe_layer_stats.py",
               "tests/test_guards.py", "tests/test_config.py", "tests/test_variants_traps.py",
               *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_variants_*.py"))],
}
STATUS = ("killed", "survived", "timeout", "no tests", "suspicious", "skipped", "segfault", "not checked",
          "caught by type check")


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def prepare(package: str, work: Path, only: str | None = None) -> Path:
    dest = work / package
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "moekit", dest / "moekit", ignore=ignore)
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=ignore)
    (dest / "pyproject.toml").write_text(_pyproject(package, only))
    return dest


def _pyproject(package: str, only: str | None) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    config = tomllib.loads(text)["tool"]["mutmut"]
    block = ("\n[tool.mutmut]\n" + f"source_paths = {_toml_list(config['source_paths'])}\n"
             + f"only_mutate = {_toml_list([only or f'moekit/{package}/*'])}\n"
             + f"pytest_add_cli_args = {_toml_list(config.get('pytest_add_cli_args', []))}\n"
             + f"pytest_add_cli_args_test_selection = {_toml_list(TESTS[package])}\n")
    return re.sub(r"\n\[tool\.mutmut\]\n(?:[^\[].*\n|\n)*", "\n", text) + block


def survivors(dest: Path) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=dest,
                         capture_output=True, text=True).stdout
    return [line.split(":")[0].strip() for line in out.splitlines()
            if line.strip().endswith((": survived", ": no tests"))]


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
    parser.add_argument("packages", nargs="*", default=list(TESTS), choices=list(TESTS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/moekit-mutation"))
    parser.add_argument("--max-children", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--only", help="glob of the files to mutate (default: moekit/PACKAGE/*)")
    parser.add_argument("--survivors", action="store_true",
                        help="copy the current tests into the last run's folder and re-run its survivors only")
    args = parser.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    for package in args.packages:
        names: list[str] = []
        if args.survivors:
            dest = args.work / package
            names = survivors(dest)
            shutil.rmtree(dest / "tests")
            shutil.copytree(ROOT / "tests", dest / "tests", ignore=shutil.ignore_patterns("__pycache__"))
            shutil.rmtree(dest / "mutants" / "tests", ignore_errors=True)
            shutil.copytree(ROOT / "tests", dest / "mutants" / "tests", ignore=shutil.ignore_patterns("__pycache__"))
            for folder in (dest, dest / "mutants"):
                (folder / "pyproject.toml").write_text(_pyproject(package, args.only))
            (dest / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)  # map the new tests to mutants
        else:
            dest = prepare(package, args.work, args.only)
        print(f"== {package}: mutmut in {dest}", flush=True)
        subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children), *names],
                       cwd=dest, env=env)
        counts = score(dest)
        judged = counts["killed"] + counts["survived"] + counts["timeout"]
        counts_out = {**counts, "score": round((counts["killed"] + counts["timeout"]) / judged, 4) if judged else None}
        (dest / "score.json").write_text(json.dumps(counts_out, indent=1) + "\n")
        print(f"== {package}: {json.dumps(counts_out)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
