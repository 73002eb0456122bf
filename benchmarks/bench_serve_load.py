"""A bounded loopback load test of ``moekit serve``: a fixed number of concurrent clients, each sending a fixed
number of completion requests; reports requests/s, tokens/s and latency percentiles, and writes JSON.

The server runs in this process (uvicorn on 127.0.0.1, a free port) on a random-weight run of the ``coarse``
preset (the ``default`` before issue 20; or ``--run DIR``); clients are threads using httpx. Nothing leaves the machine.

Usage: ``python benchmarks/bench_serve_load.py [--clients 4 --requests 5 --max-tokens 16 --max-batch 8]``
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
import uvicorn

from moekit.bench.timing import run_environment
from moekit.configs import to_dict
from moekit.data import get_tokenizer
from moekit.models import LanguageModel
from moekit.recipes import load_preset
from moekit.serving import load_offloaded
from moekit.serving.server import build_app
from moekit.training import load_run
from moekit.training.checkpoint import CONFIG_FILE, write_checkpoint, write_json


def random_run(path: Path) -> Path:
    cfg = load_preset("coarse")
    torch.manual_seed(0)
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / CONFIG_FILE, to_dict(cfg))
    write_checkpoint(path, LanguageModel(cfg.model).state_dict(), {}, {"step": 0})
    return path


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def load_test(run: Path, clients: int, requests: int, max_tokens: int, max_batch: int,
              expert_memory: str | None) -> dict:
    if expert_memory is None:
        cfg, model, _ = load_run(run, "cpu")
    else:
        cfg, model, _ = load_offloaded(run, expert_memory, "lru", prefetch="router", record=False)
    tok = get_tokenizer(cfg.data.tokenizer)
    app = build_app(model, tok.encode, tok.decode, max_batch=max_batch)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)

    def client(i: int) -> list[tuple[float, int]]:
        out = []
        with httpx.Client(timeout=300) as http:
            for j in range(requests):
                t0 = time.perf_counter()
                r = http.post(f"{url}/v1/completions", json={"prompt": f"def f{i}_{j}(x):", "max_tokens": max_tokens,
                                                             "temperature": 0.8, "seed": j})
                r.raise_for_status()
                out.append((time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for chunk in pool.map(client, range(clients)) for x in chunk]
    wall = time.perf_counter() - t0
    health = httpx.get(f"{url}/health").json()
    server.should_exit = True
    thread.join(timeout=10)
    lat = [r[0] for r in results]
    return {"clients": clients, "requests": len(results), "max_tokens": max_tokens, "max_batch": max_batch,
            "expert_memory": expert_memory or "resident", "seconds": wall,
            "requests_per_s": len(results) / wall, "tokens_per_s": sum(r[1] for r in results) / wall,
            "latency_p50_s": percentile(lat, 0.5), "latency_p90_s": percentile(lat, 0.9),
            "latency_p99_s": percentile(lat, 0.99), "batches": health["batches"],
            "largest_batch": health["largest_batch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="a run folder (default: a random-weight default-preset run)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=5, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--expert-memory", default=None, help="also run offloaded at this budget (e.g. 25%%)")
    parser.add_argument("--out", default="bench_serve_load.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else random_run(Path(tmp) / "run")
        rows = []
        for memory in [None] + ([args.expert_memory] if args.expert_memory else []):
            for mb in args.max_batch:
                rows.append(load_test(run, args.clients, args.requests, args.max_tokens, mb, memory))
                r = rows[-1]
                print(f"{r['expert_memory']:>8} max_batch {mb}: {r['requests_per_s']:.2f} req/s, "
                      f"{r['tokens_per_s']:.1f} tok/s, latency p50 {r['latency_p50_s']:.2f} s p90 "
                      f"{r['latency_p90_s']:.2f} s p99 {r['latency_p99_s']:.2f} s, largest batch "
                      f"{r['largest_batch']}", flush=True)
    Path(args.out).write_text(json.dumps({"environment": run_environment("cpu"), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
