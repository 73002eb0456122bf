"""Every benchmark JSON records where and when it ran (issue 20): ``moekit.bench.timing.run_environment`` gives the
date (UTC), torch version and a readable device name, never raises, and every ``benchmarks/*.py`` script that
writes or prints JSON puts it in (checked statically, and by running two scripts at tiny sizes)."""

from __future__ import annotations

import ast
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit.bench import timing
from moekit.bench.layer import SHAPES, Shape, bench_layer
from moekit.bench.timing import run_environment

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
KEYS = {"date_utc", "torch", "device", "machine", "cpu_count", "threads", "load_average"}


def _check(env: dict) -> None:
    """The fields every benchmark JSON's ``environment`` must have, with plausible values."""
    assert KEYS <= set(env), f"missing {KEYS - set(env)}"
    stamp = datetime.datetime.strptime(env["date_utc"], "%Y-%m-%d %H:%M").replace(tzinfo=datetime.timezone.utc)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - stamp) < datetime.timedelta(minutes=10)
    assert env["torch"] == torch.__version__
    assert isinstance(env["device"], str) and env["device"].strip()


def test_run_environment_records_date_torch_and_the_cpu():
    before = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    env = run_environment()
    after = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    _check(env)
    assert env["date_utc"][:10] in (before, after)  # today's UTC date (either side of midnight)
    assert env["threads"] == torch.get_num_threads() and env["cpu_count"] == os.cpu_count()
    assert env["machine"] == platform.machine()
    assert "cuda" not in env  # the CUDA version is recorded for CUDA devices only
    assert run_environment("cpu")["device"] == run_environment(torch.device("cpu"))["device"] == env["device"]
    json.dumps(env)  # it goes into JSON files as it is


def test_cpu_name_comes_from_cpuinfo_model_name(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: Made Up\nmodel name\t: Test  CPU 9000 @ 1.00GHz\n\n"
                    "processor\t: 1\nmodel name\t: Test  CPU 9000 @ 1.00GHz\n")
    monkeypatch.setattr(timing, "CPUINFO", str(info))
    assert run_environment("cpu")["device"] == "Test CPU 9000 @ 1.00GHz"


@pytest.mark.parametrize("cpuinfo", ["missing", "directory", "no model name", "binary"])
def test_unreadable_cpuinfo_still_gives_a_device(tmp_path, monkeypatch, cpuinfo):
    path = tmp_path / "cpuinfo"
    if cpuinfo == "directory":
        path.mkdir()
    elif cpuinfo == "no model name":  # as on ARM Linux: no "model name" line
        path.write_text("processor\t: 0\nBogoMIPS\t: 48.00\nCPU part\t: 0xd0c\n")
    elif cpuinfo == "binary":
        path.write_bytes(b"\xff\xfe\x00model name\x00\xff")
    monkeypatch.setattr(timing, "CPUINFO", str(path))
    monkeypatch.setattr(platform, "processor", lambda: "")
    monkeypatch.setattr(platform, "machine", lambda: "fakearch")
    env = run_environment("cpu")
    assert env["device"] == "fakearch"  # platform.processor() was empty: platform.machine()
    monkeypatch.setattr(platform, "processor", lambda: "FakeProc")
    assert run_environment("cpu")["device"] == "FakeProc"

    def boom():
        raise OSError("uname failed")

    monkeypatch.setattr(platform, "processor", boom)
    assert run_environment("cpu")["device"] == "unknown CPU"


def test_cuda_device_records_the_gpu_name_and_cuda_version(monkeypatch):
    seen = []

    def fake_name(device=None):
        seen.append(device)
        return "Fake GPU 80GB"

    monkeypatch.setattr(torch.cuda, "get_device_name", fake_name)
    env = run_environment("cuda:1")
    _check(env)
    assert env["device"] == "Fake GPU 80GB" and env["cuda"] == torch.version.cuda
    assert seen == [torch.device("cuda:1")]


def test_run_environment_never_raises(monkeypatch):
    def no_gpu(device=None):
        raise RuntimeError("Found no NVIDIA driver on your system")

    monkeypatch.setattr(torch.cuda, "get_device_name", no_gpu)
    env = run_environment("cuda")
    _check(env)
    assert env["device"].startswith("cuda") and "unavailable" in env["device"]
    assert run_environment("not-a-device")["device"] == "not-a-device"
    assert run_environment(None)["device"] == run_environment("cpu")["device"]
    assert run_environment("meta")["device"] == "meta"


def test_bench_layer_records_its_device(monkeypatch):
    monkeypatch.setitem(SHAPES, "test-s", Shape(32, 16, 4, 2, 1, 64))
    result = bench_layer("test-s", repeats=1, tokens=32, clock="cpu")
    env = result["environment"]
    _check(env)
    assert env["device"] == run_environment("cpu")["device"] and "load_average_after" in env


# --- every benchmark script that writes or prints JSON records the environment ------------------------------------

def _writes_json(tree: ast.AST) -> bool:
    """Whether the module calls ``json.dump``, ``json.dumps`` or ``write_json`` (any module's)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in ("dump", "dumps") and isinstance(f.value, ast.Name) \
                    and f.value.id == "json":
                return True
            if isinstance(f, ast.Name) and f.id in ("dump", "dumps", "write_json"):
                return True
            if isinstance(f, ast.Attribute) and f.attr == "write_json":
                return True
    return False


def _calls_run_environment(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name == "run_environment":
                return True
    return False


def test_the_static_check_tells_a_forgetful_script():
    forgets = ast.parse("import json\njson.dump({'rows': []}, open('x', 'w'))\n")
    remembers = ast.parse("import json\nfrom moekit.bench.timing import run_environment\n"
                          "print(json.dumps({'environment': run_environment('cpu')}))\n")
    imports_only = ast.parse("from moekit.bench.timing import run_environment\nwrite_json('x', [])\n")
    assert _writes_json(forgets) and not _calls_run_environment(forgets)
    assert _writes_json(remembers) and _calls_run_environment(remembers)
    assert _writes_json(imports_only) and not _calls_run_environment(imports_only)  # imported, never called
    assert not _writes_json(ast.parse("import json\nrows = json.loads('[]')\n"))  # reading is not writing


def test_every_benchmark_script_that_writes_json_records_the_environment():
    scripts = sorted(BENCHMARKS.glob("*.py"))
    writers = {p.name for p in scripts if _writes_json(ast.parse(p.read_text(), str(p)))}
    assert len(writers) >= 20, f"only {sorted(writers)} write JSON: is the check still finding json.dump calls?"
    assert "plan_deepseek_v3.py" not in writers  # reads bench_fsdp.json, prints text
    forgot = sorted(p.name for p in scripts if p.name in writers
                    and not _calls_run_environment(ast.parse(p.read_text(), str(p))))
    assert not forgot, f"these benchmark scripts write JSON without run_environment(device): {forgot}"


# --- two of the fastest scripts, end to end at tiny sizes ----------------------------------------------------------

def test_bench_variants_script_writes_the_environment(tmp_path):
    out = tmp_path / "variants.json"
    res = subprocess.run([sys.executable, str(BENCHMARKS / "bench_variants.py"), "--tokens", "256", "--dim", "16",
                          "--repeats", "1", "--threads", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    _check(data["environment"])
    assert data["environment"]["threads"] == 1 and data["rows"]


def test_gemm_floor_script_writes_the_environment(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gemm_floor_under_test", BENCHMARKS / "gemm_floor.py")
    assert spec is not None and spec.loader is not None
    gemm_floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gemm_floor)
    monkeypatch.setitem(SHAPES, "tiny", Shape(32, 16, 4, 2, 0, 64))
    out = tmp_path / "floor.json"
    threads = torch.get_num_threads()
    try:
        assert gemm_floor.main(["--shapes", "tiny", "--repeats", "1", "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    _check(data["environment"])
    assert [r["shape"] for r in data["results"]] == ["tiny"]
    _check(data["results"][0]["environment"])


def test_trained_step_speed_script_times_two_trained_runs(tmp_path, capsys):
    from moekit.cli.main import main as moekit_main

    spec = importlib.util.spec_from_file_location("trained_step_speed_under_test", BENCHMARKS / "trained_step_speed.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for name in ("a", "b"):
        assert moekit_main(["train", "--preset", "tiny", "--out", str(tmp_path / name), "--train.max_steps=2",
                            "--train.batch_size=2", "--no-progress"]) == 0
    out = tmp_path / "speed.json"
    threads = torch.get_num_threads()
    try:
        assert script.main([f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}", "--repeats", "1", "--out", str(out)]) == 0
        with pytest.raises(SystemExit, match="expected NAME=RUN_DIR with RUN_DIR/config.json, got 'c=nowhere'"):
            script.main(["c=nowhere", f"a={tmp_path / 'a'}"])
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    _check(data["environment"])
    assert data["timing"]["a"]["tokens_per_s_ratio"] == 1.0 and data["timing"]["b"]["tokens_per_s"] > 0
    assert "x1.000 of a's" in capsys.readouterr().out
