"""Build parameters, clip cutting and the deterministic assignment of videos to shards.

Shards are planned before any parallel work: videos are dealt in a random order drawn from
``shuffle_seed`` (so a shard holds videos from all over the source, never one Kinetics class
after another; -1 keeps the source's order) and packed whole (a video is never split across shards, so exactly one worker decodes it)
into shards until a shard reaches its clip count or its estimated byte size. The plan
depends only on the inputs and the parameters, so the shards do not depend on --workers.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from shards.sources import VideoInput

# Typical JPEG size at quality 90 in bytes per pixel, for the shard-size estimate.
BYTES_PER_PIXEL = 0.28


@dataclass(frozen=True)
class BuildParams:
    """Everything that determines the shard bytes (recorded in index.json)."""

    dataset: str
    prefix: str
    short_side: int = 320
    quality: int = 90
    clip_len: int = 50
    min_clip_len: int = 10
    frame_stride: int = 1
    shard_bytes: int = 1_000_000_000
    shard_clips: int = 0
    shuffle_seed: int = 0  # seed of the order videos are dealt to shards in (-1: the source's order)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PlannedVideo:
    """A video with its index in the build (which names its clips) and its probed facts."""

    index: int
    video: VideoInput
    num_frames: int
    fps: float | None


@dataclass
class ShardPlan:
    index: int
    name: str
    videos: list[PlannedVideo] = field(default_factory=list)


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def clip_bounds(num_selected: int, clip_len: int) -> list[tuple[int, int]]:
    """Cut ``num_selected`` frames into max(1, n // clip_len) near-equal clips [start, end).

    Every clip of a video with at least clip_len frames has clip_len..2*clip_len-1 frames,
    so a clip always spans the longest temporal window the presets sample.
    """
    k = max(1, num_selected // clip_len)
    return [(i * num_selected // k, (i + 1) * num_selected // k) for i in range(k)]


def num_selected(num_frames: int, stride: int) -> int:
    """Frames kept after temporal subsampling by ``stride`` (frames 0, stride, 2*stride, ...)."""
    return (num_frames + stride - 1) // stride


def too_short_reason(num_frames: int, params: BuildParams) -> str | None:
    """Why a video of this length cannot give a clip, or None if it can."""
    if num_frames <= 0:
        return "no frames"
    m = num_selected(num_frames, params.frame_stride)
    if m < params.min_clip_len:
        return f"too short: {m} frames after stride {params.frame_stride} < min clip length {params.min_clip_len}"
    return None


def _estimated_bytes(v: PlannedVideo, params: BuildParams) -> float:
    """Bytes of a video's clips, assuming 16:9 frames (sizes are unknown before decoding)."""
    pixels = params.short_side * params.short_side * 16 / 9
    return num_selected(v.num_frames, params.frame_stride) * (pixels * BYTES_PER_PIXEL + 1024)


def shuffled(videos: list[PlannedVideo], seed: int) -> list[PlannedVideo]:
    """The videos in the build's dealing order: a permutation drawn from ``seed`` (-1: as given)."""
    if seed < 0:
        return list(videos)
    out = list(videos)
    random.Random(seed).shuffle(out)
    return out


def assign_shards(videos: list[PlannedVideo], params: BuildParams) -> list[ShardPlan]:
    """Pack videos, in the seeded order, into shards closed at the first video boundary past the target."""
    videos = shuffled(videos, params.shuffle_seed)
    shards: list[ShardPlan] = []
    current: ShardPlan | None = None
    clips = 0
    size = 0.0
    for v in videos:
        if current is None:
            current = ShardPlan(len(shards), shard_name(params.prefix, len(shards)))
            clips, size = 0, 0.0
        current.videos.append(v)
        clips += len(clip_bounds(num_selected(v.num_frames, params.frame_stride), params.clip_len))
        size += _estimated_bytes(v, params)
        full = clips >= params.shard_clips if params.shard_clips > 0 else size >= params.shard_bytes
        if full:
            shards.append(current)
            current = None
    if current is not None:
        shards.append(current)
    return shards
