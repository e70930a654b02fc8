"""Writes one planned shard: decode its videos, cut clips, JPEG-encode, tar deterministically.

Sample layout (webdataset): key ``v<video:08d>_c<clip:04d>`` (no dots), members
``<key>.json`` (metadata, first) and ``<key>.<i:04d>.jpg`` for the clip's frames in order.
Tar headers carry fixed mtime/uid/gid/mode, so equal inputs give equal bytes. A shard is
written to ``.<name>.part``, fsynced, its summary saved to ``.parts/<name>.json`` and then
renamed to its final name: a shard file that exists is complete.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

from dulearn.fileio import atomic_write_bytes, fsync_dir
from shards.decode import as_chw, encode_frame, resize_short
from shards.plan import BuildParams, PlannedVideo, ShardPlan, clip_bounds, num_selected

PARTS_DIR = ".parts"


def clip_key(video_index: int, clip: int) -> str:
    return f"v{video_index:08d}_c{clip:04d}"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _clip_json(v: PlannedVideo, params: BuildParams, clip: int, indices: list[int],
               orig: tuple[int, int], size: tuple[int, int]) -> bytes:
    meta = {"video_id": v.video.video_id, "dataset": params.dataset, "clip": clip,
            "num_frames": len(indices), "frame_indices": indices, "fps": v.fps,
            "orig_size": list(orig), "size": list(size), **v.video.meta}
    return json.dumps(meta, sort_keys=True).encode()


def _write_clip(tar, v, params, clip, frames: list[tuple[int, bytes]], orig, size) -> None:
    key = clip_key(v.index, clip)
    _add_member(tar, f"{key}.json", _clip_json(v, params, clip, [i for i, _ in frames], orig, size))
    for pos, (_, jpg) in enumerate(frames):
        _add_member(tar, f"{key}.{pos:04d}.jpg", jpg)


def write_video(tar: tarfile.TarFile, v: PlannedVideo, params: BuildParams) -> dict:
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
                _write_clip(tar, v, params, clip, pending, orig, size)
                written, frames_out, clip, pending = written + 1, frames_out + len(pending), clip + 1, []
    except Exception as e:  # any decoder error is a property of the input: list it, go on
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
        if decoded:
            reason = f"bad frame {decoded}: {reason}"
    if pending and reason is None and len(pending) >= params.min_clip_len:
        _write_clip(tar, v, params, clip, pending, orig, size)  # stream ended before the plan
        written, frames_out = written + 1, frames_out + len(pending)
    if reason is None and written == 0:
        reason = f"only {decoded} frames decoded (planned {v.num_frames})"
    return {"clips": written, "frames": frames_out, "decoded": decoded, "reason": reason}


def write_shard(plan: ShardPlan, out: Path, params: BuildParams) -> dict:
    """Write one shard atomically; returns its summary (also saved under .parts/)."""
    start = time.perf_counter()
    tmp = out / f".{plan.name}.part"
    totals = {"clips": 0, "frames": 0, "decoded": 0, "videos": 0}
    skipped = []
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for v in plan.videos:
                r = write_video(tar, v, params)
                for k in ("clips", "frames", "decoded"):
                    totals[k] += r[k]
                totals["videos"] += r["clips"] > 0
                if r["reason"]:
                    skipped.append({"input": v.video.path or v.video.video_id, "video_id": v.video.video_id,
                                    "reason": r["reason"], "clips_kept": r["clips"]})
        f.flush()
        os.fsync(f.fileno())
    summary = {"name": plan.name, "clips": totals["clips"], "frames": totals["frames"],
               "videos": totals["videos"], "bytes": tmp.stat().st_size, "skipped": skipped}
    atomic_write_bytes(out / PARTS_DIR / f"{plan.name}.json", json.dumps(summary, sort_keys=True).encode(),
                       ".part")
    os.replace(tmp, out / plan.name)
    fsync_dir(out)
    return {**summary, "decoded": totals["decoded"], "seconds": time.perf_counter() - start}


def atomic_write_json(path: Path, obj) -> None:
    """Write json via temp file + fsync + rename (index.json, build state)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), ".part")
