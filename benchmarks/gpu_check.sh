#!/usr/bin/env bash
# The GPU checks of issue 20 as one prepared command, for a session that is lent a GPU machine (the device
# tool's `run`: one call, about 6 minutes). From the repository root on the GPU machine:
#
#     bash benchmarks/gpu_check.sh            # writes under $OUT (the device tool's folder), else gpu_out/
#
# 1. the CUDA tests (tests/test_gpu.py: the sorted, grouped_mm and triton engines against the reference, float32
#    and bfloat16; the triton ones are the CUDA twins of tests/test_triton_engine.py), with a time limit;
# 2. `moekit bench --device cuda` with the sorted, grouped_mm and triton engines on every GPU shape (bfloat16),
#    its JSON recording the device, torch version and date.
# It uses the machine's own python3 (PyTorch and Triton come with the GPU image); nothing is installed.
# Written without a GPU (session 14): not yet run.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$out/environment.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed (the triton engine's checks will skip)")
PY
status=0
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log" || status=1
timeout 300 python3 -m moekit bench --device cuda --engines sorted grouped_mm triton --repeats 5 --no-progress \
    --out "$out/bench_gpu.json" 2>&1 | tee "$out/bench_gpu.log" || status=1
exit $status
