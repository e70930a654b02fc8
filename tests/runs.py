"""Training runs as real processes for the tests: launch with python, accelerate or torchrun, watch, finish."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synthetic_data import VIDEO_FRAMES

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    """Environment of a training subprocess: no inherited rank variables, one thread, wandb offline."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "WANDB_API_KEY")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    return env


def _overrides(index: Path, steps: int, batch: int, **extra: object) -> list[str]:
    """A tiny run: 64x64 crops, 3-frame clips, a dataloader worker per rank, a line per step."""
    base = {
        "data.train": f"[{index}]", "data.short_side": "[64,72]", "data.crop": 64, "data.clip_len": 3,
        "data.num_workers": 1, "data.videos_per_epoch": len(VIDEO_FRAMES),
        "optim.lr": 1e-3, "schedule.total_steps": steps, "schedule.lr_step": 0, "train.batch_size": batch,
        "log.every": 1, "log.progress": "false", "train.checkpoint_every": steps,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _free_port() -> int:
    """A free TCP port for the rendezvous (other test runs may share the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(kind: str, run_dir: Path, overrides: list[str], env: dict[str, str] | None = None,
            resume: str = "auto", launcher_args: list[str] | None = None) -> subprocess.Popen:
    """Start a training run: `python` (1 process), `accelerate` or `torchrun` (2 processes);
    `launcher_args` go to the launcher (e.g. torchrun's --max-restarts)."""
    args = ["dulearn/train.py", "--config", "configs/cpu.yaml", "--run-dir", str(run_dir), "--resume", resume,
            *overrides]
    env = dict(env or _env())
    if kind == "python":
        cmd = [sys.executable, *args]
    elif kind == "accelerate":
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               *(launcher_args or []), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), *(launcher_args or []), *args]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / f"{run_dir.name}.{kind}.log", "ab")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, run_dir: Path, timeout: float = 240) -> int:
    """Wait for a run; fail with the tail of its log if it did not exit 0."""
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    if code != 0:
        pytest.fail(f"training exited with {code}:\n{_log(run_dir)[-6000:]}")
    return code


def _log(run_dir: Path) -> str:
    """What the runs in `run_dir` printed, every launcher's log."""
    return "".join(p.read_text(errors="replace") for p in sorted(run_dir.parent.glob(f"{run_dir.name}.*.log")))


def _metrics(run_dir: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Poll until `predicate()` holds while the run is alive."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before the awaited point"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


def _latest_step(run_dir: Path) -> int:
    """The step the `latest` pointer names (-1 before the first checkpoint)."""
    pointer = run_dir / "checkpoints" / "latest"
    return int(pointer.read_text().strip()[5:13]) if pointer.is_file() else -1


def _descendants(pid: int) -> list[int]:
    """pid and all its descendants (torchrun puts its workers in their own sessions)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            todo += [int(c) for c in task.read_text().split()]
    return out
