"""Submit dulearn training to SLURM through submitit: N nodes x G GPUs, preemption-safe.

    python launch/slurm.py --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        --run-dir /shared/runs/ytvos --config configs/ytvos.yaml train.batch_size=32

One task per GPU (with --gpus-per-node 0: one CPU process per node, gloo). Each task sets
MASTER_ADDR (first host of the job), MASTER_PORT (from the job id), RANK, WORLD_SIZE and
LOCAL_RANK through submitit's TorchDistributedEnvironment, logs with a [rank r/w] prefix to
its own log file, and runs dulearn.train.train in-process; the global batch is the
config's, whatever the number of nodes. SLURM sends USR2 --signal-delay seconds
before the time limit (and on preemption where the cluster is set up so): submitit's
checkpoint hook on rank 0 asks the trainer to save at the next step boundary, waits for the
checkpoint, and requeues the job, which resumes from the run directory's latest checkpoint
with the same wandb run id. --local runs the same tasks through submitit's local executor.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import submitit
from submitit.slurm.slurm import _make_sbatch_string

from dulearn.config import Config, ConfigError, load_config, validate
from dulearn.fileio import atomic_write_bytes

LAUNCH_LOG = "launch.json"  # run-dir record of job starts; requeues = restarts of a job id
logger = logging.getLogger("dulearn.slurm")


class LaunchError(RuntimeError):
    """A problem found before submission; the message is one line."""


@dataclass(frozen=True)
class JobSpec:
    """What every task of every (re)start of the job needs."""

    cfg: Config
    run_dir: str
    max_requeues: int
    checkpoint_timeout_s: float  # how long the checkpoint hook waits for the trainer's save


def read_launch_log(run_dir: str | Path) -> dict[str, Any]:
    """The run's job starts and requeue count ({"starts": [], "requeues": 0} for a new run)."""
    path = Path(run_dir) / LAUNCH_LOG
    return json.loads(path.read_text()) if path.is_file() else {"starts": [], "requeues": 0}


def record_start(run_dir: str | Path, env: submitit.JobEnvironment) -> dict[str, Any]:
    """Append this job start to the run's launch log (rank 0); a repeated job id is a requeue."""
    log = read_launch_log(run_dir)
    log["starts"].append({"job_id": env.job_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                          "nodes": list(env.hostnames), "world_size": env.num_tasks})
    ids = [s["job_id"] for s in log["starts"]]
    log["requeues"] = len(ids) - len(set(ids))
    atomic_write_bytes(Path(run_dir) / LAUNCH_LOG, json.dumps(log, indent=1).encode())
    return log


class TrainTask(submitit.helpers.Checkpointable):
    """One task of the job: joins the process group and runs the trainer in-process.

    The trainer runs in a worker thread so that the main thread, where Python runs signal
    handlers (submitit's USR2 handler calls `checkpoint`), stays free to wait for its save.
    """

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self._thread: threading.Thread | None = None
        self._outcome: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Only the spec travels in the (re)submission pickle, not the running thread."""
        return {"spec": self.spec}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["spec"])

    def __call__(self) -> dict[str, Any]:
        from dulearn.distributed import export_slurm_env
        from dulearn.logger import setup_logging

        env = submitit.JobEnvironment()
        dist = export_slurm_env()
        setup_logging(all_ranks=True)  # each task has its own log file
        node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
        logger.info(f"job {env.job_id} rank {dist.rank}/{dist.world_size} local_rank {dist.local_rank} node {node} "
                    f"host {socket.gethostname()} master {dist.master_addr}:{dist.master_port}")
        if env.global_rank == 0:
            log = record_start(self.spec.run_dir, env)
            logger.info(f"run dir {self.spec.run_dir}, requeues so far {log['requeues']}")
        # a daemon: if the checkpoint hook gives up waiting, submitit's exit must not wait for it
        self._thread = threading.Thread(target=self._train, name="dulearn-train", daemon=True)
        self._thread.start()
        while self._thread.is_alive():
            self._thread.join(timeout=0.5)  # short waits: signal handlers run between them
        if "error" in self._outcome:
            raise self._outcome["error"]
        return {**self._outcome["result"], "rank": env.global_rank, "node": node}

    def _train(self) -> None:
        from dulearn.train import train

        try:
            self._outcome["result"] = train(self.spec.cfg, self.spec.run_dir, resume="auto")
        except BaseException as err:  # re-raised in the main thread
            self._outcome["error"] = err

    def checkpoint(self) -> submitit.helpers.DelayedSubmission | None:
        """submitit's USR2 hook (rank 0 only, no collectives): save, then requeue this task."""
        from dulearn.train import request_checkpoint

        request_checkpoint()  # every rank learns it through the loop's per-step stop agreement
        if self._thread is not None:
            self._thread.join(timeout=self.spec.checkpoint_timeout_s)
            if self._thread.is_alive():
                logger.warning(f"no checkpoint within {self.spec.checkpoint_timeout_s:.0f} s; requeuing anyway "
                               "(the job resumes from the latest periodic checkpoint)")
            else:
                logger.info(f"trainer stopped: {self._outcome.get('result') or self._outcome}")
        job_id = submitit.JobEnvironment().job_id
        requeues = sum(s["job_id"] == job_id for s in read_launch_log(self.spec.run_dir)["starts"]) - 1
        if requeues >= self.spec.max_requeues:
            logger.warning(f"not requeuing: job {job_id} was requeued {requeues} times (--max-requeues "
                           f"{self.spec.max_requeues}); resubmit with the same --run-dir to continue")
            return None
        return super().checkpoint()


def parse_time_minutes(text: str) -> int:
    """SLURM time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) as whole minutes, rounded up."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise LaunchError(f"--time {text!r}: expected minutes, H:M:S or D-H:M:S")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is not None:
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:
        seconds = a * 3600 + b * 60 + c
    else:
        seconds = a * 60 + (b or 0)
    if seconds <= 0:
        raise LaunchError(f"--time {text!r}: must be positive")
    return -(-seconds // 60)


def tasks_per_node(args: argparse.Namespace) -> int:
    """One task per GPU; --tasks-per-node (default 1) CPU processes on GPU-less nodes."""
    if args.gpus_per_node > 0:
        if args.tasks_per_node not in (None, args.gpus_per_node):
            raise LaunchError(f"--tasks-per-node {args.tasks_per_node}: must equal --gpus-per-node "
                              f"{args.gpus_per_node} (one task per GPU)")
        return args.gpus_per_node
    return args.tasks_per_node or 1


def parse_extra(items: Sequence[str]) -> dict[str, Any]:
    """--slurm-extra KEY=VALUE (or a bare KEY for a flag) as submitit's additional parameters."""
    extra: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key.strip():
            raise LaunchError(f"--slurm-extra {item!r}: expected KEY=VALUE")
        extra[key.strip()] = value if sep else True
    return extra


def slurm_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The SlurmExecutor parameters (sbatch options) of the request."""
    ntasks = tasks_per_node(args)
    params: dict[str, Any] = {
        "job_name": args.job_name, "nodes": args.nodes, "ntasks_per_node": ntasks,
        "time": parse_time_minutes(args.time), "signal_delay_s": args.signal_delay,
        "partition": args.partition, "account": args.account, "qos": args.qos,
        "constraint": args.constraint, "exclude": args.exclude, "mem": args.mem,
        "cpus_per_task": args.cpus_per_task, "gpus_per_node": args.gpus_per_node or None,
        "additional_parameters": parse_extra(args.slurm_extra) or None,
        "stderr_to_stdout": False,
        # a task that dies (SIGKILL, OOM) ends the whole step at once, not at the process-group timeout
        "srun_args": ["--kill-on-bad-exit=1"],
        # after a failed step: requeue the job when a task died, not when training itself gave up
        "teardown": [f"dulearn_status=$?; [ $dulearn_status -eq 0 ] || {shlex.quote(sys.executable)} -m launch.slurm "
                     f"requeue-failed {shlex.quote(str(Path(args.run_dir).resolve()))} --job-id $SLURM_JOB_ID "
                     f"--tasks $SLURM_NTASKS --max-requeues {args.max_requeues}; exit $dulearn_status"],  # the step's status
    }
    if args.cpus_per_task:
        # srun (Slurm >= 22.05) does not inherit --cpus-per-task from sbatch; torch threads per task
        params["setup"] = [f"export SRUN_CPUS_PER_TASK={args.cpus_per_task} OMP_NUM_THREADS={args.cpus_per_task}"]
    return {k: v for k, v in params.items() if v is not None}


def submitit_folder(run_dir: str | Path) -> Path:
    """Where submitit keeps the job's script, pickles and per-task logs."""
    return Path(run_dir).resolve() / "slurm"


def sbatch_script(args: argparse.Namespace) -> str:
    """The sbatch script a submission writes (what --dry-run prints)."""
    folder = submitit_folder(args.run_dir)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(args))


def _gres_gpus(gres: str) -> int:
    """GPUs in a node's Gres string (`gpu:8`, `gpu:a100:4(S:0-1),shard:...`, `(null)`)."""
    return sum(int(n) for n in re.findall(r"\bgpu(?::[^:,(]+)?:(\d+)", gres))


def partition_gpus(partition: str | None) -> int | None:
    """The most GPUs a node of the partition (default: the default one) has; None if unknown."""
    if shutil.which("sinfo") is None:
        return None
    cmd = ["sinfo", "-h", "-o", "%P|%G"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    rows = [line.split("|", 1) for line in out.stdout.splitlines() if "|" in line]
    if partition and not rows:
        raise LaunchError(f"--partition {partition}: SLURM knows no such partition (see `sinfo -s`)")
    if not partition:
        rows = [r for r in rows if r[0].endswith("*")]
    return max((_gres_gpus(gres) for _, gres in rows), default=None)


def check_run_dir(run_dir: str | Path) -> Path:
    """Create the run directory and prove it is writable (it must be on a shared file system)."""
    path = Path(run_dir).resolve()
    probe = path / f".write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise LaunchError(f"--run-dir {run_dir}: not writable ({err.strerror or err})") from None
    return path


def check_request(args: argparse.Namespace, world_size: int) -> Config:
    """Everything that can be checked before submission; returns the resolved config."""
    if args.max_requeues < 0 or args.signal_delay <= 0:
        raise LaunchError("--max-requeues must be >= 0 and --signal-delay > 0")
    if args.nodes < 1 or args.gpus_per_node < 0:
        raise LaunchError(f"--nodes {args.nodes} / --gpus-per-node {args.gpus_per_node}: must be >= 1 / >= 0")
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, world_size)
    except ConfigError as err:
        raise LaunchError(str(err)) from None
    if args.local:
        if args.nodes != 1:
            raise LaunchError(f"--nodes {args.nodes}: --local runs on this machine only (use --nodes 1)")
        return cfg
    if args.dry_run:
        return cfg
    if shutil.which("sbatch") is None:
        raise LaunchError("no SLURM client (sbatch) on PATH; use --local to run on this machine")
    available = partition_gpus(args.partition)
    if available is not None and args.gpus_per_node > available:
        raise LaunchError(f"--gpus-per-node {args.gpus_per_node}: partition {args.partition or '(default)'} "
                          f"has at most {available} GPUs per node (sinfo)")
    return cfg


def make_executor(args: argparse.Namespace, folder: Path) -> submitit.Executor:
    """SlurmExecutor with the request, or the LocalExecutor for --local (same task code)."""
    if args.local:
        ex = submitit.LocalExecutor(folder, max_num_timeout=args.max_requeues)
        ex.update_parameters(nodes=1, tasks_per_node=tasks_per_node(args), gpus_per_node=args.gpus_per_node,
                             timeout_min=parse_time_minutes(args.time), signal_delay_s=args.signal_delay)
        return ex
    ex = submitit.SlurmExecutor(folder, max_num_timeout=args.max_requeues)
    ex.update_parameters(**slurm_parameters(args))
    return ex


def report(job: submitit.Job, run_dir: Path, local: bool) -> None:
    """Print what a user needs to find and follow the job."""
    out, err = (str(p).replace("%t", "0") for p in (job.paths.stdout, job.paths.stderr))
    print(f"job id:   {job.job_id}{' (local)' if local else ''}")
    print(f"run dir:  {run_dir}")
    print(f"logs:     {out} and {err} (rank 0; rank r: {job.job_id}_r_log.*)")
    print(f"metrics:  {run_dir / 'metrics.jsonl'}")
    print(f"follow:   tail -F {out} {err}")
    if not local:
        print(f"status:   squeue -j {job.job_id}   cancel: scancel {job.job_id}")


def _parser() -> argparse.ArgumentParser:
    summary, details = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=summary, epilog=details,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    r = p.add_argument_group("resources")
    r.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    r.add_argument("--gpus-per-node", type=int, default=1,
                   help="GPUs per node = tasks per node; 0: CPU processes, gloo (default 1)")
    r.add_argument("--tasks-per-node", type=int, help="CPU processes per node with --gpus-per-node 0 (default 1)")
    r.add_argument("--cpus-per-task", type=int, help="CPUs per task (data workers + 1); sets OMP_NUM_THREADS")
    r.add_argument("--mem", help="memory per node, sbatch syntax (e.g. 480G)")
    r.add_argument("--time", default="24:00:00", help="time limit per job run, M or [D-]H:M:S (default 24:00:00)")
    s = p.add_argument_group("scheduling")
    for name, what in (("partition", "partition"), ("account", "account to charge"), ("qos", "quality of service"),
                       ("constraint", "node features, e.g. a100"), ("exclude", "nodes to avoid")):
        s.add_argument(f"--{name}", help=what)
    s.add_argument("--job-name", default="dulearn", help="job name (default dulearn)")
    s.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which SLURM sends USR2 to checkpoint and requeue; "
                        "the hook waits up to 3/4 of it for the checkpoint (default 120)")
    s.add_argument("--max-requeues", type=int, default=10, help="give up after this many requeues (default 10)")
    s.add_argument("--slurm-extra", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --slurm-extra mail-type=END (repeatable)")
    t = p.add_argument_group("training")
    t.add_argument("--run-dir", required=True, help="run directory on a shared file system (checkpoints, logs)")
    t.add_argument("--config", help="YAML config (configs/*.yaml)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=3e-4")
    m = p.add_argument_group("mode")
    m.add_argument("--dry-run", action="store_true", help="print the sbatch script and exit")
    m.add_argument("--local", action="store_true", help="run here with submitit's local executor and wait")
    return p


def launch(args: argparse.Namespace) -> int:
    """Check, then print the script (--dry-run), submit, or run locally."""
    world_size = args.nodes * tasks_per_node(args)
    cfg = check_request(args, world_size)
    if args.dry_run:
        print(sbatch_script(args), end="")
        return 0
    run_dir = check_run_dir(args.run_dir)
    spec = JobSpec(cfg=cfg, run_dir=str(run_dir), max_requeues=args.max_requeues,
                   checkpoint_timeout_s=max(5.0, args.signal_delay * 0.75))
    executor = make_executor(args, submitit_folder(run_dir))
    job = executor.submit(TrainTask(spec))
    report(job, run_dir, args.local)
    if not args.local:
        return 0
    try:
        print(f"done: {job.results()[0]}")
    except submitit.core.utils.UncompletedJobError as err:
        print(f"error: the local job failed; see the logs above\n{err}", file=sys.stderr)
        return 1
    return 0


# Errors after which a requeue would only fail again (the trainer's own one-line stops).
FINAL_ERRORS = ("DataSourceError", "CheckpointWriteError", "NonFiniteLossError", "CheckpointMismatch", "ConfigError")


def failed_tasks(run_dir: Path, job_id: str, tasks: int) -> tuple[list[int], list[str]]:
    """(ranks that left no result: killed; the errors of those that failed), from submitit's result pickles."""
    import pickle

    killed, errors = [], []
    for rank in range(tasks):
        path = submitit_folder(run_dir) / f"{job_id}_{rank}_result.pkl"
        try:
            with open(path, "rb") as f:
                kind, value = pickle.load(f)
        except (OSError, EOFError, pickle.UnpicklingError):
            killed.append(rank)
            continue
        if kind != "success":
            errors.append(str(value))
    return killed, errors


def requeue_failed(argv: Sequence[str]) -> int:
    """The job script's teardown after a failed step: requeue when a task died, within --max-requeues.

    Killed tasks (no result) and lost peers are worth a restart, which resumes from the last
    checkpoint; a trainer that stopped on its own (FINAL_ERRORS) is not.
    """
    p = argparse.ArgumentParser(prog="launch/slurm.py requeue-failed")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--job-id", required=True)
    p.add_argument("--tasks", type=int, required=True)
    p.add_argument("--max-requeues", type=int, required=True)
    a = p.parse_args(argv)
    killed, errors = failed_tasks(a.run_dir, a.job_id, a.tasks)
    final = [e for e in errors if any(name in e for name in FINAL_ERRORS)]
    requeues = sum(s["job_id"] == a.job_id for s in read_launch_log(a.run_dir)["starts"]) - 1
    what = f"task(s) {killed} died" if killed else f"{len(errors)} task(s) failed"
    if final and not killed:
        print(f"dulearn: not requeuing job {a.job_id}: training stopped on its own ({final[0].strip().splitlines()[-1]})")
        return 0
    if requeues >= a.max_requeues:
        print(f"dulearn: {what}; not requeuing job {a.job_id}: requeued {requeues} times (--max-requeues "
              f"{a.max_requeues}); resubmit with the same --run-dir to continue")
        return 0
    print(f"dulearn: {what}; requeuing job {a.job_id} ({requeues + 1}/{a.max_requeues}): it resumes from the "
          "latest checkpoint", flush=True)
    return subprocess.run(["scontrol", "requeue", a.job_id], timeout=60).returncode


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; one-line errors (exit 2) for problems found before submission."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["requeue-failed"]:
        return requeue_failed(argv[1:])
    args = _parser().parse_intermixed_args(argv)
    try:
        return launch(args)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from launch.slurm import main as package_main  # so that pickles name launch.slurm, not __main__

    sys.exit(package_main())
