"""launch/slurm.py: dry-run script, checks before submission, and real runs on a two-node SLURM
controller (tests/slurm_cluster.py) and through submitit's local executor, on real shards of
synthetic H.264 videos."""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launch" / "slurm.py"
EXPECTED_2X8 = Path(__file__).parent / "data" / "expected_sbatch_2x8.txt"
VIDEOS = ("synth-2-0000.mp4", "synth-2-0001.mp4", "synth-2-0002.mp4")  # of the video_folder fixture
TINY = """\
# A few steps of real training on 32x32 crops (4x4 feature grid), 1 clip per rank.
data: {train: [%s], clip_len: 3, frame_gap: 1, short_side: [32, 40], crop: 32,
       num_workers: 0, steps_per_epoch: 5}
loss: {grid: 4, cv_grid: 2}
schedule: {total_steps: 3}
train: {batch_size: 2, cpu: true, checkpoint_every: 1000}
log: {every: 1, progress: false}
"""
JOB_ENV = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def launch(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the launcher CLI from the repository root."""
    return subprocess.run([sys.executable, str(LAUNCHER), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_config(video_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of three videos (short side 40) and a config training on them."""
    tmp = tmp_path_factory.mktemp("slurm-data")
    (tmp / "videos.txt").write_text("\n".join(VIDEOS) + "\n")
    subprocess.run([sys.executable, "shards/build.py", "videos", str(video_folder), "--out", str(tmp / "shards"),
                    "--file-list", str(tmp / "videos.txt"), "--short-side", "40", "--clip-len", "10",
                    "--shard-clips", "4", "--workers", "1"], cwd=ROOT, check=True, capture_output=True, timeout=120)
    config = tmp / "tiny.yaml"
    config.write_text(TINY % (tmp / "shards" / "index.json"))
    return config


def _job_id(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, out.stderr
    m = re.search(r"^job id:\s+(\d+)", out.stdout, re.M)
    assert m, out.stdout
    return m.group(1)


def submit(cluster: SlurmCluster, run_dir: Path, config: Path, *overrides: str) -> str:
    """Submit a 2-node CPU job (one gloo process per node) through the CLI; its job id."""
    out = launch("--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "10",
                 "--signal-delay", "60", "--run-dir", str(run_dir), "--config", str(config), *overrides,
                 env={**cluster.env, **JOB_ENV})
    job_id = _job_id(out)
    assert f"tail -F {run_dir}/slurm/{job_id}_0_log.out" in out.stdout
    return job_id


def wait_finished(cluster: SlurmCluster, job_id: str, run_dir: Path, timeout: float = 240) -> None:
    """Wait for COMPLETED; any other final state fails with the job's logs."""
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    cluster.wait(f"job {job_id} to end", lambda: cluster.job(job_id).get("JobState") in final, timeout=timeout)
    state = cluster.job(job_id)["JobState"]
    assert state == "COMPLETED", f"job {job_id} {state}\n{task_logs(run_dir)}"


def task_logs(run_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted((run_dir / "slurm").glob("*_log.*")))


def metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_results(run_dir: Path, job_id: str, ranks: int) -> list[dict]:
    """What each task returned (submitit's result pickles)."""
    results = []
    for rank in range(ranks):
        with open(run_dir / "slurm" / f"{job_id}_{rank}_result.pkl", "rb") as f:
            kind, value = pickle.load(f)
        assert kind == "success", value
        results.append(value)
    return results


def last_checkpoint(run_dir: Path) -> dict:
    name = (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=False)


def test_dry_run_matches_reviewed_sbatch(tmp_path: Path) -> None:
    (tmp_path / "index.json").write_text("{}")
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{train: [{tmp_path / 'index.json'}], steps_per_epoch: 100}}\n")
    run_dir = tmp_path / "runs" / "ytvos"
    out = launch("--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-task", "10", "--mem", "480G",
                 "--time", "2-00:00:00", "--partition", "gpu", "--account", "vision", "--constraint", "a100",
                 "--job-name", "dulearn-ytvos", "--slurm-extra", "mail-type=END", "--run-dir", str(run_dir),
                 "--config", str(config), "train.batch_size=32")
    assert out.returncode == 0, out.stderr
    script = out.stdout.replace(str(run_dir.resolve()), "<RUN_DIR>").replace(shlex.quote(sys.executable), "<PYTHON>")
    assert script == EXPECTED_2X8.read_text()
    assert not run_dir.exists(), "--dry-run must not create the run directory"


def test_errors_before_submission(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{train: [{tmp_path}], steps_per_epoch: 10}}\n")  # an existing path
    no_slurm = {"PATH": str(Path(sys.executable).parent)}
    out = launch("--run-dir", str(tmp_path / "run"), "--config", str(config), env=no_slurm)
    assert out.returncode == 2 and "no SLURM client (sbatch) on PATH; use --local" in out.stderr
    (tmp_path / "file").write_text("")
    out = launch("--local", "--run-dir", str(tmp_path / "file" / "run"), "--config", str(config), env=no_slurm)
    assert out.returncode == 2 and f"--run-dir {tmp_path / 'file' / 'run'}: not writable" in out.stderr
    out = launch("--dry-run", "--nodes", "3", "--gpus-per-node", "1", "--run-dir", str(tmp_path / "run"),
                 "--config", str(config), "train.batch_size=16", env=no_slurm)
    assert out.returncode == 2 and "train.batch_size: global batch 16 is not divisible by the number of " \
                                   "processes 3" in out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_gpus_beyond_partition_rejected(slurm_cluster: SlurmCluster, tiny_config: Path, tmp_path: Path) -> None:
    out = launch("--gpus-per-node", "8", "--run-dir", str(tmp_path / "run"), "--config", str(tiny_config),
                 "train.batch_size=8", env=slurm_cluster.env)
    assert out.returncode == 2 and "--gpus-per-node 8: partition (default) has at most 0 GPUs per node" in out.stderr
    out = launch("--partition", "nosuch", "--gpus-per-node", "0", "--run-dir", str(tmp_path / "run"),
                 "--config", str(tiny_config), env=slurm_cluster.env)
    assert out.returncode == 2 and "--partition nosuch: SLURM knows no such partition" in out.stderr
    assert slurm_cluster.run("squeue", "-h").strip() == ""


@pytest.mark.slow
def test_two_nodes_train_together(slurm_cluster: SlurmCluster, tiny_config: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job_id = submit(slurm_cluster, run_dir, tiny_config)
    wait_finished(slurm_cluster, job_id, run_dir)
    for rank, node in enumerate(slurm_cluster.nodes):  # each rank logs its node and the rendezvous
        log = (run_dir / "slurm" / f"{job_id}_{rank}_log.out").read_text()
        assert f"rank {rank}/2 local_rank 0 node {node} host " in log
        assert f"master {slurm_cluster.nodes[0]}:" in log
    results = final_results(run_dir, job_id, 2)
    assert [(r["status"], r["step"], r["node"]) for r in results] == [
        ("finished", 3, slurm_cluster.nodes[0]), ("finished", 3, slurm_cluster.nodes[1])]
    assert metric_steps(run_dir) == [1, 2, 3]
    ckpt = last_checkpoint(run_dir)
    assert ckpt["step"] == 3 and ckpt["data"]["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert ckpt["config"]["train"]["batch_size"] == 2  # the global batch: 1 clip on each node
    assert json.loads((run_dir / "launch.json").read_text())["requeues"] == 0


@pytest.mark.slow
def test_signal_checkpoints_requeues_and_resumes(slurm_cluster: SlurmCluster, tiny_config: Path,
                                                 tmp_path: Path) -> None:
    """USR2 from the controller (what --signal sends before the time limit) mid-training."""
    run_dir, total = tmp_path / "run", 14
    job_id = submit(slurm_cluster, run_dir, tiny_config, f"schedule.total_steps={total}", "log.wandb=true",
                    "log.image_every=0")
    metrics = run_dir / "metrics.jsonl"
    slurm_cluster.wait("2 training steps", lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2,
                       timeout=180, poll=0.1)
    slurm_cluster.run("scancel", "--signal=USR2", job_id)
    wait_finished(slurm_cluster, job_id, run_dir)

    log = (run_dir / "slurm" / f"{job_id}_0_log.out").read_text()
    stopped = re.search(r"trainer stopped: \{'status': 'checkpoint', 'step': (\d+)", log)
    assert stopped, task_logs(run_dir)
    saved = int(stopped.group(1))
    assert 2 <= saved < total
    # the checkpoint is written before the requeue, and the second run resumes from it
    assert log.index(f"checkpoint at step {saved};") < stopped.start() < log.index(f"Requeued job {job_id}")
    assert log.index(f"Requeued job {job_id}") < log.index(f"resumed from step {saved}")
    assert "requeues so far 1" in log
    launches = json.loads((run_dir / "launch.json").read_text())
    assert launches["requeues"] == 1 and [s["job_id"] for s in launches["starts"]] == [job_id, job_id]
    assert metric_steps(run_dir) == list(range(1, total + 1))  # none lost, none twice
    assert [r["status"] for r in final_results(run_dir, job_id, 2)] == ["finished", "finished"]
    ckpt = last_checkpoint(run_dir)
    assert ckpt["step"] == total
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))  # one per job start
    assert len(runs) == 2 and {r.rsplit("-", 1)[1] for r in runs} == {ckpt["wandb_id"]}, runs


@pytest.mark.slow
def test_local_two_processes(tiny_config: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = launch("--local", "--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "10", "--run-dir",
                 str(run_dir), "--config", str(tiny_config), env={**os.environ, **JOB_ENV},
                 timeout=240)
    job_id = _job_id(out)
    assert "done: {'status': 'finished', 'step': 3" in out.stdout, (out.stdout, task_logs(run_dir))
    for rank in range(2):
        assert f"rank {rank}/2 local_rank {rank} " in (run_dir / "slurm" / f"{job_id}_{rank}_log.out").read_text()
    assert metric_steps(run_dir) == [1, 2, 3]
    assert last_checkpoint(run_dir)["data"]["world_size"] == 2


def _task_pid(rank: int) -> int:
    """The process of SLURM task `rank` (srun's python running submitit's task), on this machine."""
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"SLURM_PROCID={rank}".encode() in env and b"submitit.core._submit" in cmd:
            return int(proc.name)
    raise AssertionError(f"no process of task {rank}")


@pytest.mark.slow
@pytest.mark.parametrize("requeues", [0, 1])
def test_a_killed_task_ends_the_job_and_requeue_resumes_it(slurm_cluster: SlurmCluster, tiny_config: Path,
                                                           tmp_path: Path, requeues: int) -> None:
    """SIGKILL of rank 1 at step 4: srun's kill-on-bad-exit ends the job within 60 s; with a requeue
    left, the job script's teardown requeues it and it finishes with every step logged once."""
    import signal
    import time

    run_dir, total = tmp_path / "run", 12
    out = launch("--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "10", "--signal-delay",
                 "60", "--max-requeues", str(requeues), "--run-dir", str(run_dir), "--config", str(tiny_config),
                 f"schedule.total_steps={total}", "train.checkpoint_every=2", env={**slurm_cluster.env, **JOB_ENV})
    job_id = _job_id(out)
    metrics = run_dir / "metrics.jsonl"
    slurm_cluster.wait("4 training steps", lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 4,
                       timeout=180, poll=0.1)
    os.kill(_task_pid(1), signal.SIGKILL)
    killed = time.monotonic()
    if requeues == 0:
        slurm_cluster.wait(f"job {job_id} to fail", lambda: cluster_state(slurm_cluster, job_id) == "FAILED",
                           timeout=90)
        assert time.monotonic() - killed < 60, task_logs(run_dir)
        return
    wait_finished(slurm_cluster, job_id, run_dir, timeout=300)
    log = (run_dir / "slurm" / f"{job_id}_0_log.out").read_text()
    assert "requeues so far 1" in log and "resumed from step" in log, task_logs(run_dir)
    assert json.loads((run_dir / "launch.json").read_text())["requeues"] == 1
    assert metric_steps(run_dir) == list(range(1, total + 1))  # none lost, none twice
    assert last_checkpoint(run_dir)["step"] == total


def cluster_state(cluster: SlurmCluster, job_id: str) -> str | None:
    return cluster.job(job_id).get("JobState")
