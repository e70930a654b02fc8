"""The training stream: webdataset clip shards -> uint8 batches [B,T,3,H,W] on CPU workers.

Design (what makes it deterministic, resumable and DDP-safe):

- Lanes. Each rank runs ``max(1, num_workers)`` lanes (one per DataLoader worker); the
  ``world_size * lanes`` global lanes split every source's shards without overlap. In data
  epoch e the shards (split into parts when there are fewer shards than lanes) are permuted
  with a generator seeded by (seed, source, e), the same on every rank, and dealt to the
  lanes round-robin. A lane walks its shards, then moves on to the next data epoch.
- Steps. Global step t is served by lane ``t % lanes`` of each rank (the DataLoader's
  round-robin over its workers then yields steps in order); the stream is infinite, so
  every rank yields the same number of batches however uneven the shards are.
- Shuffle buffer. Per lane and source, a reservoir of ``shuffle_buffer`` clips whose random
  draws depend only on the lane's seed, never on clip contents.
- Augmentation. A clip's random choices (frame start and permutation, short side, crop,
  flip) come from a generator seeded by (seed, source, data epoch, shard, sample): they
  depend on which clip it is, not on when or where it is decoded.
- Resume granularity: one batch. ``start_step=s`` replays lane bookkeeping for steps < s
  from the shard clip counts (index.json, or a scan of tar headers when there is none),
  without decoding anything, then reads only the clips left in the shuffle buffer and the
  rest of the current shard, so batch s equals batch s of an uninterrupted run with the
  same sources, seed, batch_size, shuffle_buffer, num_workers and world_size.
- Geometry. One short side in [lo, hi) and one crop box per clip (as the original's
  MaskScaleSmallest + crop); only the crop region of each frame is resized (the box mapped
  back to source pixels), which equals resize-then-crop up to a sub-pixel shift at a
  fraction of the cost. Sources without an index.json (``pipe:``, URLs, bare tars) have
  their clips counted once by reading them; give object stores an index.json.
- Corrupt clips (bad JPEG, missing frames, too few frames, bad json) are counted in the
  batch's ``skipped`` and replaced by another clip of the same batch (re-augmented), which
  keeps the stream position, and therefore resume, exact. Only if every clip of a batch is
  corrupt does the lane read further clips, which shifts that lane's later batches.
"""

from __future__ import annotations

import warnings
import itertools
import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import decode_jpeg
from torchvision.transforms.v2 import functional as TF

from dulearn.shard_format import (INDEX_NAME, count_samples, is_remote, iter_samples, read_index, sample_frames,
                                  shard_url)

# torchvision's JPEG codec (libjpeg-turbo) is the fast path here; silence its per-call notice.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

__all__ = ["build_train_loader", "TrainStream", "resolve_source", "sample_frame_ids"]

_UNLOADED = object()


# ----------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Shard:
    """One tar shard: where it is and how many clips it holds (None = unknown, scanned)."""

    url: str
    count: int | None = None


def _index_shards(path: Path) -> list[Shard]:
    """The shards listed by an index.json, relative names resolved against its folder."""
    return [Shard(shard_url(path, s.name), s.clips) for s in read_index(path).shards]


def _counts_beside(urls: list[str]) -> dict[str, int]:
    """Clip counts from index.json files next to local shards, when there are any."""
    counts: dict[str, int] = {}
    for folder in {str(Path(u).parent) for u in urls if not is_remote(u)}:
        index = Path(folder) / INDEX_NAME
        if index.exists():
            counts.update({s.url: s.count for s in _index_shards(index)})
    return counts


def resolve_source(source: str | os.PathLike | Sequence[str]) -> list[Shard]:
    """Shards of an index.json path, a brace pattern, a URL/``pipe:`` or a list of those."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        return [s for item in source for s in resolve_source(item)]
    if source.endswith(".json") and not is_remote(source):
        return _index_shards(Path(source))
    urls = list(braceexpand(source))
    counts = _counts_beside(urls)
    shards = [Shard(u, counts.get(u)) for u in urls]
    missing = [s.url for s in shards if not is_remote(s.url) and not Path(s.url).exists()]
    if missing:
        raise FileNotFoundError(f"shard not found: {missing[0]}")
    return shards


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


def _prepare(name: str, sample: dict[str, bytes] | None, rng: random.Random, aug: _Augment) -> _Clip | None:
    """Choose the clip's frames and keep only their JPEG bytes (None if unusable)."""
    frames = None if sample is None else sample_frames(sample)
    if frames is None:
        return None
    ids = sample_frame_ids(len(frames), aug.clip_len, aug.frame_gap, rng)
    return None if ids is None else _Clip(rng, [frames[i] for i in ids], name)


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


# ----------------------------------------------------------------------------- lanes


class _Lane:
    """One lane's view of one source: its shards per data epoch, read through a shuffle buffer."""

    def __init__(self, shards: list[Shard], src: int, lane: int, lanes: int, seed: int,
                 buffer_size: int, aug: _Augment):
        self.shards, self.src, self.lane, self.lanes, self.seed = shards, src, lane, lanes, seed
        self.aug = aug
        self.parts = math.ceil(lanes / len(shards))
        self.size = max(1, buffer_size)
        self.buffer: list[list] = []  # [ref, payload]
        self.rng = random.Random(f"{seed}/{src}/{lane}/buffer")
        self.refs = self._refs()
        self.reader: tuple[int, int, Iterator] | None = None  # (epoch, shard, iterator) being read
        self.reader_pos = 0
        self.counts: dict[int, int] = {}

    def _count(self, i: int) -> int:
        if i not in self.counts:
            self.counts[i] = self.shards[i].count if self.shards[i].count is not None else count_samples(
                self.shards[i].url)
        return self.counts[i]

    def _refs(self) -> Iterator[tuple[int, int, int]]:
        """(data epoch, shard, sample) in this lane's reading order, forever."""
        for epoch in itertools.count():
            units = [(i, p) for i in range(len(self.shards)) for p in range(self.parts)]
            order = np.random.default_rng([self.seed, self.src, epoch]).permutation(len(units))
            empty = True
            for u in order[self.lane::self.lanes]:
                i, p = units[u]
                for j in range(p, self._count(i), self.parts):
                    empty = False
                    yield epoch, i, j
            if empty and sum(self._count(i) for i in range(len(self.shards))) == 0:
                raise ValueError(f"no clips in source {self.src} ({self.shards[0].url} ...)")

    def _load(self, ref: tuple[int, int, int]) -> _Clip | None:
        """Read sample ``ref`` from the open shard reader (reopening it if needed)."""
        epoch, i, j = ref
        if self.reader is None or self.reader[:2] != (epoch, i) or self.reader_pos > j:
            self.reader = (epoch, i, iter_samples(self.shards[i].url))
            self.reader_pos = 0
        key, sample = f"#{j}", None
        for k, s in self.reader[2]:
            self.reader_pos += 1
            if self.reader_pos - 1 == j:
                key, sample = k, s
                break
        name = f"{self.shards[i].url.rsplit('/', 1)[-1]}/{key}"
        return _prepare(name, sample, self._clip_rng(ref), self.aug)

    def _clip_rng(self, ref: tuple[int, int, int]) -> random.Random:
        return random.Random(f"{self.seed}/{self.src}/{ref[0]}/{ref[1]}/{ref[2]}")

    def next(self, load: bool = True) -> _Clip | None:
        """The next clip out of the shuffle buffer (bookkeeping only when ``load`` is False)."""
        while len(self.buffer) < self.size:
            ref = next(self.refs)
            self.buffer.append([ref, self._load(ref) if load else _UNLOADED])
        ref = next(self.refs)
        slot = self.rng.randrange(self.size)
        out = self.buffer[slot]
        self.buffer[slot] = [ref, self._load(ref) if load else _UNLOADED]
        return out[1] if load else None

    def materialize(self) -> None:
        """After a fast-forward: read the clips still in the buffer, shard by shard."""
        pending = sorted((item[0], n) for n, item in enumerate(self.buffer) if item[1] is _UNLOADED)
        self.reader = None
        for ref, n in pending:
            self.buffer[n][1] = self._load(ref)
        self.reader = None


# ----------------------------------------------------------------------------- stream


class _LaneDataset(IterableDataset):
    """Per DataLoader worker: the batches of one lane, from ``start_step`` on."""

    def __init__(self, stream: "TrainStream"):
        self.s = stream

    def _slot_sources(self, step: int) -> list[int]:
        """Which source each slot of a batch draws from (a function of the step only)."""
        s = self.s
        if len(s.sources) == 1:
            return [0] * s.batch_size
        rng = np.random.default_rng([s.seed, 1, step])
        return rng.choice(len(s.sources), size=s.batch_size, p=s.weights).tolist()

    def __iter__(self) -> Iterator[dict]:
        s = self.s
        info = get_worker_info()
        nw = max(1, s.num_workers)
        first = s.start_step + (info.id if info else 0)
        local = first % nw
        lanes = [_Lane(sh, k, s.rank * nw + local, s.world_size * nw, s.seed, s.shuffle_buffer, s.aug)
                 for k, sh in enumerate(s.sources)]
        done = Counter(src for t in range(local, first, nw) for src in self._slot_sources(t))
        for k, n in done.items():
            for _ in range(n):
                lanes[k].next(load=False)
        for lane in lanes:
            lane.materialize()
        for step in itertools.count(first, nw):
            yield self._batch(step, lanes)

    def _batch(self, step: int, lanes: list[_Lane]) -> dict:
        aug = self.s.aug
        clips = [(lanes[k].next(), k) for k in self._slot_sources(step)]
        frames = torch.empty(len(clips), aug.clip_len, 3, *aug.crop, dtype=torch.uint8)  # [B,T,3,H,W]
        ok = [c is not None and decode_clip(c, aug, frames[i]) for i, (c, _) in enumerate(clips)]
        skipped = ok.count(False)
        while not any(ok):  # every clip corrupt: read on (shifts this lane, see module doc)
            c = lanes[clips[0][1]].next()
            ok[0] = c is not None and decode_clip(c, aug, frames[0])
            clips[0] = (c, clips[0][1]) if ok[0] else clips[0]
            skipped += not ok[0]
        good = [i for i, g in enumerate(ok) if g]
        for i in (i for i, g in enumerate(ok) if not g):  # a re-augmented copy of a good clip of the batch
            c = clips[good[i % len(good)]][0]
            clips[i] = (_Clip(random.Random(f"{self.s.seed}/fill/{step}/{i}"), c.jpegs, c.name), clips[i][1])
            decode_clip(clips[i][0], aug, frames[i])
        return {"frames": frames, "skipped": skipped, "step": step, "clips": [c.name for c, _ in clips]}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class TrainStream:
    """Infinite iterable of batches ``{"frames": uint8 [B,T,3,H,W], "skipped": int, "step": int,
    "clips": [shard/key of each clip]}``."""

    def __init__(self, sources: list[list[Shard]], weights: list[float] | None, *, batch_size: int,
                 aug: _Augment, shuffle_buffer: int, num_workers: int, seed: int, rank: int,
                 world_size: int, steps_per_epoch: int | None, start_step: int):
        self.sources, self.batch_size, self.aug = sources, batch_size, aug
        self.weights = None if weights is None else (np.asarray(weights, float) / sum(weights)).tolist()
        self.shuffle_buffer, self.num_workers, self.seed = shuffle_buffer, num_workers, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.steps_per_epoch = steps_per_epoch or self._one_pass()

    def _one_pass(self) -> int:
        """Batches per rank that cover every clip once (from the shard counts)."""
        total = sum(s.count if s.count is not None else count_samples(s.url) for src in self.sources for s in src)
        return max(1, total // (self.batch_size * self.world_size))

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[dict]:
        loader = DataLoader(_LaneDataset(self), batch_size=None, num_workers=self.num_workers,
                            worker_init_fn=_worker_init if self.num_workers else None,
                            persistent_workers=False)
        yield from loader


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


def build_train_loader(source, *, batch_size: int, clip_len: int = 5, frame_gap: int = 2,
                       short_side: int | tuple[int, int] = (256, 320), crop: int | tuple[int, int] = 256,
                       crop_mode: str = "random", hflip: bool = False, shuffle_buffer: int = 256,
                       num_workers: int = 4, seed: int = 0, rank: int = 0, world_size: int = 1,
                       steps_per_epoch: int | None = None, start_step: int = 0,
                       weights: Sequence[float] | None = None) -> TrainStream:
    """The training stream over clip shards (see the module docstring for its guarantees).

    ``source``: index.json path, brace pattern, URL/``pipe:`` or a list of those; with
    ``weights`` each list item is a separate source mixed per clip with those weights.
    ``short_side``: an int (fixed) or a range [lo, hi) drawn per clip; ``crop``: int or
    (h, w); ``steps_per_epoch`` (default: one pass over the clips) is only the stream's
    ``len``; it is infinite. Batch i (from ``start_step``) equals batch i of a run from 0.
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
    return TrainStream(sources, None if weights is None else list(weights), batch_size=batch_size, aug=aug,
                       shuffle_buffer=shuffle_buffer, num_workers=num_workers, seed=seed, rank=rank,
                       world_size=world_size, steps_per_epoch=steps_per_epoch, start_step=start_step)
