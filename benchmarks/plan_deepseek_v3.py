"""A 64-GPU plan for a DeepSeek-V3-shaped model: mesh, memory per device, all-to-all volume per step.

Usage::

    python benchmarks/plan_deepseek_v3.py            # reads benchmarks/results/bench_fsdp.json when present

Arithmetic, not a measurement: parameter counts from DeepSeek-V3's published shape (arXiv 2412.19437: 61
layers, the first 3 dense; dim 7168; MLA with q rank 1536, kv rank 512, 128 heads of 128 + 64 rope dims;
256 routed experts of hidden 2048 + 1 shared, top-8; vocabulary 129280, untied head; the MTP module is left
out). The memory model is the one ``moekit.parallel.memory_per_rank`` measures (each process holds
``expert_params / ep + other_params / world`` parameters, each with its optimizer state) and is first checked
against the measured rows of ``bench_fsdp.json`` (CPU, gloo) so the same formula is trusted at scale.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DIM, LAYERS, DENSE_LAYERS, DENSE_HIDDEN = 7168, 61, 3, 18432
EXPERTS, EXPERT_HIDDEN, TOP_K, VOCAB = 256, 2048, 8, 129280
Q_RANK, KV_RANK, HEADS, NOPE, ROPE, V_DIM = 1536, 512, 128, 128, 64, 128
GB = 1e9


def counts(num_experts: int = EXPERTS) -> dict[str, float]:
    attn = (DIM * Q_RANK + Q_RANK * HEADS * (NOPE + ROPE) + DIM * (KV_RANK + ROPE)
            + KV_RANK * HEADS * (NOPE + V_DIM) + HEADS * V_DIM * DIM)
    moe_layers = LAYERS - DENSE_LAYERS
    experts = moe_layers * num_experts * 3 * DIM * EXPERT_HIDDEN
    other = (LAYERS * attn + DENSE_LAYERS * 3 * DIM * DENSE_HIDDEN
             + moe_layers * (3 * DIM * EXPERT_HIDDEN + num_experts * DIM) + 2 * VOCAB * DIM)
    active = other + moe_layers * TOP_K * 3 * DIM * EXPERT_HIDDEN - 2 * VOCAB * DIM + VOCAB * DIM
    return {"experts": experts, "other": other, "total": experts + other, "active": active,
            "moe_layers": moe_layers}


def per_device(c: dict, world: int, ep: int, bytes_per_param: float) -> float:
    return (c["experts"] / ep + c["other"] / world) * bytes_per_param


def check_against_measurement() -> None:
    path = Path(os.path.dirname(os.path.abspath(__file__))) / "results" / "bench_fsdp.json"
    if not path.is_file():
        print("(no bench_fsdp.json: run benchmarks/bench_fsdp.py to check the memory model)")
        return
    rows = json.loads(path.read_text())["rows"]
    total = rows[0]["params"]
    experts = next(r["expert_bytes"] * r["world"] / 4 for r in rows if r["layout"] != "dp")  # fp32 experts
    c = {"experts": experts, "other": total - experts}
    print("memory model vs measured (params + AdamW, fp32: 12 bytes/param), bench_fsdp.json:")
    for r in rows:
        ep = r["world"] if r["layout"] != "dp" else 1
        world = r["world"] if r["layout"] == "fsdp+ep" else 1
        predicted = per_device(c, world, ep, 12)
        print(f"  world {r['world']} {r['layout']:8s}: measured {r['max_bytes_per_process'] / 2**20:6.2f} MiB, "
              f"model {predicted / 2**20:6.2f} MiB")


def main() -> None:
    check_against_measurement()
    c = counts()
    print(f"\nDeepSeek-V3 shape: {c['total'] / GB:.1f} B parameters ({c['experts'] / GB:.1f} B in routed experts, "
          f"{c['other'] / GB:.1f} B elsewhere), {c['active'] / GB:.1f} B active per token")
    world, nodes = 64, 8
    print(f"\n{world} GPUs = {nodes} nodes x 8; mesh (dp, ep); bytes per device for parameters + gradients + "
          f"optimizer state:")
    recipes = {"fp32 weights, grads, AdamW (16 B/param)": 16,
               "bf16 weights+grads, fp32 master, bf16 moments (12 B/param, DeepSeek-V3's)": 12}
    for ep in (8, 64):
        for name, b in recipes.items():
            print(f"  mesh ({world // ep}, {ep}): {EXPERTS // ep:3d} experts/layer/GPU, {name}: "
                  f"{per_device(c, world, ep, b) / GB:6.1f} GB")
    small = counts(64)
    print(f"\nthe same shape with 64 routed experts ({small['total'] / GB:.1f} B parameters), mesh (1, 64): "
          f"{per_device(small, world, 64, 16) / GB:.1f} GB at 16 B/param")
    tokens = 2 * 4096  # per GPU per step: 2 sequences of 4096
    for label, bytes_per_value in (("bf16", 2), ("fp8 dispatch + bf16 combine", 1.5)):
        per_layer = tokens * TOP_K * DIM * bytes_per_value * 2  # dispatch + combine, forward
        step = per_layer * 2 * c["moe_layers"]  # backward repeats both exchanges
        print(f"\nall-to-all per GPU per step ({tokens} tokens/GPU, top-{TOP_K}, {label}): "
              f"{step / GB:.0f} GB sent, {step * 7 / 8 / GB:.0f} GB of it across nodes with ep=64 on 8 nodes "
              f"(uniform routing); node-limited routing (<= 4 nodes per token, one copy per node) caps the "
              f"cross-node part at {step / 2 / GB:.0f} GB")
    flops = 6 * c["active"] * tokens
    print(f"\ncompute per GPU per step: {flops / 1e15:.2f} PFLOP = {flops / 400e12:.1f} s at 400 TFLOP/s sustained")


if __name__ == "__main__":
    main()
