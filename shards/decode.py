"""Decoding and re-encoding of frames: PyAV for video files, libjpeg-turbo for images."""

from __future__ import annotations

import warnings
from typing import Iterator

import av
import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, encode_jpeg
from torchvision.transforms.v2 import functional as TF

# torchvision's JPEG codec (libjpeg-turbo) is the fast path here; silence its per-call notice.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

VIDEO_EXTS = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv"}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
# Decoder threads per process (set by the builder in each worker; parallelism is across processes).
DECODE_THREADS = 1


class BadInput(ValueError):
    """An input that cannot become clips; its message is the reason listed in index.json."""


def decode_image_bytes(data: bytes, name: str) -> torch.Tensor:
    """RGB uint8 [3,H,W] from encoded image bytes; BadInput for corrupt or non-RGB images."""
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        is_jpeg = data[:2] == b"\xff\xd8"
        img = decode_jpeg(buf) if is_jpeg else decode_image(buf, mode=ImageReadMode.UNCHANGED)  # [C,H,W]
    except RuntimeError as e:
        raise BadInput(f"corrupt image {name}: {str(e).splitlines()[0]}") from None
    if img.shape[0] != 3:
        raise BadInput(f"non-RGB image {name} ({img.shape[0]} channels)")
    return img


def read_video(path: str) -> Iterator[np.ndarray]:
    """Frames [H,W,3] uint8 of the first video stream, decoded with DECODE_THREADS threads."""
    with av.open(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = DECODE_THREADS
        for frame in container.decode(stream):
            yield frame.to_ndarray(format="rgb24")


def probe_video(path: str) -> tuple[int, float | None]:
    """(frame count, fps) of a video by demuxing its packets, without decoding them."""
    with av.open(path) as container:
        stream = _video_stream(container, path)
        fps = float(stream.average_rate) if stream.average_rate else None
        n = sum(1 for packet in container.demux(stream) if packet.size > 0)
    return n, fps


def _video_stream(container, path: str):
    if not container.streams.video:
        raise BadInput(f"{path}: no video stream")
    return container.streams.video[0]


def as_chw(frame) -> torch.Tensor:
    """A frame as uint8 [3,H,W] (accepts [3,H,W] tensors and [H,W,3] arrays)."""
    t = torch.from_numpy(np.ascontiguousarray(frame)) if isinstance(frame, np.ndarray) else frame
    if t.dtype != torch.uint8 or t.ndim != 3:
        raise BadInput(f"frame must be uint8 with 3 dims, got {t.dtype} {tuple(t.shape)}")
    if t.shape[0] != 3:
        t = t.permute(2, 0, 1)  # [H,W,C] -> [C,H,W]
    if t.shape[0] != 3:
        raise BadInput(f"non-RGB frame ({t.shape[0]} channels)")
    return t


def short_side_size(h: int, w: int, short: int) -> tuple[int, int]:
    """(h, w) with the short side at ``short`` and the aspect kept; never upscales."""
    if min(h, w) <= short:
        return h, w
    if h <= w:
        return short, max(1, round(w * short / h))
    return max(1, round(h * short / w)), short


def resize_short(frame: torch.Tensor, short: int) -> torch.Tensor:
    """Antialiased bilinear resize of [3,H,W] uint8 to the given short side."""
    h, w = frame.shape[-2:]
    size = short_side_size(h, w, short)
    return frame if size == (h, w) else TF.resize(frame, list(size), antialias=True)


def encode_frame(frame: torch.Tensor, quality: int) -> bytes:
    """JPEG bytes of [3,H,W] uint8 (libjpeg-turbo, deterministic)."""
    return encode_jpeg(frame.contiguous(), quality=quality).numpy().tobytes()
