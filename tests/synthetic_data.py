"""Small real inputs for the tests, rendered with dulearn.synthetic (no download, no ../shared).

Writers of frame folders of JPEGs (as DAVIS or YouTube-VOS ship them) and of folders of
H.264 mp4 files (PyAV, as real footage comes), and the sizes of the session fixtures in
conftest.py (which also renders a larger video and a DAVIS-layout set with exact masks).
Each writer is deterministic: the same call gives the same files.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image

from dulearn import synthetic

# Frame-folder videos: 5 sequences of these lengths (249 frames, as davis-mini), so 8-frame
# clips give 6 + 5 + 7 + 6 + 6 = 30 clips, and shards of 6 clips hold 6, 12, 6 and 6.
FOLDER_FRAMES = (50, 40, 60, 50, 49)
FOLDER_SIZE = (108, 192)  # 16:9 like 854x480; at short side 80: 80x142 as real DAVIS frames
# The mp4 folder: lengths from 25 to 91 frames at 24 fps, as the DAVIS-2016 train videos.
VIDEO_FRAMES = (82, 75, 61, 48, 91, 25, 70, 57, 66, 39, 44, 53)
VIDEO_SIZE = (96, 160)
LARGE_SIZE = (360, 640)  # above the builder's default short side (320), so it resizes
JPEG_QUALITY = 90


def write_frame_folders(root: Path, lengths: tuple[int, ...] = FOLDER_FRAMES, size: tuple[int, int] = FOLDER_SIZE,
                        seed: int = 1) -> list[Path]:
    """`root/<name>/00000.jpg ...`: one folder of JPEG frames per synthetic video."""
    folders = []
    for i, n in enumerate(lengths):
        video = synthetic.make_video(seed, i, frames=n, size=size)
        folders.append(write_jpegs(root / f"synth-{seed}-{i:04d}", video.frames))
    return folders


def write_jpegs(folder: Path, frames: np.ndarray) -> Path:
    """Frames [T,H,W,3] uint8 as `folder/00000.jpg ...` (JPEG quality 90, as the builder writes)."""
    folder.mkdir(parents=True, exist_ok=True)
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{t:05d}.jpg", quality=JPEG_QUALITY)
    return folder


def write_mp4_folder(root: Path, lengths: tuple[int, ...] = VIDEO_FRAMES, size: tuple[int, int] = VIDEO_SIZE,
                     seed: int = 2) -> list[Path]:
    """`root/synth-<seed>-<i>.mp4`: H.264 videos (24 fps) of the given lengths."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, n in enumerate(lengths):
        path = root / f"synth-{seed}-{i:04d}.mp4"
        synthetic.write_mp4(path, synthetic.make_video(seed, i, frames=n, size=size).frames)
        paths.append(path)
    return paths


def frame_count(path: Path) -> int:
    """Frames of a video file, by decoding it."""
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def synthetic_shards(out: Path, spec: str, clip_len: int, shard_clips: int, *extra: str) -> Path:
    """Shards of the builder's synthetic source (`spec`: seed=..,videos=..,frames=..,size=HxW,objects=..) in `out`."""
    from shards.build import main as build_main

    if build_main(["synthetic", spec, "--out", str(out), "--clip-len", str(clip_len), "--shard-clips",
                   str(shard_clips), "--workers", "1", *extra]) != 0:
        raise RuntimeError(f"synthetic shard build failed: {spec}")
    return out
