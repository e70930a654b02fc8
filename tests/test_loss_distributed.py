"""Two real gloo processes with half the clips each reproduce one process with the whole batch.

Rank r holds clips [r*B/2, (r+1)*B/2) with the same theta and offsets; DDP averages the
gradients. In the last clip frames 1..T-1 are flat in the colour of one anchor, so all
their pseudo labels point to that anchor: the backward must not hang on it.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dulearn import distributed
from dulearn.branches import forward_branches
from dulearn.loss import dense_loss
from dulearn.views import sample_theta

WORLD = 2
B, T, SIZE = 4, 3, 16
TIMEOUT_S = 90


class PixelNet(nn.Module):
    """A small per-pixel network in float64 with the DenseNet call signature (`key` maps)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 8, 1)).double()

    def forward(self, x: torch.Tensor, layers: tuple[str, ...] = ("key",)) -> dict[str, torch.Tensor]:
        return {"key": F.normalize(self.net(x.double()), dim=1)}


def _batch() -> dict[str, torch.Tensor]:
    """Frames, theta, offsets and initial weights shared by both runs; clip B-1 collapses."""
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (B, T, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    theta = sample_theta(B, generator=g)
    anchor_offsets = torch.randint(0, SIZE // 8, (B, 2), generator=g)
    oy, ox = anchor_offsets[-1].tolist()
    frames[-1, 1:] = frames[-1, 0, :, oy, ox].view(3, 1, 1)  # the colour of the clip's first anchor
    theta[-1] = torch.tensor([[0.8, 0.0, 0.0], [0.0, 0.8, 0.0]])  # a central crop: no zero padding
    torch.manual_seed(0)
    return {
        "frames": frames,
        "theta": theta,
        "anchor_offsets": anchor_offsets,
        "cv_offsets": torch.randint(0, SIZE // 4, (B, 2), generator=g),
        "state": PixelNet().state_dict(),
    }


def _step(model: nn.Module, batch: dict[str, torch.Tensor], clips: slice) -> dict[str, torch.Tensor]:
    """Both branches and the loss on the given clips."""
    k_main, k_reg = forward_branches(model, batch["frames"][clips], batch["theta"][clips])
    return dense_loss(
        k_main,
        k_reg,
        batch["theta"][clips],
        anchor_offsets=batch["anchor_offsets"][clips],
        cv_offsets=batch["cv_offsets"][clips],
    )


def _worker(rank: int, port: int, batch: dict[str, torch.Tensor], out_dir: str) -> None:
    """One rank: DDP over gloo, half the clips, forward + backward, results to out_dir."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = PixelNet()
        model.load_state_dict(batch["state"])
        ddp = DistributedDataParallel(model)
        half = B // WORLD
        out = _step(ddp, batch, slice(rank * half, (rank + 1) * half))
        out["loss"].backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        flag = torch.tensor(float(rank + 1))  # [] a per-rank scalar, reduced as the loop reduces its flags
        result = {"loss": out["loss"].detach(), "pseudo": out["pseudo"], "grads": grads,
                  "reduced": [distributed.reduce(flag, "max"), distributed.reduce(flag, "sum")]}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(batch: dict[str, torch.Tensor], out_dir: Path) -> None:
    """Run the ranks; fail (and kill them) if they do not finish within TIMEOUT_S."""
    args = (_free_port(), batch, str(out_dir))
    ctx = mp.start_processes(_worker, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    os.kill(p.pid, 9)
            pytest.fail(f"distributed loss did not finish within {TIMEOUT_S}s (hang)")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_ranks_equal_one_process(tmp_path):
    batch = _batch()
    model = PixelNet()
    model.load_state_dict(batch["state"])
    ref = _step(model, batch, slice(None))
    ref["loss"].backward()
    collapsed = ref["pseudo"][-1, 1:].unique().tolist()
    assert collapsed == [(B - 1) * 64], f"the last clip should collapse to its first anchor, got {collapsed}"

    _spawn(batch, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    loss = torch.stack([r["loss"] for r in ranks]).mean()
    torch.testing.assert_close(loss, ref["loss"].detach(), rtol=1e-5, atol=0)
    assert torch.equal(torch.cat([r["pseudo"] for r in ranks]), ref["pseudo"])
    assert all([float(t) for t in r["reduced"]] == [2.0, 3.0] for r in ranks)  # max and sum of 1 and 2, on each rank
    for name, param in model.named_parameters():
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], param.grad, rtol=1e-5, atol=1e-8, msg=name)
