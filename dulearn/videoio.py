"""Video in and out: frames from a video file (PyAV) or a folder of frame images, and mp4/GIF writing.

Frames are read one at a time, so a video of any length can be segmented in bounded memory;
writers take one frame at a time for the same reason.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from dulearn import davis


class VideoError(ValueError):
    """A video or frame folder that cannot be read (the message names the file and the reason)."""


def _natural(path: Path) -> list:
    """Sort key: digit runs compare as numbers (frame_2.jpg before frame_10.jpg)."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.name)]


@dataclass(frozen=True)
class VideoSource:
    """A video file or a frame folder: its frame names, frame rate and frame count (0 = unknown)."""

    path: Path
    files: tuple[Path, ...] = ()  # the frame images of a folder, in order; empty for a video file
    fps: float = 24.0
    count: int = 0

    def name(self, index: int) -> str:
        """Frame name used for output files: a folder frame's file stem, else the 5-digit index."""
        return self.files[index].stem if self.files else f"{index:05d}"

    def index(self, frame: str) -> int:
        """A frame given as a file stem of the folder or as a 0-based index -> its index (stems win)."""
        stems = [f.stem for f in self.files]
        if frame in stems:
            return stems.index(frame)
        if frame.isdigit():
            return int(frame)
        raise VideoError(f"{self.path} has no frame {frame!r} (give a 0-based index or a frame file stem)")

    def frames(self) -> Iterator[np.ndarray]:
        """The frames uint8 [H,W,3], one at a time; all of one size (else a VideoError)."""
        first = None
        for i, frame in enumerate(self._read_folder() if self.files else self._read_file()):
            if first is None:
                first = frame.shape
            elif frame.shape != first:
                raise VideoError(f"{self.path}: frame {self.name(i)} has size {frame.shape[:2]}, the first frame {first[:2]}")
            yield frame

    def _read_folder(self) -> Iterator[np.ndarray]:
        for p in self.files:
            try:
                frame = davis.load_frame(p)
            except OSError as e:
                raise VideoError(f"cannot read frame {p}: {e}") from None
            yield frame

    def _read_file(self) -> Iterator[np.ndarray]:
        """Decode with PyAV; a decoding error after the first frame ends the video with a warning."""
        import av

        n = 0
        try:
            with av.open(str(self.path)) as container:
                for frame in container.decode(video=0):
                    yield frame.to_ndarray(format="rgb24")
                    n += 1
        except (av.error.FFmpegError, OSError) as e:
            if n == 0:
                raise VideoError(f"cannot decode video {self.path}: {e}") from None
            warnings.warn(f"{self.path}: decoding stopped after {n} frames ({e}); the rest is skipped")
        if n == 0:
            raise VideoError(f"video {self.path} has no frames")


def open_video(path: str | Path) -> VideoSource:
    """A video file (anything PyAV reads) or a folder of .jpg/.jpeg/.png frames; a VideoError if unreadable."""
    path = Path(path)
    if path.is_dir():
        files = tuple(sorted((p for p in path.iterdir() if p.suffix.lower() in davis.IMAGE_EXTS), key=_natural))
        if not files:
            raise VideoError(f"frame folder {path} has no {'/'.join(davis.IMAGE_EXTS)} images")
        return VideoSource(path, files, count=len(files))
    if not path.is_file():
        raise VideoError(f"video not found: {path}")
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or 24
            return VideoSource(path, fps=float(rate), count=int(stream.frames or 0))
    except av.error.FFmpegError as e:
        raise VideoError(f"cannot read video {path}: {e}") from None


class VideoWriter:
    """An H.264 mp4 (PyAV, yuv420p) written one uint8 frame [H,W,3] at a time; odd sizes lose their last row/column."""

    def __init__(self, path: str | Path, fps: float = 12, crf: int | None = None):
        self.path, self.fps, self.crf = Path(path), fps, crf
        self.frames = 0
        self._container = self._stream = None

    def write(self, frame: np.ndarray) -> None:
        import av

        if self._stream is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._container = av.open(str(self.path), mode="w")
            self._stream = self._container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001))
            self._stream.width, self._stream.height = frame.shape[1] // 2 * 2, frame.shape[0] // 2 * 2
            self._stream.pix_fmt = "yuv420p"
            if self.crf is not None:
                self._stream.options = {"crf": str(self.crf)}
        h, w = self._stream.height, self._stream.width
        self._container.mux(self._stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:h, :w]), format="rgb24")))
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and close the file (a writer that got no frame writes nothing)."""
        if self._container is not None:
            self._container.mux(self._stream.encode())
            self._container.close()
            self._container = self._stream = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(path: Path, frames: Iterable[np.ndarray], fps: float = 12) -> Path:
    """uint8 frames [T,H,W,3] -> an H.264 mp4 (PyAV; even size) or, for a .gif path, a GIF."""
    path = Path(path)
    if path.suffix == ".gif":
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return path
    with VideoWriter(path, fps) as writer:
        for f in frames:
            writer.write(f)
    return path
