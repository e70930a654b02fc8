"""The training stream on real clip shards (of synthetic frame folders): batches, resume, sampling,
geometry, corrupt clips, older shards."""

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

from dulearn.data import _Augment, build_train_loader, load_source, read_clip, resolve_source, sample_frame_ids
from dulearn.sampler import Draw
from dulearn.shard_format import iter_samples, video_of_key
from shards.build import main as build_main
from synthetic_data import synthetic_shards
from shards.verify import verify

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


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """40 synthetic videos of 24 frames (48x64) cut into 3 clips of 8, in shards of 20 clips."""
    return synthetic_shards(tmp_path_factory.mktemp("many") / "shards", "seed=5,videos=40,frames=24,size=48x64,"
                            "objects=1-2", 8, 20)


def _videos(shards: Path) -> dict[str, int]:
    """Clip name (shard@offset, as the stream names clips) -> the build's video index."""
    out = {}
    for tar_path in shards.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    out[f"{tar_path.name}@{m.offset}"] = video_of_key(m.name.split(".")[0])
    return out


def test_batches_hold_distinct_videos_and_an_epoch_shows_each_once(many):
    loader = build_train_loader(str(many / "index.json"), batch_size=3, num_workers=2, hflip=True, **OPTS)
    assert len(loader) == 40 // 3  # an epoch: every video once (the last 40 % 3 wait for a later epoch)
    batches = _take(loader, 2 * len(loader))
    assert [b["step"] for b in batches] == list(range(2 * len(loader)))
    assert all(b["frames"].shape == (3, 5, 3, 64, 64) and b["frames"].dtype == torch.uint8 for b in batches)
    assert all(b["skipped"] == 0 and not b["repeated"] for b in batches)
    video = _videos(many)
    for epoch in (batches[:13], batches[13:]):
        drawn = [video[c] for b in epoch for c in b["clips"]]
        assert len(set(drawn)) == len(drawn) == 39  # no video twice in an epoch, so none twice in a batch
    clips = Counter(c for b in batches for c in b["clips"])
    assert len(clips) > 50  # where in a video the frames start varies between epochs (a name per first clip)


def test_reads_only_the_chosen_frames(many):
    """Bytes read per decoded JPEG byte stay near 1 (5 frames at gap 2 of a video in 3 clips of 8)."""
    loader = build_train_loader(str(many / "index.json"), batch_size=4, num_workers=0, **OPTS)
    batches = _take(loader, 6)
    read, decoded = sum(b["read_bytes"] for b in batches), sum(b["frame_bytes"] for b in batches)
    assert 0 < decoded <= read < 1.5 * decoded, (read, decoded)
    # per clip: its json (two across a clip boundary), then a read per frame (local reads join only
    # ranges closer than LOCAL_GAP, and these frames are a frame apart; remote ones are joined)
    assert all(b["read_requests"] <= (2 + 5) * 4 for b in batches), [b["read_requests"] for b in batches]


@pytest.mark.parametrize("workers,start", [(0, 7), (2, 5), (2, 6)])
def test_resume_gives_the_same_batches(shards, workers, start):
    src = str(shards / "index.json")
    kw = dict(batch_size=2, num_workers=workers, seed=3, hflip=True, **OPTS)
    full = _take(build_train_loader(src, **kw), start + 6)
    resumed = _take(build_train_loader(src, start_step=start, **kw), 6)
    assert _same(resumed, full[start:])
    other = _take(build_train_loader(src, **{**kw, "num_workers": 1 if workers else 2}), start + 6)
    assert _same(other, full)  # the batches do not depend on the number of workers


def test_resume_far_ahead_is_cheap(shards):
    """Resuming at step 20000 (40000 clips in) reads only the batch it yields."""
    start = time.perf_counter()
    kw = dict(batch_size=2, num_workers=0, **OPTS)
    batch = _take(build_train_loader(str(shards / "index.json"), start_step=20_000, **kw), 1)[0]
    assert batch["step"] == 20_000 and batch["frames"].shape == (2, 5, 3, 64, 64)
    assert time.perf_counter() - start < 20  # decoding 40000 clips would take many minutes


def test_weighted_sources_mix_and_resume(many):
    names = sorted(p.name for p in many.glob("*.tar"))
    sources = [[str(many / n) for n in names[:3]], [str(many / n) for n in names[3:]]]
    kw = dict(batch_size=4, num_workers=0, weights=[3, 1], **OPTS)
    full = _take(build_train_loader(sources, **kw), 24)
    assert _same(_take(build_train_loader(sources, start_step=17, **kw), 7), full[17:])
    shard_of = Counter(c.split("@")[0] for b in full for c in b["clips"])
    first = sum(shard_of[n] for n in names[:3])
    assert first > 2 * (96 - first)  # weight 3:1 (expect 72:24)
    video = _videos(many)
    assert all(len({video[c] for c in b["clips"]}) == 4 for b in full)  # distinct videos in every batch


def test_repeats_are_flagged_past_a_small_source_and_resume_exactly(many):
    """A source of 7 videos at weight 3 of a global batch of 8: some batches must repeat a video; the flag
    says exactly which, and a resumed stream flags the same steps."""
    names = sorted(p.name for p in many.glob("*.tar"))
    sources = [str(many / names[0]), [str(many / n) for n in names[1:]]]
    kw = dict(batch_size=8, num_workers=0, weights=[3, 1], **OPTS)
    full = _take(build_train_loader(sources, **kw), 30)
    video = _videos(many)
    flags = [b["repeated"] for b in full]
    assert flags == [len({video[c] for c in b["clips"]}) < 8 for b in full] and 0 < sum(flags) < 30, flags
    assert [b["repeated"] for b in _take(build_train_loader(sources, start_step=13, **kw), 17)] == flags[13:]


def test_shards_without_samples_json_or_frame_sizes_stream_the_same(many, tmp_path):
    """Older builds (no samples.json, no frame_bytes in the json) and bare tar patterns: scanned once."""
    kw = dict(batch_size=4, num_workers=0, seed=2, **OPTS)
    ref = _take(build_train_loader(str(many / "index.json"), **kw), 6)
    names = sorted(p.name for p in many.glob("*.tar"))
    assert _same(_take(build_train_loader(str(many / "synthetic-{000000..000005}.tar"), **kw), 6), ref)
    old = tmp_path / "old"
    old.mkdir()
    for n in names:  # rewrite each shard as builds before samples.json wrote it
        members = []
        with tarfile.open(many / n) as tar:
            for m in tar.getmembers():
                data = tar.extractfile(m).read()
                if m.name.endswith(".json"):
                    data = json.dumps({k: v for k, v in json.loads(data).items() if k != "frame_bytes"},
                                      sort_keys=True).encode()
                members.append((m.name, data))
        with tarfile.open(old / n, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (old / "index.json").write_bytes((many / "index.json").read_bytes())
    got = _take(build_train_loader(str(old / "index.json"), **kw), 6)
    assert all(torch.equal(a["frames"], b["frames"]) for a, b in zip(got, ref, strict=True))
    assert verify(old) == [] and verify(many) == []


def test_pipe_sources_are_refused_with_the_reason(shards):
    with pytest.raises(ValueError, match="pipe: sources cannot be read by byte range"):
        build_train_loader([f"pipe:cat {shards / 'frames-000000.tar'}"], batch_size=2, num_workers=0, **OPTS)


def test_a_source_without_clips_is_an_error(tmp_path):
    (tmp_path / "empty.tar").write_bytes(_tar([]))
    with pytest.raises(ValueError, match="no clips in source"):
        build_train_loader(str(tmp_path / "empty.tar"), batch_size=2, num_workers=0, **OPTS)


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


def test_frames_are_drawn_over_the_whole_video_across_its_clips(many):
    """Each video is 3 clips of 8 frames: T=5 frames at gap 2 start anywhere in its 24 frames, and a
    window across a clip boundary reads from both clips."""
    where: dict[bytes, tuple[int, int]] = {}  # JPEG -> (build's video, frame of the video)
    for path in sorted(many.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():  # written in order: clip after clip, frame after frame
                if m.name.endswith(".jpg"):
                    video = video_of_key(m.name.split(".")[0])
                    where[tar.extractfile(m).read()] = (video, sum(v == video for v, _ in where.values()))
    assert len(where) == 40 * 24  # every frame's JPEG is distinct, so it names its frame
    table, aug = load_source(resolve_source(str(many / "index.json"))), _Augment(5, 2, (64, 80), (64, 64), False, False)
    starts, crossing = set(), 0
    for position in range(400):
        clip, nbytes = read_clip(table, Draw(0, position, position % table.num_videos), aug, seed=0)
        found = [where[j] for j in clip.jpegs]
        frames = sorted(f for _, f in found)
        assert len({v for v, _ in found}) == 1 and frames == list(range(frames[0], frames[0] + 10, 2)), found
        assert nbytes == sum(len(j) for j in clip.jpegs)
        starts.add(frames[0])
        crossing += frames[0] // 8 != frames[-1] // 8
    assert starts == set(range(24 - 8)) and crossing > 100  # every start of the video, many across clips


def _video_frames(shards: Path, name: str) -> torch.Tensor:
    """Every frame of the video a stream sample is named after (its clips in order) [n,3,h,w]."""
    shard, offset = name.split("@")
    with tarfile.open(shards / shard) as tar:
        video = video_of_key(next(m.name for m in tar.getmembers() if m.offset == int(offset)).split(".")[0])
    samples = [sample for key, sample in iter_samples(str(shards / shard)) if video_of_key(key) == video]
    jpgs = [sample[k] for sample in samples for k in sorted(k for k in sample if k.endswith(".jpg"))]
    return torch.stack([decode_jpeg(torch.frombuffer(bytearray(j), dtype=torch.uint8)) for j in jpgs])


def test_center_crop_geometry(shards):
    """5 frames of a video at gap 1: output = 5 of its resized, centre-cropped frames (each found once)."""
    loader = build_train_loader(str(shards / "index.json"), batch_size=2, num_workers=0,
                                clip_len=5, frame_gap=1, short_side=72, crop=(64, 48), crop_mode="center")
    batch = _take(loader, 1)[0]
    for frames, name in zip(batch["frames"], batch["clips"]):
        src = _video_frames(shards, name)  # [n,3,80,142]
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
    loader = build_train_loader(str(shards / "index.json"), batch_size=4, num_workers=0,
                                clip_len=5, frame_gap=1, short_side=SHORT, crop=64, hflip=True, seed=1)
    batch = _take(loader, 1)[0]
    flips, offsets = set(), set()
    for frames, name in zip(batch["frames"], batch["clips"]):
        src = _video_frames(shards, name)  # [n,3,80,142], already at the short side: no resize
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
    videos = len({video_of_key(k) for k, _ in good}) + len(bad)  # the bad keys name no video: one each
    loader = build_train_loader(str(tmp_path / "mixed.tar"), batch_size=videos, num_workers=0, **OPTS)
    b0, b1 = _take(loader, 2)
    assert b0["skipped"] == 4 and b0["frames"].shape == (videos, 5, 3, 64, 64)
    with tarfile.open(tmp_path / "mixed.tar") as tar:
        good_names = {f"mixed.tar@{m.offset}" for m in tar.getmembers() if m.name.split(".")[0] in dict(good)
                      and m.name.endswith(".json")}
    assert set(b0["clips"]) <= good_names
    assert b1["skipped"] == 4  # the next epoch skips them again and never raises
