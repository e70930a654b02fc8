"""Two real gloo processes streaming 40 videos: distinct videos in every global batch, equal batch counts."""

from __future__ import annotations

import multiprocessing as mp
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dulearn.data import build_train_loader
from dulearn.shard_format import video_of_key
from synthetic_data import synthetic_shards

VIDEOS, PER_RANK = 40, 4  # global batch 8: an epoch is 5 steps
STEPS = 15  # three epochs


@pytest.fixture(scope="module")
def videos40(tmp_path_factory) -> Path:
    """40 synthetic videos of 20 frames in 2 clips each, in uneven shards of 14 clips."""
    return synthetic_shards(tmp_path_factory.mktemp("dist") / "shards", "seed=3,videos=40,frames=20,size=40x56,"
                            "objects=1", 10, 14)


def _rank(rank: int, rendezvous: str, index: str, workers: int, results) -> None:
    """One training process: stream, and all-reduce once per step as DDP would."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    loader = build_train_loader(index, batch_size=PER_RANK, clip_len=5, short_side=40, crop=32,
                                num_workers=workers, seed=11, rank=rank, world_size=2)
    steps, clips, repeated = [], [], []
    for batch in loader:
        flag = torch.tensor([1])
        dist.all_reduce(flag)  # a rank that ran out of batches would hang here
        assert flag.item() == 2
        steps.append(batch["step"])
        clips.append(batch["clips"])
        repeated.append(batch["repeated"])
        if len(steps) == STEPS:
            break
    dist.barrier()
    dist.destroy_process_group()
    results.put((rank, steps, clips, repeated))


def _video_of(shards: Path) -> dict[str, int]:
    out = {}
    for path in shards.glob("*.tar"):
        with tarfile.open(path) as tar:
            out.update({f"{path.name}@{m.offset}": video_of_key(m.name.split(".")[0])
                        for m in tar.getmembers() if m.name.endswith(".json")})
    return out


def _run(tmp_path: Path, shards: Path, workers: int) -> dict[int, tuple]:
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, f"file://{tmp_path}/rdv-{workers}", str(shards / "index.json"),
                                            workers, results)) for r in range(2)]
    for p in procs:
        p.start()
    out = {r: rest for r, *rest in (results.get(timeout=200) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_two_workers_never_repeat_a_video_in_a_global_batch(tmp_path, videos40):
    out = _run(tmp_path, videos40, workers=2)
    assert out[0][0] == out[1][0] == list(range(STEPS))  # same number of batches, in order
    video = _video_of(videos40)
    for t in range(STEPS):
        drawn = [video[c] for r in (0, 1) for c in out[r][1][t]]
        assert len(drawn) == 2 * PER_RANK and len(set(drawn)) == len(drawn), (t, drawn)
        assert not out[0][2][t] and not out[1][2][t]  # and the stream says so
    per_epoch = VIDEOS // (2 * PER_RANK)
    for e in range(STEPS // per_epoch):
        seen = [video[c] for r in (0, 1) for step in out[r][1][e * per_epoch:(e + 1) * per_epoch] for c in step]
        assert sorted(seen) == list(range(VIDEOS))  # each epoch shows every video exactly once
    assert _run(tmp_path, videos40, workers=1) == out  # the batches do not depend on the workers
