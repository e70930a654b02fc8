"""Two real gloo processes streaming the same uneven shards: disjoint clips, equal batch counts."""

from __future__ import annotations

import multiprocessing as mp
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dulearn.data import build_train_loader
from shards.build import main as build_main

STEPS = 16  # two passes over the 30 clips at 2 ranks x 2 clips: lanes run out unevenly
BUFFER = 2


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory, frame_folders) -> Path:
    """30 clips in shards of 6, 12, 6 and 6 clips (of synthetic frame folders)."""
    out = tmp_path_factory.mktemp("dist") / "shards"
    assert build_main(["frames", str(frame_folders), "--out", str(out), "--short-side",
                       "64", "--clip-len", "8", "--shard-clips", "6", "--workers", "1"]) == 0
    return out


def _rank(rank: int, rendezvous: str, index: str, workers: int, results) -> None:
    """One training process: stream, and all-reduce once per step as DDP would."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    loader = build_train_loader(index, batch_size=2, clip_len=5, short_side=64, crop=48,
                                num_workers=workers, seed=11, rank=rank, world_size=2)
    steps, clips = [], []
    for batch in loader:
        flag = torch.tensor([1])
        dist.all_reduce(flag)  # a rank that ran out of batches would hang here
        assert flag.item() == 2
        steps.append(batch["step"])
        clips.append(batch["clips"])
        if len(steps) == STEPS:
            break
    dist.barrier()
    dist.destroy_process_group()
    results.put((rank, steps, clips))


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers", [1, 2])
def test_two_ranks_disjoint_and_equal_batches(tmp_path, uneven_shards, workers):
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, f"file://{tmp_path}/rdv", str(uneven_shards / "index.json"),
                                            workers, results)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict((r, (s, c)) for r, s, c in (results.get(timeout=200) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert out[0][0] == out[1][0] == list(range(STEPS))  # same number of batches, in order
    lanes = workers
    # The smallest lane holds 6 clips per data epoch (12 with one lane per rank); a lane has
    # read BUFFER clips ahead of what it yielded, so this many steps stay within epoch 0:
    safe = lanes * ((6 * (3 - lanes) - BUFFER) // 2)
    first = [{c for step in out[r][1][:safe] for c in step} for r in (0, 1)]
    assert len(first[0]) == len(first[1]) == 2 * safe  # no clip twice on a rank
    assert not first[0] & first[1]  # and none on both ranks
    everything = {c for r in (0, 1) for step in out[r][1] for c in step}
    assert len(everything) == 30  # over two passes the ranks together cover every clip
