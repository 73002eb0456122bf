"""``moekit bench``: the MoE layer benchmark of BENCHMARKS.md (ratios to dense-equivalent, one run).

Examples::

    moekit bench --quick                  # under a minute: mixtral-s at 1,024 tokens, 3 rounds
    moekit bench                          # mixtral-s and fine-s, CPU float32 (several minutes)
    moekit bench --shapes fine-s --repeats 5 --out bench_out/layer.json
    moekit bench --device cuda            # GPU shapes too, bfloat16
    moekit bench --clock cpu --threads 1  # CPU seconds: steadier than wall time on a shared machine
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

from .common import add_threads_argument, apply_threads

QUICK_SHAPES, QUICK_TOKENS, QUICK_REPEATS = ["mixtral-s"], 1024, 3  # --quick: under a minute on 2 CPU cores


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark the MoE layer against dense and transformers",
                              description=__doc__)
    p.add_argument("--shapes", nargs="*", help="shape names: mixtral-s, fine-s, mixtral-m, qwen3-30b-a3b "
                   "(default: every shape the device runs)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke check under a minute: mixtral-s, 1,024 tokens, 3 rounds (explicit --shapes, "
                   "--tokens, --repeats win)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per candidate (default: 10; 3 with --quick)")
    p.add_argument("--tokens", type=int, default=None, help="override the shape's token count (default: the shape's)")
    p.add_argument("--engines", nargs="*", default=None,
                   help="moekit engines to time (default: sorted and sorted_blocked on CPU, between which auto "
                   "chooses by shape; sorted and grouped_mm on CUDA)")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time (default); cpu: CPU seconds of this process, which a shared "
                   "machine's other processes do not inflate (CPU only; with several threads, their sum)")
    add_threads_argument(p, "torch's")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench.layer import SHAPES, bench_layer, format_table
    from ..runtime import tune_cpu_allocator
    from ..training.checkpoint import write_json
    from ..training.metrics import Progress
    from .main import UsageError

    tune_cpu_allocator()  # every candidate runs in this process, so all of them get the same allocator
    apply_threads(args.threads)
    unknown = [s for s in args.shapes or [] if s not in SHAPES]
    if unknown:
        raise UsageError(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but no CUDA device is available; use --device cpu")
    if gpu and args.clock == "cpu":
        raise UsageError("--clock cpu measures host CPU time, not CUDA work; use --clock wall with --device cuda")
    repeats: int = args.repeats if args.repeats is not None else (QUICK_REPEATS if args.quick else 10)
    tokens: int | None = args.tokens if args.tokens is not None else (QUICK_TOKENS if args.quick else None)
    if repeats < 1 or (tokens is not None and tokens < 1):
        raise UsageError("--repeats and --tokens must be >= 1")
    dtype = torch.bfloat16 if gpu else torch.float32
    shapes = args.shapes or (QUICK_SHAPES if args.quick else [n for n, s in SHAPES.items() if gpu or not s.gpu_only])
    engines = tuple(args.engines or (("sorted", "grouped_mm") if gpu else ("sorted", "sorted_blocked")))
    _check_engines(engines, args.device, dtype)
    _check_memory(shapes, tokens, engines, gpu)
    note = busy_machine_note(args.clock, gpu)
    if note:
        print(note, file=sys.stderr, flush=True)
    rounds_per_shape = 2 * (repeats + 2)
    bar = Progress(len(shapes) * rounds_per_shape, 0, enabled=not args.no_progress, unit="round", desc="bench ")
    done = [0]

    def tick() -> None:
        done[0] += 1
        bar.update(done[0], force=done[0] % rounds_per_shape == 0)

    results = []
    try:
        for name in shapes:
            result = bench_layer(name, args.device, dtype, repeats, engines, tokens, tick=tick, clock=args.clock)
            print(format_table(result), flush=True)
            results.append(result)
    finally:
        bar.close()
    if args.out:
        path = pathlib.Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, results)
        print(f"wrote {path}")
    return 0


def busy_machine_note(clock: str, gpu: bool) -> str | None:
    """A warning for a CPU benchmark on the wall clock when, before timing starts, the 1-minute load average is at
    least the number of cores: other processes are running, and wall-clock ratios then move from run to run."""
    if gpu or clock != "wall" or not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load < cores:
        return None
    return (f"note: load average {load:.1f} on {cores} cores: other processes share this CPU, so wall-clock ratios "
            f"move between runs (compare with the q1-q3 column); --clock cpu --threads 1 is steadier")


def _check_engines(engines: tuple[str, ...], device: str, dtype) -> None:
    """Refuse (exit 2) an unknown engine, or one that cannot run on this device and dtype, before timing (the
    layer's own check, :func:`~moekit.dispatch.resolve_engine`, on a small bank of the benchmark's dtype)."""
    import torch

    from ..dispatch import resolve_engine
    from ..experts import ExpertBank
    from .main import UsageError

    bank = ExpertBank(2, 16, 16).to(device=device, dtype=dtype)
    x = torch.zeros(4, 16, device=device, dtype=dtype)
    for name in engines:
        try:
            resolve_engine(name, x, bank)
        except ValueError as e:
            raise UsageError(f"--engines: {e} (on {device} in {dtype})") from None


def _check_memory(shapes: list[str], tokens: int | None, engines: tuple[str, ...], gpu: bool) -> None:
    """Refuse (exit 2) a CPU shape whose estimated memory exceeds what the machine has, before timing."""
    from ..bench.layer import SHAPES
    from ..bench.memory import check_fits, layer_bench_bytes
    from ..configs import ConfigError
    from .main import UsageError

    if gpu:
        return  # the estimate is of host memory; CUDA reports its own out-of-memory error at once
    for name in shapes:
        s = SHAPES[name]
        T = tokens or s.tokens
        estimate = layer_bench_bytes(s.dim, s.hidden_dim, s.num_experts, s.top_k, s.shared, T,
                                     candidates=len(engines) + 2)  # + transformers' two implementations
        try:
            check_fits(estimate, f"moekit bench of {name} at {T:,} tokens",
                       "lower --tokens or bench a smaller shape")
        except ConfigError as e:
            raise UsageError(str(e)) from None
