"""A real two-node SLURM cluster on this machine for tests: munged, slurmctld and two slurmd.

Installs nothing: it uses Debian's slurm-wlm and munge where present (CI installs them; see
.ci/run for the packages) and skips with the reason otherwise. Everything lives in a
temporary folder (config, state, spool, logs, munge key and socket) except the /etc/hosts
entries for the node names, which it adds (as root) when they do not resolve yet and removes
at the end. A `sacct` stand-in on PATH answers submitit's state polls from `scontrol`, since
the cluster has no accounting database.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import unavailable

NODES = ("dulearn-n1", "dulearn-n2")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# dulearn-test-slurm"

SACCT_STANDIN = """#!/bin/bash
# sacct stand-in (no accounting database): answers submitit's
# `sacct -o JobID,State,NodeList --parsable2 -j ID ...` from `scontrol -o show job ID`.
echo "JobID|State|NodeList"
while [ $# -gt 0 ]; do
  if [ "$1" = "-j" ]; then
    line=$(scontrol -o show job "$2" 2>/dev/null) || { shift 2; continue; }
    state=$(sed -n 's/.* JobState=\\([^ ]*\\).*/\\1/p' <<<"$line")
    nodes=$(sed -n 's/.* NodeList=\\([^ ]*\\).*/\\1/p' <<<"$line")
    echo "$2|$state|$nodes"
    shift
  fi
  shift
done
"""


def skip_reason() -> str | None:
    """Why a cluster cannot be started here, or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (f"SLURM/munge binaries absent ({', '.join(missing)}); install with `apt-get install "
                f"slurmctld slurmd slurm-client munge` (CI does)")
    if os.geteuid() != 0:
        return "a test SLURM cluster needs root (slurmd launches jobs, munged runs as the munge user)"
    return None


def _free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resolves_local(name: str) -> bool:
    try:
        return socket.gethostbyname(name) == "127.0.0.1"
    except OSError:
        return False


@contextmanager
def _node_names_resolvable(names: tuple[str, ...]) -> Iterator[None]:
    """Map the node names to 127.0.0.1 in /etc/hosts for the duration (MASTER_ADDR must resolve)."""
    missing = [n for n in names if not _resolves_local(n)]
    if missing:
        with HOSTS_FILE.open("a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)} {HOSTS_MARK}\n")
    try:
        yield
    finally:
        if missing:
            lines = HOSTS_FILE.read_text().splitlines(keepends=True)
            HOSTS_FILE.write_text("".join(line for line in lines if HOSTS_MARK not in line))


def _slurm_conf(root: Path, ctld_port: int, node_ports: list[int], munge_socket: Path) -> str:
    """slurm.conf for a controller and len(NODES) nodes on 127.0.0.1, all state under `root`."""
    lines = [
        "ClusterName=dulearntest",
        f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge",
        # cred_expire: a requeued job waits this long + 1 s before it may start (default 120)
        f"AuthInfo=socket={munge_socket},cred_expire=5",
        "SchedulerParameters=sched_interval=1",  # test pending jobs every second (default 60)
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "ReturnToService=2", "MpiDefault=none", "KillWait=5", "MinJobAge=300",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log", f"SlurmdLogFile={root}/log/slurmd-%n.log",
    ]
    lines += [f"NodeName={n} NodeHostname={n} NodeAddr=127.0.0.1 Port={p} CPUs=2 RealMemory=4000"
              for n, p in zip(NODES, node_ports)]
    lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


@dataclass
class SlurmCluster:
    """A running test cluster: its folder, config and the environment its clients need."""

    root: Path
    conf: Path
    env: dict[str, str]
    nodes: tuple[str, ...] = NODES

    def run(self, *args: str, check: bool = True) -> str:
        """Run a SLURM client command against this cluster; its stdout."""
        out = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if check and out.returncode:
            raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` fields of a job (empty once it left the controller)."""
        text = self.run("scontrol", "-o", "show", "job", job_id, check=False).strip()
        return dict(f.split("=", 1) for f in text.split() if "=" in f)

    def wait(self, what: str, predicate: Callable[[], bool], timeout: float, poll: float = 0.25) -> None:
        """Poll `predicate` until true; fail the test with the daemons' log tails on timeout."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            time.sleep(poll)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.log_tails()}")

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of each daemon log, for failure messages."""
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def idle(self) -> bool:
        states = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).split()
        return states.count("idle") == len(self.nodes)


def _start(args: list[str], env: dict[str, str], log: Path, user: str | None = None) -> subprocess.Popen:
    if user:
        args = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *args]
    with log.open("ab") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _start_munge(root: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    """A private munged with a fresh key (its own socket, so a system munged is untouched)."""
    key_dir, sock_dir = root / "munge", root / "munge-socket"
    for d, mode in ((key_dir, 0o700), (sock_dir, 0o755)):
        d.mkdir(mode=mode)
        shutil.chown(d, "munge", "munge")
    key = key_dir / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    shutil.chown(key, "munge", "munge")
    sock = sock_dir / "munge.socket"
    proc = _start(["munged", "-F", f"--key-file={key}", f"--socket={sock}", f"--pid-file={key_dir}/munged.pid",
                   f"--log-file={key_dir}/munged.log", f"--seed-file={key_dir}/munged.seed"],
                  env, root / "log" / "munged.out", user="munge")
    return proc, sock


def _stop(procs: list[subprocess.Popen]) -> None:
    """Terminate the daemons we started (by their handles), newest first."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
    for proc in reversed(procs):
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cancel_all(cluster: SlurmCluster) -> None:
    """Cancel leftover jobs and give their steps up to 20 s to end, so none outlives the cluster."""
    jobs = cluster.run("squeue", "-h", "-o", "%i", check=False).split()
    if not jobs:
        return
    cluster.run("scancel", *jobs, check=False)
    end = time.monotonic() + 20
    while cluster.run("squeue", "-h", "-t", "R,CG", check=False).strip() and time.monotonic() < end:
        time.sleep(0.25)


@contextmanager
def slurm_cluster_at(root: Path) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and one slurmd per node under `root`; stop them all on exit."""
    root.chmod(0o755)  # munged (as munge) must traverse to its socket
    for sub in ("state", "spool", "log", "bin"):
        (root / sub).mkdir()
    sacct = root / "bin" / "sacct"
    sacct.write_text(SACCT_STANDIN)
    sacct.chmod(0o755)
    env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"), PATH=f"{root / 'bin'}:{os.environ['PATH']}")
    procs: list[subprocess.Popen] = []
    with _node_names_resolvable(NODES):
        try:
            munged, munge_socket = _start_munge(root, env)
            procs.append(munged)
            (root / "slurm.conf").write_text(
                _slurm_conf(root, _free_port(), [_free_port() for _ in NODES], munge_socket))
            cluster = SlurmCluster(root, root / "slurm.conf", env)
            cluster.wait("munged", munge_socket.exists, timeout=10, poll=0.05)
            procs.append(_start(["slurmctld", "-D", "-f", str(cluster.conf)], env, root / "log" / "slurmctld.out"))
            for node in NODES:
                procs.append(_start(["slurmd", "-D", "-f", str(cluster.conf), "-N", node], env,
                                    root / "log" / f"slurmd-{node}.out"))
            cluster.wait("both nodes idle in sinfo", cluster.idle, timeout=30)
            try:
                yield cluster
            finally:
                _cancel_all(cluster)  # also after a failed test: no job step outlives the cluster
        finally:
            _stop(procs)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A two-node SLURM cluster for the whole session (skips with the reason where impossible)."""
    reason = skip_reason()
    if reason:
        unavailable(reason)
    root = Path(tempfile.mkdtemp(prefix="dulearn-slurm-"))
    try:
        with slurm_cluster_at(root) as cluster:
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)
