"""Process-group helpers of the loss, the training loop and the SLURM launcher, in one place.

Rank and world size; the autograd-aware all-gather of the loss (torch's functional
collective: accelerate's `gather` has no backward); reductions of device tensors that are
enqueued, not waited for (accelerate's `reduce`); object gathers and broadcasts
(accelerate's); a host-side flag agreed by all ranks on a CPU (gloo) group, which never
touches the GPU stream; and the env:// variables of a SLURM task (submitit's
TorchDistributedEnvironment). Every helper is the identity in a single process.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT = timedelta(hours=2)  # collectives wait this long: the main process evaluates while the others wait


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

    Needs the Accelerator's state (it is accelerate's `reduce`).
    """
    from accelerate.utils import reduce as accelerate_reduce

    return accelerate_reduce(t, reduction=op)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank (a host sync; accelerate's gather_object)."""
    from accelerate.utils import gather_object

    return gather_object([obj])


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank (accelerate's broadcast_object_list)."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=src)[0]


def host_group() -> dist.ProcessGroup | None:
    """A gloo group over all ranks for host-side flags: the world group where it is gloo, else a new one.

    None in a single process. Every rank must call it (it may create a group).
    """
    if not is_distributed():
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo", timeout=TIMEOUT)


def any_rank(flag: bool, group: dist.ProcessGroup | None) -> bool:
    """True on every rank iff `flag` is true on any: one int all-reduced on the host group.

    Not accelerate's set_trigger/check_trigger: they reduce a device tensor and read it with
    .item(), which waits for the device on every call.
    """
    if group is None:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)  # [1] on the CPU: the GPU stream is not involved
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t[0])


def export_slurm_env() -> Any:
    """Set torch.distributed's env:// variables for this submitit task and return submitit's view of them.

    MASTER_ADDR is the job's first host, MASTER_PORT is drawn from the job id (the same on
    every node and every requeue; an exported MASTER_PORT wins), RANK, WORLD_SIZE, LOCAL_RANK
    and LOCAL_WORLD_SIZE come from SLURM. CUDA_VISIBLE_DEVICES is left alone (each process
    picks its GPU by LOCAL_RANK).
    """
    from submitit.helpers import TorchDistributedEnvironment

    return TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
