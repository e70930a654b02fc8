"""Faults across ranks and sources, with real processes and real servers: a dead data source, a
dead rank (torchrun, accelerate launch, torchrun's elastic restarts), a full disk, a checkpoint
with missing keys. Each ends the run within 60 s with a one-line reason and loses nothing."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dulearn import fileio
from dulearn.checkpoint import CheckpointWriteError
from loop_probe import fresh_accelerator, tiny_config, tiny_shards
from runs import ROOT, _descendants, _env, _latest_step, _launch, _log, _metrics, _overrides, _wait_for
from servers import free_port, http_server, stop

pytestmark = pytest.mark.timeout(400)
DEADLINE_S = 60  # a fault ends the run on every rank within this


def _steps(run_dir: Path) -> list[int]:
    return [m["step"] for m in _metrics(run_dir)] if (run_dir / "metrics.jsonl").exists() else []


def _logged_step(run_dir: Path, k: int):
    return lambda: bool(_steps(run_dir)) and _steps(run_dir)[-1] >= k


def _wait_exit(proc: subprocess.Popen, seconds: float) -> tuple[int, float]:
    """(exit code, seconds it took) of a run that must end within `seconds`."""
    start = time.monotonic()
    try:
        code = proc.wait(seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the run did not end within {seconds} s")
    return code, time.monotonic() - start


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def _rank_pid(proc: subprocess.Popen, rank: int) -> int:
    """The training process of `rank` under a launcher: RANK=rank in its environment, not in its parent's
    (its DataLoader workers inherit it from their parent)."""
    mark = f"RANK={rank}".encode()
    for pid in _descendants(proc.pid):
        if mark in _environ(pid):
            stat = Path(f"/proc/{pid}/stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if mark not in _environ(parent):
                return pid
    raise AssertionError(f"no rank {rank} process under {proc.pid}")


# ----------------------------------------------------------------------------- a dead source


@pytest.mark.slow
def test_a_source_that_dies_mid_run_stops_both_ranks_cleanly_and_resumes(shard_index, tmp_path):
    """http.server serving the shards is stopped at step 3: both ranks stop within 60 s, exit non-zero,
    with one line naming the URL; the last good step is checkpointed; a rerun finishes it."""
    served = shard_index.parent
    run_dir = tmp_path / "run"
    with http_server(served.parent) as (url, server):
        source = f"{url}/{served.name}/index.json"
        overrides = _overrides(source, 12, 2, **{"data.num_workers": 0, "train.checkpoint_every": 100})
        proc = _launch("torchrun", run_dir, overrides)
        _wait_for(_logged_step(run_dir, 3), proc)
        stop(server)
        code, took = _wait_exit(proc, DEADLINE_S + 30)
    log = _log(run_dir)
    assert code != 0 and took < DEADLINE_S, (code, took, log[-3000:])
    assert f"cannot read {url}/{served.name}/" in log and "training data failed" in log, log[-3000:]
    stopped = _latest_step(run_dir)
    assert stopped >= 3 and _steps(run_dir) == list(range(1, stopped + 1))  # the last good step is kept
    with http_server(served.parent) as (url2, _):
        overrides = _overrides(f"{url2}/{served.name}/index.json", 12, 2,
                               **{"data.num_workers": 0, "train.checkpoint_every": 100})
        proc = _launch("torchrun", run_dir, overrides)
        code, _ = _wait_exit(proc, 300)
    assert code == 0, _log(run_dir)[-3000:]
    assert _steps(run_dir) == list(range(1, 13))  # every step exactly once


def test_a_source_unreachable_at_start_is_one_line_and_exit_1(tmp_path, capsys):
    """Nothing listens at the index's URL: after the retries, one line naming it, exit 1 (no traceback)."""
    from dulearn.train import main

    url = f"http://127.0.0.1:{free_port()}/shards/index.json"
    with fresh_accelerator():  # cpu.yaml's precision, whatever an earlier in-process run used
        code = main(["--config", str(ROOT / "configs" / "cpu.yaml"), "--run-dir", str(tmp_path / "run"),
                     f"data.train=[{url}]", "data.num_workers=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith(f"error: cannot start the training data: cannot read {url} after 4 "
                                            "attempts: URLError"), err


# ----------------------------------------------------------------------------- a dead rank


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["torchrun", "accelerate"])
def test_a_killed_rank_ends_the_job_within_a_minute_naming_it(shard_index, tmp_path, kind):
    run_dir = tmp_path / "run"
    proc = _launch(kind, run_dir, _overrides(shard_index, 200, 2, **{"train.checkpoint_every": 2}))
    _wait_for(_logged_step(run_dir, 3), proc)
    os.kill(_rank_pid(proc, 1), signal.SIGKILL)
    code, took = _wait_exit(proc, DEADLINE_S + 30)
    log = _log(run_dir)
    assert code != 0 and took < DEADLINE_S, (code, took, log[-3000:])
    assert "error: lost rank 1 (" in log, log[-3000:]  # the survivor names the dead rank (not only the launcher)


@pytest.mark.slow
def test_torchrun_elastic_restart_resumes_with_every_step_once(shard_index, tmp_path):
    run_dir = tmp_path / "run"
    env = _env()
    proc = _launch("torchrun", run_dir, _overrides(shard_index, 10, 2, **{"train.checkpoint_every": 2}), env=env,
                   launcher_args=["--max-restarts", "1"])
    _wait_for(_logged_step(run_dir, 5), proc)
    os.kill(_rank_pid(proc, 1), signal.SIGKILL)
    code, _ = _wait_exit(proc, 300)
    assert code == 0, _log(run_dir)[-3000:]
    assert _steps(run_dir) == list(range(1, 11))  # steps after the last checkpoint were redone, logged once
    assert "resumed from step" in _log(run_dir)


# ----------------------------------------------------------------------------- disk and checkpoints


def test_a_full_disk_keeps_the_previous_checkpoint_and_stops(tmp_path, monkeypatch):
    """The third checkpoint write fails with ENOSPC halfway: step 2's checkpoint and `latest` stay, the
    partial file goes, and the run stops with one line."""
    from loop_probe import run_probed

    real_open, writes = open, []

    def full_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode and str(path).endswith(".pt.tmp." + str(os.getpid())):
            writes.append(path)
            if len(writes) == 2:
                original = f.write

                def write(data):
                    original(data[: len(data) // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

                f.write = write
        return f

    monkeypatch.setattr(fileio, "open", full_disk, raising=False)
    cfg = tiny_config(tiny_shards(tmp_path / "shards"), **{"schedule.total_steps": 6, "train.checkpoint_every": 2})
    with pytest.raises(CheckpointWriteError, match="No space left on device; the previous checkpoint "
                                                   r"\(step_00000002.pt\) is intact") as e:
        run_probed(cfg, tmp_path / "run", monkeypatch, lambda _: None)
    assert "\n" not in str(e.value)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000002.pt"]  # no partial file left
    assert torch.load(ckpts / "step_00000002.pt", weights_only=True)["step"] == 2


@pytest.mark.slow
def test_a_full_tmpfs_keeps_the_previous_checkpoint(shard_index, tmp_path):
    """A real full disk: the run directory on a 200 MB tmpfs (a checkpoint is ~135 MB)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    try:
        run_dir = mount / "run"
        proc = _launch("python", run_dir, _overrides(shard_index, 6, 2, **{"train.checkpoint_every": 2}))
        code, _ = _wait_exit(proc, 240)
        log = _log(run_dir)
        assert code == 1 and "No space left on device; the previous checkpoint (step_00000002.pt) is intact" in log
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000002.pt"]
        assert torch.load(run_dir / "checkpoints" / "step_00000002.pt", weights_only=True)["step"] == 2
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_resume_refuses_a_checkpoint_without_the_head(shard_index, tmp_path):
    run_dir = tmp_path / "run"
    proc = _launch("python", run_dir, _overrides(shard_index, 2, 2))
    assert _wait_exit(proc, 240)[0] == 0, _log(run_dir)[-3000:]
    path = run_dir / "checkpoints" / "step_00000002.pt"
    state = torch.load(path, weights_only=True)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("head.")}
    torch.save(state, path)
    done = subprocess.run([*_launch_args(run_dir, _overrides(shard_index, 4, 2))], capture_output=True, text=True,
                          env=_env(), cwd=Path(__file__).resolve().parents[1], timeout=240)
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot resume: checkpoint does not match the dulearn model: missing keys "
                           "['head."), line


def _launch_args(run_dir: Path, overrides: list[str]) -> list[str]:
    import sys

    return [sys.executable, "dulearn/train.py", "--config", "configs/cpu.yaml", "--run-dir", str(run_dir),
            *overrides]


# ----------------------------------------------------------------------------- evaluation across ranks


@pytest.mark.slow
def test_training_time_evaluation_is_split_across_ranks_and_gathered(shard_index, davis_set, tmp_path):
    """2 ranks evaluate 3 sequences (2 + 1) at step 3, between logging steps: no hang, and the gathered
    J&F equals one process evaluating all sequences with the same weights (best.pt of that step)."""
    from dulearn import evaluate

    run_dir = tmp_path / "run"
    overrides = _overrides(shard_index, 4, 2, **{"eval.davis_root": str(davis_set), "eval.every": 3,
                                                 "eval.input_size": 64, "log.every": 2, "model.channels_last": "false",
                                                 "train.mixed_precision": "no"})
    proc = _launch("torchrun", run_dir, overrides)
    code, _ = _wait_exit(proc, 300)
    assert code == 0, _log(run_dir)[-3000:]
    line = next(m for m in _metrics(run_dir) if m["step"] == 3)
    assert [m["step"] for m in _metrics(run_dir)] == [2, 3, 4]
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=False)
    assert best["step"] == 3
    model = evaluate.build_model(run_dir / "checkpoints" / "best.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran (OMP_NUM_THREADS=1): the same sums, the same masks
    try:
        alone = evaluate.evaluate_davis(model, davis_set, input_size=64)
    finally:
        torch.set_num_threads(threads)
    assert line["eval/J&F-Mean"] == pytest.approx(alone["J&F-Mean"], abs=1e-6)
