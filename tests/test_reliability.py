"""Fault injection: each test reproduces an attack on a run (issue 12) and checks that nothing is lost.

kill -9 during saves, a second Ctrl-C / a full disk in the middle of a save, SIGTERM, NaN, two writers on one
folder, planted symlinks, foreign folders, a failed --resume, a rank that stops answering, malformed files.
docs/reliability.md lists the guarantees these tests stand for.
"""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import types
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moekit.cli.main import main
from moekit.configs import ConfigError
from moekit.parallel import init_from_env, run_local
from moekit.recipes import load_preset
from moekit.routing import RouterConfig
from moekit.training import (
    CheckpointError,
    TrainConfig,
    load_run,
    train,
    train_step,
    with_overrides,
)
from moekit.training import checkpoint as ckpt
from moekit.training.checkpoint import (
    checkpoint_dir,
    clean_checkpoints,
    has_checkpoint,
    read_checkpoint,
    read_state,
    weights_path,
    write_checkpoint,
)
from moekit.training.distributed import explain_collective_error
from moekit.training.optim import build_optimizer
from moekit.training.rundir import RunLock
from moekit.training.trainer import NonFiniteError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def tiny(**overrides):
    base = {"train.eval_every": "0", "train.eval_batches": "1"}
    return with_overrides(load_preset("tiny"), {**base, **overrides})


def fails_with(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def leftovers(run_dir: Path) -> list[str]:
    """Temporary files and folders of interrupted writes, and checkpoint sets beyond the current one."""
    found = [p.name for folder in (run_dir, run_dir / "ckpt") if folder.is_dir() for p in folder.iterdir()
             if p.name.startswith((".tmp-", ".trash-"))]
    sets = [p.name for p in (run_dir / "ckpt").iterdir() if p.name.startswith("step_")] \
        if (run_dir / "ckpt").is_dir() else []
    return found + sets[:-1] if len(sets) > 1 else found


def set_of(step: int, n: int = 1 << 16) -> tuple[dict, dict, dict]:
    """A checkpoint whose every value is ``step``: a torn set (files of two steps) cannot pass for whole."""
    w = torch.full((n,), float(step))
    return {"w": w, "b": w[:7].clone()}, {"w": {"exp_avg": w.clone(), "step": torch.tensor(float(step))}}, \
        {"step": step, "tokens": step}


def assert_whole(run_dir: Path) -> int:
    state, model, optim, rng = read_checkpoint(run_dir)
    step = state["step"]
    assert torch.all(model["w"] == step) and torch.all(model["b"] == step), step
    assert torch.all(optim["w"]["exp_avg"] == step) and "rng.torch" in rng
    return step


# --------------------------------------------------------------------------------------------- kill -9 loop

SAVER = """
import sys, torch
from moekit.training.checkpoint import write_checkpoint
out, step = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
while True:
    step += 1
    w = torch.full((1 << 18,), float(step))
    write_checkpoint(out, {"w": w, "b": w[:7].clone()}, {"w": {"exp_avg": w.clone(), "step": torch.tensor(1.0)}},
                     {"step": step, "tokens": step})
"""


def test_kill_9_at_random_moments_during_saves_always_leaves_a_whole_checkpoint(tmp_path):
    rng = random.Random(12)
    run = tmp_path / "run"
    model, optim, state = set_of(1)
    write_checkpoint(run, model, optim, state)
    last = 1
    for _ in range(5):
        child = subprocess.Popen([sys.executable, "-c", SAVER, str(run), str(last)], env=ENV,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.02, 0.4))  # somewhere in a save: writing, fsync, the rename or the cleanup
        child.kill()
        child.wait()
        step = assert_whole(run)
        assert step >= last  # never back to an older checkpoint, never a torn one
        last = step
    assert last > 1  # the saver did save meanwhile
    clean_checkpoints(run)  # what the next writer does first
    assert leftovers(run) == [] and [p.name for p in (run / "ckpt").iterdir()] == [f"step_{last:08d}"]


def test_an_interrupted_commit_keeps_the_previous_set(tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_checkpoint(run, *set_of(3))

    def second_ctrl_c(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(ckpt.os, "rename", second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(run, *set_of(4))
    monkeypatch.undo()
    assert assert_whole(run) == 3 and leftovers(run) == []
    # interrupted while deleting the old set: the new one is already current
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(run, *set_of(5))
    monkeypatch.undo()
    assert assert_whole(run) == 5
    assert any(n.startswith(".trash-") for n in leftovers(run))
    clean_checkpoints(run)
    assert leftovers(run) == []


def test_full_disk_during_a_save_keeps_the_previous_set_and_leaves_nothing(tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_checkpoint(run, *set_of(3))
    real = ckpt.save_file

    def half_then_enospc(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        raise OSError(errno.ENOSPC, "No space left on device", path)
    monkeypatch.setattr(ckpt, "save_file", half_then_enospc)
    with pytest.raises(OSError, match="No space left"):  # an OSError: the CLI prints it in one line
        write_checkpoint(run, *set_of(4))
    assert assert_whole(run) == 3 and leftovers(run) == []
    # single files too: a failed write leaves the old file and no temporary one
    ckpt.write_json(run / "summary.json", {"a": 1})
    monkeypatch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError):
        ckpt.write_json(run / "summary.json", {"a": 2})
    monkeypatch.undo()
    assert json.loads((run / "summary.json").read_text()) == {"a": 1} and leftovers(run) == []


def test_a_second_save_of_one_step_is_a_new_revision_and_readers_follow(tmp_path):
    run = tmp_path / "run"
    write_checkpoint(run, *set_of(2))
    first = weights_path(run)
    model, optim, state = set_of(2)
    model["w"] += 0  # same step, written again (e.g. a periodic save then the final one)
    write_checkpoint(run, model, optim, state)
    assert weights_path(run).parent.name == "step_00000002_r1" and not first.exists()
    assert assert_whole(run) == 2


def test_non_finite_tensors_are_never_saved(tmp_path):
    run = tmp_path / "run"
    write_checkpoint(run, *set_of(1))
    model, optim, state = set_of(2)
    model["w"][5] = float("nan")
    with pytest.raises(CheckpointError, match="refusing to save step 2: model tensor 'w' holds NaN"):
        write_checkpoint(run, model, optim, state)
    model, optim, state = set_of(2)
    optim["w"]["exp_avg"][0] = float("inf")
    with pytest.raises(CheckpointError, match="optimizer tensor"):
        write_checkpoint(run, model, optim, state)
    assert assert_whole(run) == 1 and leftovers(run) == []


# ----------------------------------------------------------------------------------- the trainer, end to end

def _wait_for(predicate, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def _state_step(run: Path) -> int:
    try:
        return read_state(run)["step"]
    except CheckpointError:
        return -1


@pytest.mark.slow
def test_second_writer_sigterm_and_kill_9_on_a_training_run(tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "moekit", "train", "--preset", "tiny", "--out", str(run), "--no-progress",
            "--train.max_steps=100000", "--train.checkpoint_every=3", "--train.eval_every=0"]
    child = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _state_step(run) >= 3)
        # a second trainer on the same folder is refused, and changes nothing
        config = (run / "config.json").read_bytes()
        with pytest.raises(CheckpointError, match=f"in use by another moekit process \\(pid {child.pid}\\)"):
            train(tiny(), run, resume=True, progress=False)
        assert (run / "config.json").read_bytes() == config
        # SIGTERM: checkpoint, summary and plots, exit 128 + 15
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 143, child.stderr.read()
    finally:
        child.kill()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_early"] and summary["stopped_by"] == "SIGTERM" and "val_loss" not in summary
    assert summary["step"] == read_state(run)["step"] and (run / "loss.png").is_file()
    # resume, then kill -9 at a random moment (the lock dies with the process)
    child = subprocess.Popen([sys.executable, "-m", "moekit", "train", "--resume", "--out", str(run), "--no-progress",
                              "--train.checkpoint_every=1"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    before = summary["step"]
    _wait_for(lambda: _state_step(run) >= before + 2 or child.poll() is not None)
    assert child.poll() is None, child.stderr.read()
    time.sleep(random.Random(0).uniform(0.0, 0.3))
    child.kill()
    child.wait()
    step = read_state(run)["step"]
    result = train(with_overrides(tiny(), {"train.max_steps": str(step + 2), "train.checkpoint_every": "1"}), run,
                   resume=True, progress=False)
    assert result.summary["step"] == step + 2 and leftovers(run) == []
    steps = [r["step"] for r in result.records if "loss" in r]
    assert steps == list(range(1, step + 3))  # metrics cut back to the checkpoint, then continued


def test_sigterm_in_process_stops_with_a_checkpoint_summary_and_plots(tmp_path, monkeypatch):
    # SIGTERM arrives during step 3: the run stops after it, as with Ctrl-C
    real = train_step

    def step_then_sigterm(model, optimizer, data, cfg, step, *args, **kwargs):
        out = real(model, optimizer, data, cfg, step, *args, **kwargs)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    monkeypatch.setattr("moekit.training.trainer.train_step", step_then_sigterm)
    result = train(tiny(), tmp_path / "run", progress=False)
    assert result.stopped_by == "SIGTERM" and read_state(tmp_path / "run")["step"] == 3
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 3 and summary["stopped_by"] == "SIGTERM" and summary["last_loss"] > 0
    assert (tmp_path / "run" / "loss.png").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_periodic_checkpoints_by_steps_and_by_time(tmp_path, monkeypatch):
    assert TrainConfig().checkpoint_every > 0 and TrainConfig().checkpoint_seconds  # on by default
    saved = []
    real = ckpt.write_checkpoint

    def record(out_dir, model_state, optimizer_state, state):
        saved.append(state["step"])
        real(out_dir, model_state, optimizer_state, state)
    monkeypatch.setattr("moekit.training.distributed.write_checkpoint", record)
    monkeypatch.setattr(ckpt, "write_checkpoint", record)
    train(tiny(**{"train.max_steps": "7", "train.checkpoint_every": "3", "train.checkpoint_seconds": "0"}),
          tmp_path / "steps", progress=False)
    assert saved == [3, 6, 7]
    saved.clear()
    train(tiny(**{"train.max_steps": "3", "train.checkpoint_every": "0", "train.checkpoint_seconds": "1e-9"}),
          tmp_path / "time", progress=False)
    assert saved == [1, 2, 3]  # every step is past a 1 ns interval; the final save is not repeated


# ------------------------------------------------------------------------------------------------------ NaN

def test_divergent_lr_stops_with_one_line_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    fails_with(capsys, ["train", "--preset", "tiny", "--out", str(run), "--no-progress", "--train.lr=1e30",
                        "--train.checkpoint_every=1", "--train.eval_every=0"],
               "is not finite; training stopped", "--train.on_nonfinite=skip")
    model = load_run(run)[1]
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())
    assert not (run / "summary.json").exists()
    fails_with(capsys, ["train", "--preset", "tiny", "--out", str(tmp_path / "x"), "--train.lr=inf"],
               "train.lr=inf must be a finite number")
    assert not (tmp_path / "x").exists()


def _nan_loss(monkeypatch):
    nan_f = types.SimpleNamespace(cross_entropy=lambda *a, **k: torch.nn.functional.cross_entropy(*a, **k) * float("nan"))
    monkeypatch.setattr("moekit.layers.step_hook.F", nan_f)


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_nan_step_never_reaches_the_weights(mode, monkeypatch):
    from moekit.data import load_data
    from moekit.models import LanguageModel
    cfg = tiny(**{"train.on_nonfinite": mode})
    model = LanguageModel(cfg.model)
    opt = build_optimizer(model, cfg.train)
    data = load_data(cfg.data)
    train_step(model, opt, data, cfg, 0, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    _nan_loss(monkeypatch)
    if mode == "stop":
        with pytest.raises(NonFiniteError, match="step 2: loss nan"):
            train_step(model, opt, data, cfg, 1, torch.device("cpu"))
    else:
        assert train_step(model, opt, data, cfg, 1, torch.device("cpu"))["skipped"] == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    after = opt.state[next(model.parameters())]
    assert all(torch.equal(moments[k], after[k]) for k in moments)
    assert all(p.grad is None for p in model.parameters())


def test_skip_mode_gives_up_after_ten_non_finite_steps_in_a_row(tmp_path, monkeypatch):
    _nan_loss(monkeypatch)
    with pytest.raises(NonFiniteError, match="10 steps in a row"):
        train(tiny(**{"train.on_nonfinite": "skip"}), tmp_path / "run", progress=False)
    assert not has_checkpoint(tmp_path / "run")


def test_non_finite_settings_are_refused():
    for field in ("lr", "weight_decay", "grad_clip", "max_seconds"):
        with pytest.raises(ConfigError, match=f"train.{field}=inf must be a finite number"):
            TrainConfig(**{field: float("inf")})
    with pytest.raises(ConfigError, match="train.lr=nan"):
        TrainConfig(lr=float("nan"))
    for field in ("aux_loss_coef", "z_loss_coef", "capacity_factor"):
        with pytest.raises(ConfigError, match=f"router.{field}=inf"):
            RouterConfig(**{field: float("inf")})


# ------------------------------------------------------------------------------------------------ run folders

def test_a_second_writer_is_refused_and_a_crashed_holder_releases_the_lock(tmp_path):
    run = tmp_path / "run"
    script = ("import sys, time\nfrom moekit.training.rundir import RunLock\nRunLock(sys.argv[1]).acquire()\n"
              "print('locked', flush=True)\ntime.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(run)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=f"in use by another moekit process \\(pid {holder.pid}\\)"):
            train(tiny(), run, progress=False)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    with RunLock(run), pytest.raises(CheckpointError, match="in use"):  # released with the dead process
        RunLock(run).acquire()


def test_symlinks_planted_in_a_run_folder_are_replaced_not_written_through(tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # a run folder (of a run that never checkpointed)
    for name in ("metrics.jsonl", "summary.json", "loss.png", "expert_load.png", "config.json"):
        (outside / name).write_text("keep me")
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(outside / name)
    train(tiny(**{"train.max_steps": "2", "train.eval_every": "2"}), run, progress=False)
    for name in ("metrics.jsonl", "summary.json", "loss.png", "expert_load.png", "config.json"):
        assert (outside / name).read_text() == "keep me", name
        assert not (run / name).is_symlink() and (run / name).stat().st_size > 0, name
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(outside / "config.json")
    with pytest.raises(CheckpointError, match="is a symlink"):
        train(tiny(), run, resume=True, progress=False)
    assert (outside / "config.json").read_text() == "keep me"


def test_out_folders_that_are_not_runs_are_refused(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    fails_with(capsys, ["train", "--preset", "tiny", "--out", str(foreign)], "is not empty and is not a moekit run")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    fails_with(capsys, ["train", "--preset", "tiny", "--out", str(foreign / "notes.txt")], "is a file")
    with pytest.raises(ConfigError, match="name='../../x' must be a plain label"):
        tiny(name="../../x")
    config = tmp_path / "escape.toml"
    config.write_text('name = "../../x"\n')
    fails_with(capsys, ["train", "--preset", "tiny", "--config", str(config)], "must be a plain label")


def test_resume_refuses_cleanly_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(**{"train.max_steps": "2"}), run, progress=False)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    fails_with(capsys, ["train", "--resume", "--out", str(run), "--train.max_steps=4", "--data.source=text",
                        f"--data.path={tmp_path / 'nowhere'}"], "nowhere")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files  # config.json untouched
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_bytes((run / "config.json").read_bytes())
    fails_with(capsys, ["train", "--resume", "--out", str(empty)], "holds no checkpoint yet",
               "start it again without --resume")
    fails_with(capsys, ["train", "--resume", "--out", str(tmp_path / "missing")], "does not exist")


def test_orphaned_temporaries_are_cleaned_when_a_run_resumes(tmp_path):
    run = tmp_path / "run"
    train(tiny(**{"train.max_steps": "2"}), run, progress=False)
    (run / "ckpt" / ".tmp-step_00000003-abc").mkdir()
    (run / "ckpt" / ".tmp-step_00000003-abc" / "model.safetensors").write_bytes(b"half")
    (run / ".tmp-summary-xyz.json").write_text("{")
    train(tiny(**{"train.max_steps": "3"}), run, resume=True, progress=False)
    assert leftovers(run) == [] and read_state(run)["step"] == 3


def test_malformed_files_give_one_line_errors(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(**{"train.max_steps": "2"}), run, progress=False)
    state = checkpoint_dir(run) / "state.json"
    good = state.read_text()
    for bad, message in (("[1, 2]", "a JSON list, not an object"), ('{"tokens": 3}', "has no valid step"),
                         ('{"step": "2"}', "has no valid step")):
        state.write_text(bad)
        fails_with(capsys, ["eval", str(run)], message)
    state.write_text(good)
    (run / "config.json").write_text("[]")
    fails_with(capsys, ["eval", str(run)], "config.json is corrupt")
    with open(run / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n7\n")
    from moekit.training.metrics import read_metrics
    assert all(isinstance(r, dict) for r in read_metrics(run / "metrics.jsonl"))


# -------------------------------------------------------------------------------------------- stopped rank

def _stopped_rank(report: str) -> None:
    groups = init_from_env(2, backend="gloo", timeout=timedelta(seconds=2))
    if groups.rank == 1:
        time.sleep(60)  # stopped: never reaches the collective (killed by the launcher once rank 0 fails)
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=groups.ep_group)  # an expert-parallel group's collective
    except RuntimeError as e:
        explained = explain_collective_error(e, 2, groups.rank)
        Path(report).write_text(json.dumps({"seconds": time.monotonic() - start, "error": str(explained)}))
        raise


def test_a_stopped_rank_fails_its_peers_after_the_configured_timeout(tmp_path):
    report = tmp_path / "report.json"
    start = time.monotonic()
    with pytest.raises(Exception, match="RuntimeError"):  # rank 0 raised; the launcher stops rank 1
        run_local(_stopped_rank, 2, str(report), timeout=90)
    assert time.monotonic() - start < 60  # not torch's 30-minute default for new groups
    got = json.loads(report.read_text())
    assert got["seconds"] < 20
    assert got["error"].startswith("rank 0: a collective failed because another rank died, was stopped or did "
                                   "not answer within parallel.timeout_s=2 s")


# -------------------------------------------------------------------------- bad input: one line, exit 2

def test_wrong_types_are_refused_from_python_too():
    from moekit import MoEConfig
    base = {"dim": 8, "hidden_dim": 8, "num_experts": 4}
    with pytest.raises(ConfigError, match="moe.top_k=True is a bool, not int"):
        MoEConfig(**base, top_k=True)
    with pytest.raises(ConfigError, match="moe.num_shared_experts=1.5 is a float, not int"):
        MoEConfig(**base, num_shared_experts=1.5)
    with pytest.raises(ConfigError, match="router.norm_topk_prob='no' is a str, not bool"):
        RouterConfig(norm_topk_prob="no")
    assert RouterConfig(capacity_factor=2).capacity_factor == 2  # an int where a float is declared is fine


def test_empty_or_too_little_data_is_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    for extra, message in ((f"--data.path={tmp_path / 'empty.txt'}", "left an empty training or validation"),
                           (f"--data.path={tmp_path / 'folder'}", "holds no text files"),
                           ("--data.max_bytes=1", "left an empty training or validation"),
                           ("--data.max_bytes=100", "fewer than model.context=32 + 2")):
        source = [] if "max_bytes" in extra else ["--data.source=text"]
        fails_with(capsys, ["train", "--preset", "tiny", "--out", str(tmp_path / "run"), *source, extra], message)
        assert not (tmp_path / "run").exists()


def test_sample_and_analyze_refuse_bad_input_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(**{"train.max_steps": "1"}), run, progress=False)
    fails_with(capsys, ["sample", str(run), "--temperature", "nan"], "finite --temperature")
    fails_with(capsys, ["sample", str(run), "--prompt", "\udcff"], "--prompt is not valid UTF-8")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8\n")
    fails_with(capsys, ["analyze", str(run), "--text", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "an")],
               "is not valid UTF-8")
    assert not (tmp_path / "an").exists()


def test_zero_tokens_give_zero_losses_and_a_dtype_mismatch_is_named():
    from moekit import MoE, MoEConfig, RoutingContext
    moe = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=4, top_k=2,
                        router=RouterConfig(aux_loss_coef=0.01, z_loss_coef=1e-3)))
    ctx = RoutingContext()
    y = moe(torch.randn(0, 8), ctx)
    assert y.shape == (0, 8) and set(ctx.losses) == {"aux_loss", "z_loss"}
    assert all(float(v.detach()) == 0.0 for v in ctx.losses.values())  # not NaN
    ctx.total_loss().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in moe.parameters())
    with pytest.raises(ValueError, match=r"input dtype torch.float64 does not match the layer.s weights \(torch.float32\)"):
        moe(torch.randn(3, 8, dtype=torch.float64))


def test_hf_split_and_non_text_values_of_a_saved_dataset_are_checked(tmp_path):
    datasets = pytest.importorskip("datasets")
    from moekit.data import DataConfig, load_data
    datasets.Dataset.from_dict({"body": ["abc " * 20] * 20, "n": list(range(20))}).save_to_disk(str(tmp_path / "ds"))
    assert len(load_data(DataConfig(source="hf", path=str(tmp_path / "ds"), hf_text_field="body")).train) > 0
    with pytest.raises(ConfigError, match="data.hf_split='test' but .* is a single saved split"):
        load_data(DataConfig(source="hf", path=str(tmp_path / "ds"), hf_text_field="body", hf_split="test"))
    with pytest.raises(ConfigError, match="row 0 of column 'n' .* is a int, not text"):
        load_data(DataConfig(source="hf", path=str(tmp_path / "ds"), hf_text_field="n"))


def test_the_configured_timeout_reaches_every_process_group(monkeypatch):
    from moekit.training import ParallelConfig
    from moekit.training.distributed import Distributed
    assert ParallelConfig().timeout_s == 300.0
    with pytest.raises(ConfigError, match="parallel.timeout_s=0"):
        ParallelConfig(timeout_s=0)
    seen = {}

    def fake_init(ep, backend=None, timeout=None):
        seen.update(ep=ep, timeout=timeout)
        raise ValueError("stop here")
    monkeypatch.setattr("moekit.parallel.init_from_env", fake_init)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = tiny(**{"parallel.timeout_s": "7"})
    with pytest.raises(ConfigError, match="stop here"):
        Distributed.start(cfg)
    assert seen == {"ep": 1, "timeout": timedelta(seconds=7)}


def test_a_reader_follows_a_writer_that_replaced_the_set_under_it(tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_checkpoint(run, *set_of(1))
    real = ckpt._read_state_in
    calls = []

    def writer_strikes_first(folder):
        if not calls:  # the reader chose step 1; a writer commits step 2 and deletes step 1 before it reads
            write_checkpoint(run, *set_of(2))
        calls.append(folder.name)
        return real(folder)
    monkeypatch.setattr(ckpt, "_read_state_in", writer_strikes_first)
    assert assert_whole(run) == 2 and calls == ["step_00000001", "step_00000002"]


FULL_DISK = """
import errno, sys, torch
from pathlib import Path
from moekit.training.checkpoint import read_checkpoint, write_checkpoint, write_json
run = Path(sys.argv[1]) / "run"
w = torch.full((1 << 16,), 1.0)  # 256 KiB: fits
write_checkpoint(run, {"w": w}, {"w": {"exp_avg": w}}, {"step": 1})
big = torch.full((1 << 20,), 2.0)  # 4 MiB per file: does not fit in 2 MiB
try:
    write_checkpoint(run, {"w": big}, {"w": {"exp_avg": big}}, {"step": 2})
except OSError as e:  # not safetensors' own error type: the CLI prints an OSError in one line
    assert e.errno == errno.ENOSPC and "previous checkpoint is kept" in str(e), e
else:
    raise SystemExit("the big checkpoint fitted")
state, model, optim, _ = read_checkpoint(run)
assert state["step"] == 1 and torch.all(model["w"] == 1.0)
names = sorted(p.name for p in (run / "ckpt").iterdir())
assert names == ["step_00000001"], names
try:
    write_json(run / "summary.json", {"pad": "x" * (3 << 20)})
except OSError as e:
    assert e.errno == errno.ENOSPC, e
assert not (run / "summary.json").exists() and not [p for p in run.iterdir() if p.name.startswith(".tmp-")]
print("ok")
"""


def test_a_real_full_disk_on_a_small_tmpfs(tmp_path):
    """The disk-full attack on a real 2 MiB tmpfs, mounted in a private user and mount namespace (no root and
    no trace outside the test); skipped where the platform does not allow that."""
    import shutil
    if shutil.which("unshare") is None or sys.platform != "linux":
        pytest.skip("needs Linux unshare for a private tmpfs")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=2m tmpfs {tmp_path}"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs here ({probe.stderr.decode().strip()[:80]})")
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                             'mount -t tmpfs -o size=2m tmpfs "$0" && exec "$1" -c "$2" "$0"', str(tmp_path),
                             sys.executable, FULL_DISK], env=ENV, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_files_and_sets_keep_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_checkpoint(tmp_path / "run", *set_of(1))
        ckpt.write_json(tmp_path / "run" / "summary.json", {})
    finally:
        os.umask(old)
    assert (checkpoint_dir(tmp_path / "run").stat().st_mode & 0o777) == 0o755
    assert (weights_path(tmp_path / "run").stat().st_mode & 0o777) == 0o644
    assert ((tmp_path / "run" / "summary.json").stat().st_mode & 0o777) == 0o644
