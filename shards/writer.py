"""Writes one planned shard: decode its videos, cut clips, JPEG-encode, tar deterministically.

The sample layout and the clip json are dulearn.shard_format's. A shard is written to
``.<name>.part``, fsynced, its summary saved to ``.parts/<name>.json`` and then renamed to
its final name: a shard file that exists is complete.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from pathlib import Path

from dulearn.fileio import atomic_write_bytes, fsync_dir
from dulearn.shard_format import ClipMeta, ShardSamples, open_shard_writer, sample_key, skipped_input, write_sample
from shards.decode import as_chw, encode_frame, resize_short
from shards.plan import BuildParams, PlannedVideo, ShardPlan, clip_bounds, num_selected

PARTS_DIR = ".parts"


def _write_clip(tar: tarfile.TarFile, v: PlannedVideo, params: BuildParams, clip: int,
                frames: list[tuple[int, bytes]], orig: tuple[int, int], size: tuple[int, int],
                samples: ShardSamples) -> None:
    """One clip of ``v``: (source frame index, JPEG) pairs, source size ``orig``, stored ``size``."""
    meta = ClipMeta(v.video.video_id, params.dataset, clip, tuple(i for i, _ in frames), v.fps, orig, size,
                    v.video.meta)
    offset, json_bytes = write_sample(tar, sample_key(v.index, clip), meta, [jpg for _, jpg in frames])
    samples.add(v.index, offset, json_bytes, len(frames))


def write_video(tar: tarfile.TarFile, v: PlannedVideo, params: BuildParams, samples: ShardSamples) -> dict:
    """Stream one video into clips; returns counts and, on bad input, the skip reason.

    Clips are cut from the planned frame count; decoding stops at the first bad frame and
    the clips completed before it are kept (the video is still listed with the reason).
    """
    bounds = clip_bounds(num_selected(v.num_frames, params.frame_stride), params.clip_len)
    clip, pending, decoded, written, frames_out = 0, [], 0, 0, 0
    orig = size = (0, 0)
    reason = None
    try:
        for raw, frame in enumerate(v.video.read()):
            decoded += 1
            if raw % params.frame_stride:
                continue
            if clip >= len(bounds):
                break
            img = as_chw(frame)
            orig = tuple(img.shape[-2:])
            small = resize_short(img, params.short_side)  # [3,h,w]
            size = tuple(small.shape[-2:])
            pending.append((raw, encode_frame(small, params.quality)))
            if raw // params.frame_stride + 1 == bounds[clip][1]:
                _write_clip(tar, v, params, clip, pending, orig, size, samples)
                written, frames_out, clip, pending = written + 1, frames_out + len(pending), clip + 1, []
    except Exception as e:  # any decoder error is a property of the input: list it, go on
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
        if decoded:
            reason = f"bad frame {decoded}: {reason}"
    if pending and reason is None and len(pending) >= params.min_clip_len:
        _write_clip(tar, v, params, clip, pending, orig, size, samples)  # stream ended before the plan
        written, frames_out = written + 1, frames_out + len(pending)
    if reason is None and written == 0:
        reason = f"only {decoded} frames decoded (planned {v.num_frames})"
    return {"clips": written, "frames": frames_out, "decoded": decoded, "reason": reason}


def write_shard(plan: ShardPlan, out: Path, params: BuildParams) -> dict:
    """Write one shard atomically; returns its summary (also saved under .parts/)."""
    start = time.perf_counter()
    tmp = out / f".{plan.name}.part"
    totals = {"clips": 0, "frames": 0, "decoded": 0, "videos": 0}
    skipped, samples = [], ShardSamples()
    with open(tmp, "wb") as f:
        with open_shard_writer(f) as tar:
            for v in plan.videos:
                r = write_video(tar, v, params, samples)
                for k in ("clips", "frames", "decoded"):
                    totals[k] += r[k]
                totals["videos"] += r["clips"] > 0
                if r["reason"]:
                    skipped.append(skipped_input(v.video.path or v.video.video_id, v.video.video_id, r["reason"],
                                                 r["clips"]))
        f.flush()
        os.fsync(f.fileno())
    summary = {"name": plan.name, "clips": totals["clips"], "frames": totals["frames"],
               "videos": totals["videos"], "bytes": tmp.stat().st_size, "skipped": skipped,
               "samples": samples.columns()}
    atomic_write_bytes(out / PARTS_DIR / f"{plan.name}.json", json.dumps(summary, sort_keys=True).encode(),
                       ".part")
    os.replace(tmp, out / plan.name)
    fsync_dir(out)
    return {**summary, "decoded": totals["decoded"], "seconds": time.perf_counter() - start}

