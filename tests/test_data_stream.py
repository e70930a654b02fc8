"""The training stream on real clip shards (of synthetic frame folders): batches, resume, sampling,
geometry, corrupt clips, pipes."""

from __future__ import annotations

import io
import json
import random
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from torchvision.io import decode_jpeg
from torchvision.transforms.v2 import functional as TF

from dulearn.data import build_train_loader, sample_frame_ids
from dulearn.shard_format import iter_samples
from shards.build import main as build_main

SHORT = 80
OPTS = dict(clip_len=5, frame_gap=2, short_side=(64, 80), crop=64)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, frame_folders) -> Path:
    """30 clips of 8 or 9 frames (at 80 px) in 4 shards of 6, 12, 6 and 6 clips."""
    out = tmp_path_factory.mktemp("stream") / "shards"
    assert build_main(["frames", str(frame_folders), "--out", str(out), "--short-side",
                       str(SHORT), "--clip-len", "8", "--shard-clips", "6", "--workers", "1"]) == 0
    return out


def _take(loader, n: int) -> list[dict]:
    return [b for _, b in zip(range(n), loader)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(x["step"] == y["step"] and x["clips"] == y["clips"] and torch.equal(x["frames"], y["frames"])
               for x, y in zip(a, b, strict=True))


def test_batches_shape_steps_and_one_pass(shards):
    loader = build_train_loader(str(shards / "index.json"), batch_size=3, num_workers=2, shuffle_buffer=4,
                                hflip=True, **OPTS)
    assert len(loader) == 30 // 3
    batches = _take(loader, 20)
    assert [b["step"] for b in batches] == list(range(20))
    assert all(b["frames"].shape == (3, 5, 3, 64, 64) and b["frames"].dtype == torch.uint8 for b in batches)
    assert all(b["skipped"] == 0 for b in batches)
    seen = Counter(c for b in batches for c in b["clips"])
    assert len(seen) == 30  # two passes over the 30 clips reach every clip


@pytest.mark.parametrize("workers,start", [(0, 7), (2, 5), (2, 6)])
def test_resume_gives_the_same_batches(shards, workers, start):
    src = str(shards / "index.json")
    kw = dict(batch_size=2, num_workers=workers, shuffle_buffer=6, seed=3, hflip=True, **OPTS)
    full = _take(build_train_loader(src, **kw), start + 6)
    resumed = _take(build_train_loader(src, start_step=start, **kw), 6)
    assert _same(resumed, full[start:])


def test_resume_far_ahead_is_cheap(shards):
    """Resuming at step 20000 (40000 clips in) replays counts only: no clip before it is decoded."""
    start = time.perf_counter()
    kw = dict(batch_size=2, num_workers=0, shuffle_buffer=6, **OPTS)
    batch = _take(build_train_loader(str(shards / "index.json"), start_step=20_000, **kw), 1)[0]
    assert batch["step"] == 20_000 and batch["frames"].shape == (2, 5, 3, 64, 64)
    assert time.perf_counter() - start < 20  # decoding 40000 clips would take many minutes


def test_weighted_sources_mix_and_resume(shards):
    names = sorted(p.name for p in shards.glob("*.tar"))
    src = [str(shards / n) for n in names[:2]] + [str(shards / n) for n in names[2:]]
    sources = [src[:2], src[2:]]
    kw = dict(batch_size=4, num_workers=0, shuffle_buffer=2, weights=[3, 1], **OPTS)
    full = _take(build_train_loader(sources, **kw), 12)
    assert _same(_take(build_train_loader(sources, start_step=8, **kw), 4), full[8:])
    shard_of = Counter(c.split("/")[0] for b in full for c in b["clips"])
    first = shard_of[names[0]] + shard_of[names[1]]
    assert first > 2 * (48 - first)  # weight 3:1 (expect 36:12)


def test_brace_pattern_and_pipe_sources_equal_the_index(shards):
    names = sorted(p.name for p in shards.glob("*.tar"))
    pattern = str(shards / f"frames-{{000000..{len(names) - 1:06d}}}.tar")
    pipes = [f"pipe:cat {shards / n}" for n in names]
    kw = dict(batch_size=2, num_workers=0, shuffle_buffer=3, **OPTS)
    ref = _take(build_train_loader(str(shards / "index.json"), **kw), 5)
    assert _same(_take(build_train_loader(pattern, **kw), 5), ref)
    via_pipe = _take(build_train_loader(pipes, **kw), 5)
    assert [b["clips"] for b in via_pipe] == [b["clips"] for b in ref]
    assert all(torch.equal(a["frames"], b["frames"]) for a, b in zip(via_pipe, ref))


def test_frame_sampling_follows_the_original():
    rng = random.Random(0)
    for n, gap, window_gap in ((40, 2, 2), (40, 10, 8), (7, 2, 1), (5, 10, 1)):
        starts = set()
        for _ in range(200):
            ids = sample_frame_ids(n, 5, gap, rng)
            s = min(ids)
            assert sorted(ids) == [s + window_gap * i for i in range(5)] and max(ids) < n
            starts.add(s)
        assert starts == set(range(n - 4 * window_gap))  # every valid start is drawn
    assert sample_frame_ids(4, 5, 2, rng) is None
    perms = Counter(tuple(sample_frame_ids(5, 5, 1, rng)) for _ in range(2000))
    assert len(perms) == 120  # reference frame and order are random permutations


def _clip_frames(shards: Path, name: str) -> torch.Tensor:
    shard, key = name.split("/")
    sample = dict(iter_samples(str(shards / shard)))[key]
    jpgs = [sample[k] for k in sorted(k for k in sample if k.endswith(".jpg"))]
    return torch.stack([decode_jpeg(torch.frombuffer(bytearray(j), dtype=torch.uint8)) for j in jpgs])


def test_center_crop_geometry(shards):
    """T = all frames of a clip at gap 1: output = a permutation of its resized, centre-cropped frames."""
    loader = build_train_loader(str(shards / "index.json"), batch_size=2, num_workers=0, shuffle_buffer=1,
                                clip_len=5, frame_gap=1, short_side=72, crop=(64, 48), crop_mode="center")
    batch = _take(loader, 1)[0]
    for frames, name in zip(batch["frames"], batch["clips"]):
        src = _clip_frames(shards, name)  # [n,3,80,142]
        size = [72, int(72 * src.shape[-1] / src.shape[-2])]
        ref = TF.center_crop(TF.resize(src, size, antialias=True), [64, 48]).float()
        err = torch.stack([(ref - f.float()).abs().mean((1, 2, 3)) for f in frames])  # [T,n]
        best = err.argmin(1)
        assert len(set(best.tolist())) == 5 and frames.shape == (5, 3, 64, 48)  # a permutation
        # only the crop region is resized: equal to resize-then-crop up to a sub-pixel shift
        assert err.min(1).values.max() < 8.0
        assert (err.min(1).values < 0.5 * err.sort(1).values[:, 1]).all()


def _crops(src: torch.Tensor, frame: torch.Tensor) -> set[tuple[bool, int, int]]:
    """Every (flip, y, x) at which ``frame`` is a crop of one of the frames ``src`` [n,3,h,w]."""
    c = frame.shape[-1]
    found = set()
    for flip in (False, True):
        s = src.flip(-1) if flip else src
        rows = (s.unfold(3, c, 1) == frame[None, :, :1, None, :]).all(-1).all(1)  # first row matches: [n,h,w']
        for i, y, x in rows[:, : s.shape[-2] - c + 1].nonzero().tolist():
            if torch.equal(s[i, :, y:y + c, x:x + c], frame):
                found.add((flip, y, x))
    return found


def test_random_crop_and_flip_are_shared_by_the_clip(shards):
    loader = build_train_loader(str(shards / "index.json"), batch_size=4, num_workers=0, shuffle_buffer=1,
                                clip_len=5, frame_gap=1, short_side=SHORT, crop=64, hflip=True, seed=1)
    batch = _take(loader, 1)[0]
    flips, offsets = set(), set()
    for frames, name in zip(batch["frames"], batch["clips"]):
        src = _clip_frames(shards, name)  # [n,3,80,142], already at the short side: no resize
        shared = set.intersection(*(_crops(src, f) for f in frames))
        assert shared, "all frames of a clip share one crop and one flip"
        flips |= {f for f, _, _ in shared}
        offsets |= {(y, x) for _, y, x in shared}
    assert flips == {False, True} and len(offsets) >= 3


def _tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, sample in samples:
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_corrupt_clips_are_skipped_and_counted(shards, tmp_path):
    good = list(iter_samples(str(shards / "frames-000000.tar")))[:4]
    key, base = good[0]
    jpgs = sorted(k for k in base if k.endswith(".jpg"))
    bad_jpeg = {**base, **{k: base[k][:200] for k in jpgs}}
    missing = {k: v for k, v in base.items() if k != jpgs[2]}
    few = {"json": json.dumps({"num_frames": 3}).encode(), **{f"{i:04d}.jpg": base[jpgs[i]] for i in range(3)}}
    bad_json = {**base, "json": b"{not json"}
    bad = [("badjpeg", bad_jpeg), ("missing", missing), ("few", few), ("badjson", bad_json)]
    (tmp_path / "mixed.tar").write_bytes(_tar(good + bad))
    loader = build_train_loader(str(tmp_path / "mixed.tar"), batch_size=8, num_workers=0, shuffle_buffer=1, **OPTS)
    b0, b1 = _take(loader, 2)
    assert b0["skipped"] == 4 and b0["frames"].shape == (8, 5, 3, 64, 64)
    assert sorted(set(b0["clips"])) == sorted(f"mixed.tar/{k}" for k, _ in good)
    assert b1["skipped"] == 4  # the next pass skips them again and never raises
