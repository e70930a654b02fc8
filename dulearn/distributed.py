"""Process-group helpers of the loss, the training loop and the SLURM launcher, in one place.

Rank and world size; the autograd-aware all-gather of the loss (torch's functional
collective: accelerate's `gather` has no backward); reductions of device tensors that are
enqueued, not waited for; object gathers (accelerate's); small ints
agreed by all ranks on a CPU (gloo) group, which never touches the GPU stream; BatchNorm
buffers from rank 0; a heartbeat that names a dead rank; and the env:// variables of a
SLURM task (submitit's TorchDistributedEnvironment); the process group under torchrun's
restarts. Every helper is the identity in a single process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Collectives wait this long. Long enough for rank 0 to write a checkpoint or a rank to finish
# its share of an evaluation while the others wait; short enough that a hang is an error.
TIMEOUT = timedelta(minutes=10)
HEARTBEAT_S = 2.0  # each rank bumps its counter in the rendezvous store this often
STALE_S = 15.0  # a peer whose counter has not moved for this long is gone


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank: the process group's, else the launcher's RANK variable, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes: the process group's, else the launcher's WORLD_SIZE variable, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(cpu: bool) -> None:
    """Start the process group under torchrun with its keys scoped to this restart attempt.

    torchrun's static rendezvous (`--master-port`) keeps one store across `--max-restarts`,
    so a restarted rank could read the previous attempt's gloo/NCCL address of a peer and
    fail to connect; prefixing the keys with TORCHELASTIC_RESTART_COUNT keeps attempts
    apart. Elsewhere (and when a group exists) accelerate initialises as usual.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or world_size() < 2 or dist.is_initialized():
        return
    store, r, world = next(dist.rendezvous("env://", timeout=TIMEOUT))
    dist.init_process_group("gloo" if cpu else "nccl", store=dist.PrefixStore(f"dulearn/attempt_{attempt}", store),
                            rank=r, world_size=world, timeout=TIMEOUT)


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of x from all ranks, concatenated in rank order; backward sums the gradients."""
    import torch.distributed._functional_collectives as fc

    gather = getattr(fc, "all_gather_single_autograd", None)
    if gather is not None:
        return gather(x.contiguous(), 0, dist.group.WORLD)
    import torch.distributed.nn.functional as dnf  # torch < 2.6

    return torch.cat(dnf.all_gather(x), 0)


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows of all ranks [R*n,...] with a gradient-summing backward, this rank); one process: (x, 0)."""
    if not is_distributed():
        return x, 0
    return _all_gather_rows(x), dist.get_rank()


def reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A reduced copy of a device tensor over all ranks (op: sum | max); enqueued, not waited for (NCCL).

    torch's all_reduce, not accelerate's `reduce`: older accelerate releases summed for "max".
    """
    out = t.clone()
    if is_distributed():
        dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return out


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank (a host sync; accelerate's gather_object)."""
    from accelerate.utils import gather_object

    return gather_object([obj])


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Rank `src`'s buffers (BatchNorm running statistics) on every rank.

    DDP broadcasts them at the start of each forward, so after a step every rank holds the
    statistics of its own last batch; an evaluation on several ranks needs the ones a
    checkpoint keeps (rank 0's).
    """
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src)


def host_group() -> dist.ProcessGroup | None:
    """A gloo group over all ranks for host-side flags: the world group where it is gloo, else a new one.

    None in a single process. Every rank must call it (it may create a group).
    """
    if not is_distributed():
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo", timeout=TIMEOUT)


def max_rank(code: int, group: dist.ProcessGroup | None) -> int:
    """The largest of every rank's small int `code` (e.g. 0 go, 1 checkpoint, 2 stop): one host all-reduce."""
    if group is None:
        return code
    t = torch.tensor([code], dtype=torch.int32)  # [1] on the CPU: the GPU stream is not involved
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t[0])


def any_rank(flag: bool, group: dist.ProcessGroup | None) -> bool:
    """True on every rank iff `flag` is true on any (max_rank of 0/1).

    Not accelerate's set_trigger/check_trigger: they reduce a device tensor and read it with
    .item(), which waits for the device on every call.
    """
    return bool(max_rank(int(flag), group))


def export_slurm_env() -> Any:
    """Set torch.distributed's env:// variables for this submitit task and return submitit's view of them.

    MASTER_ADDR is the job's first host, MASTER_PORT is drawn from the job id (the same on
    every node and every requeue; an exported MASTER_PORT wins), RANK, WORLD_SIZE, LOCAL_RANK
    and LOCAL_WORLD_SIZE come from SLURM. CUDA_VISIBLE_DEVICES is left alone (each process
    picks its GPU by LOCAL_RANK).
    """
    from submitit.helpers import TorchDistributedEnvironment

    return TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


class PeerLost(RuntimeError):
    """Another rank died or stopped responding; the message names it."""


class Heartbeat:
    """Liveness of every rank through the rendezvous store, to name a rank that died.

    A daemon thread bumps this rank's counter every HEARTBEAT_S and notes when it last saw
    each peer's counter move (local clocks only, so hosts need not agree on the time). When
    a collective fails, `dead()` waits until some peer has been still for STALE_S and names
    it. A store that cannot be reached means its host (rank 0, or the launcher's agent) is gone.
    """

    def __init__(self) -> None:
        self.rank, self.world = rank(), world_size()
        self.store = dist.distributed_c10d._get_default_store()
        self.seen = {r: (-1, time.monotonic()) for r in range(self.world) if r != self.rank}
        self.store_error: str | None = None
        self.beats = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dulearn-heartbeat", daemon=True)
        self._thread.start()

    def _key(self, r: int) -> str:
        return f"dulearn/heartbeat/{r}"

    def _run(self) -> None:
        while self.store_error is None and not self._stopping.is_set():
            try:
                self.beats += 1
                self.store.set(self._key(self.rank), str(self.beats))
                peers = [r for r in self.seen if self.store.check([self._key(r)])]
                for r, value in zip(peers, self.store.multi_get([self._key(r) for r in peers]) if peers else []):
                    if int(value) != self.seen[r][0]:
                        self.seen[r] = (int(value), time.monotonic())
            except Exception as e:  # noqa: BLE001 (the store's host is gone: reported by dead())
                self.store_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self._stopping.wait(HEARTBEAT_S)

    def stop(self) -> None:
        """End the thread before the process group and its store go away.

        A daemon thread still inside a store call while the interpreter shuts down aborted
        the process ("terminate called without an active exception") after a finished run.
        """
        self._stopping.set()
        self._thread.join(timeout=2 * HEARTBEAT_S)

    def dead(self, wait_s: float = STALE_S + 2 * HEARTBEAT_S) -> str:
        """A one-line account of which rank is gone, waiting up to `wait_s` for the evidence."""
        deadline = time.monotonic() + wait_s
        while True:
            now = time.monotonic()
            stale = sorted(r for r, (_, at) in self.seen.items() if now - at > STALE_S)
            if stale:
                ages = ", ".join(f"rank {r} ({now - self.seen[r][1]:.0f} s)" for r in stale)
                return f"lost {ages} without a heartbeat: it died or hangs"
            if self.store_error is not None:
                return f"lost the rendezvous store ({self.store_error}): its host, rank 0 or the launcher, died"
            if now > deadline:
                return "a collective failed but every rank still beats (a network fault?)"
            time.sleep(0.5)


def shutdown() -> None:
    """Destroy the process group (and its store) while the interpreter still runs; the identity in one process."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def start_heartbeat() -> Heartbeat | None:
    """A Heartbeat in a process group of several ranks, else None."""
    if not is_distributed():
        return None
    try:
        return Heartbeat()
    except Exception as e:  # noqa: BLE001 (no store to use: liveness is then the launcher's job)
        logging.getLogger(__name__).warning(f"no heartbeat (the process group has no store: {e})")
        return None
