"""The training stream: clip shards -> uint8 batches [B,T,3,H,W] on CPU workers.

Design (what makes it deterministic, resumable, DDP-safe and cheap to read):

- Videos, not clips, are drawn (dulearn.sampler): every global batch (all ranks) holds
  distinct videos, walked in seeded per-epoch permutations; rank r takes slots
  r*B .. r*B+B-1 of the global batch. Of a drawn video, T frames at the frame gap from a
  random start anywhere in it (as the original samples a video): its clips are consecutive
  parts of the video, and a window across a clip boundary reads from both.
- Reads by byte range (dulearn.storage): a clip costs one read of its json (which lists its
  frames' sizes; two across a clip boundary), then one read of its T chosen frames (nearby
  members joined). Where a clip
  is comes from samples.json beside the shards, or from a one-time scan of their tar headers
  (older builds, bare tars). ``read_bytes``/``frame_bytes`` of every batch measure the
  read amplification.
- Steps. Global step t is served by DataLoader worker ``t % workers`` of each rank (the
  DataLoader's round-robin then yields steps in order); the stream is infinite.
- Augmentation. A clip's random choices (clip, frame start and permutation, short side,
  crop, flip) come from a generator seeded by (seed, source, position of the draw in the
  source's walk): they depend on which draw it is, not on when or where it is decoded.
- Resume granularity: one batch. Batch t is a function of t alone (and of the sources,
  seed, batch size and world size), so ``start_step=s`` starts at batch s with nothing to
  replay; the number of workers does not change the batches.
- Geometry. One short side in [lo, hi) and one crop box per clip (as the original's
  MaskScaleSmallest + crop); only the crop region of each frame is resized (the box mapped
  back to source pixels), which equals resize-then-crop up to a sub-pixel shift at a
  fraction of the cost.
- Corrupt clips (bad JPEG, missing frames, too few frames, bad json, a truncated shard) are
  counted in the batch's ``skipped`` and replaced by a re-augmented copy of a good clip of
  the same batch, which keeps the stream position, and therefore resume, exact. If every
  clip of a batch is corrupt, further videos are tried (seeded by the step). Storage
  errors (a server down after retries) are not corrupt clips: they raise StorageError.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import decode_jpeg
from torchvision.transforms.v2 import functional as TF

from dulearn import storage
from dulearn.sampler import Draw, VideoSampler
from dulearn.shard_format import (BLOCK, SAMPLES_NAME, ClipMeta, ShardFormatError, ShardSamples, is_remote,
                                  json_data_offset, member_offsets, parse_index, parse_samples, scan_samples,
                                  shard_url)

# torchvision's JPEG codec (libjpeg-turbo) is the fast path here; silence its per-call notice.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

__all__ = ["build_train_loader", "TrainStream", "resolve_source", "load_source", "sample_frame_ids"]

FILL_TRIES = 64  # videos tried for a batch whose clips are all corrupt
READ_THREADS = 8  # concurrent remote clip reads per DataLoader worker


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Shard:
    """One tar shard: where it is and how many clips it holds (None = unknown until scanned)."""

    url: str
    count: int | None = None


def _folder(url: str) -> str:
    return url.rsplit("/", 1)[0] if is_remote(url) else str(Path(url).parent)


def _index_shards(where: str) -> list[Shard]:
    """The shards listed by an index.json (local path or URL), names resolved against its folder."""
    return [Shard(shard_url(where, s.name), s.clips) for s in parse_index(storage.read_all(where), where).shards]


def resolve_source(source: str | os.PathLike | Sequence[str]) -> list[Shard]:
    """Shards of an index.json (path or URL), a brace pattern, a URL or a list of those."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        return [s for item in source for s in resolve_source(item)]
    if source.startswith("pipe:"):
        raise ValueError(f"{source}: pipe: sources cannot be read by byte range; serve the shards over "
                         "http(s):// or s3:// (see the README, 'Shards in a bucket')")
    if source.endswith(".json"):
        if not is_remote(source) and not Path(source).exists():
            raise FileNotFoundError(f"shard index not found: {source}")
        return _index_shards(source)
    shards = [Shard(u) for u in braceexpand(source)]
    missing = [s.url for s in shards if not is_remote(s.url) and not Path(s.url).exists()]
    if missing:
        raise FileNotFoundError(f"shard not found: {missing[0]}")
    return shards


def _samples_beside(folder: str) -> dict[str, ShardSamples] | None:
    """The samples.json of a shard folder, or None when there is none."""
    where = f"{folder}/{SAMPLES_NAME}" if is_remote(folder) else str(Path(folder) / SAMPLES_NAME)
    try:
        data = storage.read_all(where)
    except storage.StorageError as e:
        if e.missing:
            return None
        raise
    return parse_samples(data, where)


@dataclass
class SourceTable:
    """Every clip of one source and its videos: where each clip is and how many frames it has."""

    urls: list[str]
    shard: np.ndarray  # [C] shard index of each clip
    offset: np.ndarray  # [C] json member's header offset (-1: no json)
    json_bytes: np.ndarray  # [C]
    frames: np.ndarray  # [C] frames of each clip
    video_clips: list[np.ndarray]  # per video: its clips (indices into the columns)
    frame_data: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # clip -> frames, scanned shards

    @property
    def num_videos(self) -> int:
        return len(self.video_clips)


def load_source(shards: list[Shard]) -> SourceTable:
    """The clip table of a source: samples.json where the build wrote one, else a scan of each shard."""
    beside: dict[str, dict[str, ShardSamples] | None] = {}
    cols: dict[str, list[int]] = {k: [] for k in ("shard", "offset", "json_bytes", "frames", "video")}
    frame_data: dict[int, list[tuple[int, int]]] = {}
    videos: dict[tuple[str, int], int] = {}
    for i, shard in enumerate(shards):
        folder = _folder(shard.url)
        if folder not in beside:
            beside[folder] = _samples_beside(folder)
        name = shard.url.rsplit("/", 1)[-1]
        table = (beside[folder] or {}).get(name)
        if table is None:
            table = scan_samples(shard.url)
        for j in range(len(table.video)):
            clip = len(cols["shard"])
            key = (folder, table.video[j]) if table.video[j] >= 0 else ("", -1 - clip)  # unnamed: own video
            cols["video"].append(videos.setdefault(key, len(videos)))
            cols["shard"].append(i)
            for c in ("offset", "json_bytes", "frames"):
                cols[c].append(getattr(table, c)[j])
            if table.frame_data is not None:
                frame_data[clip] = table.frame_data[j]
    if not cols["shard"]:
        raise ValueError(f"no clips in source {shards[0].url if shards else '(no shards)'}"
                         + (f" ... ({len(shards)} shards)" if len(shards) > 1 else ""))
    video = np.asarray(cols["video"], dtype=np.int64)  # [C]
    order = np.argsort(video, kind="stable")
    bounds = np.flatnonzero(np.diff(video[order])) + 1
    return SourceTable([s.url for s in shards], *(np.asarray(cols[c], dtype=np.int64) for c in
                                                   ("shard", "offset", "json_bytes", "frames")),
                       np.split(order, bounds), frame_data)


# ----------------------------------------------------------------------------- clips


def sample_frame_ids(n: int, clip_len: int, frame_gap: int, rng: random.Random) -> list[int] | None:
    """T frame indices at the frame gap from a random start, permuted (None if n < T).

    As the original: the window gap*T is cut to the clip length, and the gap shrinks to fit.
    """
    window = min(n, frame_gap * clip_len)
    gap = window // clip_len
    if gap == 0:
        return None
    ids = list(range(0, window, gap))[:clip_len]
    start = rng.randint(0, n - ids[-1] - 1)
    order = list(range(clip_len))
    rng.shuffle(order)
    return [ids[i] + start for i in order]


@dataclass
class _Clip:
    """A clip after frame selection: its generator (for the geometric draws) and T JPEGs."""

    rng: random.Random
    jpegs: list[bytes]
    name: str


@dataclass(frozen=True)
class _Augment:
    """Per-clip decode settings shared by the whole stream."""

    clip_len: int
    frame_gap: int
    short_side: tuple[int, int]
    crop: tuple[int, int]
    center: bool
    hflip: bool


def _resized_size(h: int, w: int, short: int) -> tuple[int, int]:
    """Size with the short side at ``short`` (long side truncated, as the original)."""
    return (short, int(short * w / h)) if w >= h else (int(short * h / w), short)


def _resize_crop(f: torch.Tensor, size: tuple[int, int], y0: int, x0: int, crop: tuple[int, int]) -> torch.Tensor:
    """Crop [y0:y0+ch, x0:x0+cw] of ``f`` [3,h,w] resized to ``size``, resizing only that region.

    The box is mapped back to source pixels (outward to whole pixels), so it matches
    resize-then-crop up to a sub-pixel shift and a scale error below 1/crop.
    """
    (h, w), (ch, cw) = f.shape[-2:], crop
    if (h, w) == size:
        return f[:, y0:y0 + ch, x0:x0 + cw]
    sy, sx = h / size[0], w / size[1]
    top, left = int(y0 * sy), int(x0 * sx)
    bottom, right = min(h, math.ceil((y0 + ch) * sy)), min(w, math.ceil((x0 + cw) * sx))
    return TF.resize(f[:, top:bottom, left:right], [ch, cw], antialias=True)  # [3,ch,cw]


def decode_clip(clip: _Clip, aug: _Augment, out: torch.Tensor) -> bool:
    """Decode, resize the short side, crop and maybe flip into ``out`` [T,3,H,W]; False if corrupt."""
    try:
        frames = decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in clip.jpegs])
    except RuntimeError:
        return False
    if any(f.shape != frames[0].shape or f.shape[0] != 3 for f in frames):
        return False
    rng = clip.rng
    lo, hi = aug.short_side
    size = _resized_size(*frames[0].shape[-2:], lo + int((hi - lo) * rng.random()))
    (ch, cw), pad_h, pad_w = aug.crop, max(0, aug.crop[0] - size[0]), max(0, aug.crop[1] - size[1])
    if pad_h or pad_w:  # smaller than the crop: resize whole frames and pad with zeros, as the original
        pad = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        frames = [torch.nn.functional.pad(TF.resize(f, list(size), antialias=True), pad) for f in frames]
        size = tuple(frames[0].shape[-2:])
    if aug.center:
        y0, x0 = int(round((size[0] - ch) / 2)), int(round((size[1] - cw) / 2))
    else:
        y0, x0 = rng.randint(0, size[0] - ch), rng.randint(0, size[1] - cw)
    flip = aug.hflip and rng.random() < 0.5
    for t, f in enumerate(frames):
        crop = _resize_crop(f, size, y0, x0, aug.crop)  # [3,ch,cw]
        out[t] = crop.flip(-1) if flip else crop
    return True


# ----------------------------------------------------------------------------- reading


def _frame_locations(table: SourceTable, clip: int, url: str) -> list[tuple[int, int]] | None:
    """(data offset, size) of each frame of a clip: from the scan, or from the clip's json (one read)."""
    offset, size = int(table.offset[clip]), int(table.json_bytes[clip])
    located = table.frame_data.get(clip)
    if offset < 0:
        return located
    try:
        meta = ClipMeta.from_json(storage.read_ranges(url, [(json_data_offset(offset), size)])[0])
    except ShardFormatError:
        return None
    n, sizes = meta.num_frames, meta.frame_bytes
    if located is not None:
        return located if n == len(located) else None
    if sizes is None:  # a build before frame_bytes without a scan: cannot locate the frames
        return None
    return list(zip(member_offsets(offset, size, sizes), sizes))


def read_clip(table: SourceTable, draw: Draw, aug: "_Augment", seed: int) -> tuple[_Clip | None, int]:
    """Read T frames of the drawn video; (clip or None if corrupt, JPEG bytes read).

    The frames are drawn over the whole video, as the original samples a video: its clips
    are consecutive parts of it (the builder cuts a video in order, whole into one shard),
    so a window that crosses a clip boundary reads from both clips (one json read each).
    """
    rng = random.Random(f"{seed}/{draw.source}/{draw.position}")
    clips = [int(c) for c in table.video_clips[draw.video]]
    counts = table.frames[clips]  # [K] frames of each clip, in video order
    ids = sample_frame_ids(int(counts.sum()), aug.clip_len, aug.frame_gap, rng)
    if ids is None:
        return None, 0
    first_frame = np.concatenate([[0], np.cumsum(counts)[:-1]])  # [K] the video frame each clip starts at
    part = np.searchsorted(first_frame, ids, side="right") - 1  # [T] the clip of each chosen frame
    url_of = {k: table.urls[int(table.shard[clips[k]])] for k in sorted(set(part.tolist()))}  # the clips read
    located: dict[int, list[tuple[int, int]]] = {}
    for k, url in url_of.items():
        located[k] = _frame_locations(table, clips[k], url) or []
        if len(located[k]) != counts[k]:
            return None, 0
    wanted = [(url_of[k], located[k][i - int(first_frame[k])]) for k, i in zip(part.tolist(), ids)]  # (url, (offset, size))
    jpegs = [b""] * len(ids)
    for url in set(url_of.values()):
        mine = [t for t, (u, _) in enumerate(wanted) if u == url]
        for t, data in zip(mine, storage.read_ranges(url, [wanted[t][1] for t in mine])):
            jpegs[t] = data
    if any(len(b) != where[1] for b, (_, where) in zip(jpegs, wanted)):
        return None, 0  # a truncated shard
    k = int(part[int(np.argmin(ids))])  # the clip of the window's first frame names the sample
    clip, url = clips[k], url_of[k]
    first = int(table.offset[clip]) if table.offset[clip] >= 0 else located[k][0][0] - BLOCK
    return _Clip(rng, jpegs, f"{url.rsplit('/', 1)[-1]}@{first}"), sum(len(b) for b in jpegs)


# ----------------------------------------------------------------------------- stream


class _StepDataset(IterableDataset):
    """Per DataLoader worker: this rank's batches of every ``workers``-th step from ``start_step``."""

    def __init__(self, stream: "TrainStream"):
        self.s = stream
        self.pool: ThreadPoolExecutor | None = None  # made in the worker process, for remote reads

    def __iter__(self) -> Iterator[dict]:
        s = self.s
        info = get_worker_info()
        nw = max(1, s.num_workers)
        sampler = VideoSampler([t.num_videos for t in s.tables], s.weights, s.batch_size * s.world_size, s.seed)
        first = s.start_step + (info.id if info else 0)
        step = first
        while True:
            yield self._batch(step, sampler)
            step += nw

    def _batch(self, step: int, sampler: VideoSampler) -> dict:
        s, aug = self.s, self.s.aug
        before = (storage.STATS.bytes, storage.STATS.requests)
        everyone = sampler.global_batch(step)
        draws = everyone[s.rank * s.batch_size:(s.rank + 1) * s.batch_size]
        frames = torch.empty(len(draws), aug.clip_len, 3, *aug.crop, dtype=torch.uint8)  # [B,T,3,H,W]
        clips, decoded = [], 0
        for i, (d, (clip, nbytes)) in enumerate(zip(draws, self._read_all(draws))):
            ok = clip is not None and decode_clip(clip, aug, frames[i])
            clips.append(clip if ok else None)
            decoded += nbytes if ok else 0
        skipped = sum(c is None for c in clips)
        if skipped == len(clips):
            clips[0], nbytes = self._fill(step, frames[0])
            decoded += nbytes
        good = [c for c in clips if c is not None]
        for i in (i for i, c in enumerate(clips) if c is None):  # a re-augmented copy of a good clip of the batch
            c = good[i % len(good)]
            clips[i] = _Clip(random.Random(f"{s.seed}/fill/{step}/{i}"), c.jpegs, c.name)
            decode_clip(clips[i], aug, frames[i])
        return {"frames": frames, "skipped": skipped, "step": step, "clips": [c.name for c in clips],
                "repeated": sampler.repeats(everyone), "read_bytes": storage.STATS.bytes - before[0],
                "read_requests": storage.STATS.requests - before[1], "frame_bytes": decoded}

    def _read_all(self, draws: list[Draw]) -> Iterator[tuple[_Clip | None, int]]:
        """read_clip of every draw: remote ones on READ_THREADS threads (requests wait on the network)."""
        s = self.s
        read = [lambda d=d: read_clip(s.tables[d.source], d, s.aug, s.seed) for d in draws]
        if all(storage.is_local(s.tables[d.source].urls[0]) for d in draws):
            return (r() for r in read)
        if self.pool is None:
            self.pool = ThreadPoolExecutor(READ_THREADS)
        return self.pool.map(lambda r: r(), read)

    def _fill(self, step: int, out: torch.Tensor) -> tuple[_Clip, int]:
        """A clip for a batch whose clips are all corrupt: other videos, seeded by the step."""
        s = self.s
        rng = np.random.default_rng([s.seed, 2, step, s.rank])
        for n in range(FILL_TRIES):
            k = int(rng.integers(len(s.tables)))
            d = Draw(k, -1 - n, int(rng.integers(s.tables[k].num_videos)))
            clip, nbytes = read_clip(s.tables[k], d, s.aug, s.seed + step)
            if clip is not None and decode_clip(clip, s.aug, out):
                return clip, nbytes
        raise ValueError(f"step {step}: no readable clip in {FILL_TRIES} tries; the shards look corrupt "
                         f"({s.tables[0].urls[0]} ...; check them with `python -m shards.build verify DIR`)")


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class TrainStream:
    """Infinite iterable of batches ``{"frames": uint8 [B,T,3,H,W], "skipped": int, "step": int,
    "clips": [shard@offset of each clip's first member], "repeated": bool (the global batch holds a video twice),
    "read_bytes"/"read_requests"/"frame_bytes": what this batch read and what it decoded}``."""

    def __init__(self, tables: list[SourceTable], weights: list[float] | None, *, batch_size: int, aug: _Augment,
                 num_workers: int, seed: int, rank: int, world_size: int, steps_per_epoch: int | None,
                 start_step: int, pin_memory: bool = False):
        self.tables, self.batch_size, self.aug = tables, batch_size, aug
        self.weights = None if weights is None else (np.asarray(weights, float) / sum(weights)).tolist()
        self.num_workers, self.seed, self.pin_memory = num_workers, seed, pin_memory
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        sampler = VideoSampler([t.num_videos for t in tables], self.weights, batch_size * world_size, seed)
        self.steps_per_epoch = steps_per_epoch or sampler.epoch_steps()

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[dict]:
        loader = DataLoader(_StepDataset(self), batch_size=None, num_workers=self.num_workers,
                            worker_init_fn=_worker_init if self.num_workers else None,
                            persistent_workers=False, pin_memory=self.pin_memory)
        yield from loader


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


def build_train_loader(source, *, batch_size: int, clip_len: int = 5, frame_gap: int = 2,
                       short_side: int | tuple[int, int] = (256, 320), crop: int | tuple[int, int] = 256,
                       crop_mode: str = "random", hflip: bool = False, num_workers: int = 4, seed: int = 0,
                       rank: int = 0, world_size: int = 1, steps_per_epoch: int | None = None,
                       start_step: int = 0, weights: Sequence[float] | None = None,
                       pin_memory: bool = False) -> TrainStream:
    """The training stream over clip shards (see the module docstring for its guarantees).

    ``source``: index.json (path or URL), brace pattern, URL or a list of those; with
    ``weights`` each list item is a separate source mixed per slot with those weights.
    ``short_side``: an int (fixed) or a range [lo, hi) drawn per clip; ``crop``: int or
    (h, w); ``steps_per_epoch`` (default: every video about once) is only the stream's
    ``len``; it is infinite. Batch i (from ``start_step``) equals batch i of a run from 0.
    ``pin_memory``: page-locked batches for asynchronous copies to a CUDA device.
    """
    if crop_mode not in ("random", "center"):
        raise ValueError(f"crop_mode must be 'random' or 'center', got {crop_mode!r}")
    if weights is not None:
        items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
        if len(weights) != len(items) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights {list(weights)} must be non-negative, one per source ({len(items)})")
        sources = [resolve_source(item) for item in items]
    else:
        sources = [resolve_source(source)]
    for src in sources:
        if not src:
            raise ValueError(f"no shards in source {source!r}")
    aug = _Augment(clip_len, frame_gap, _pair(short_side), _pair(crop), crop_mode == "center", hflip)
    return TrainStream([load_source(src) for src in sources], None if weights is None else list(weights),
                       batch_size=batch_size, aug=aug, num_workers=num_workers, seed=seed, rank=rank,
                       world_size=world_size, steps_per_epoch=steps_per_epoch, start_step=start_step,
                       pin_memory=pin_memory)
