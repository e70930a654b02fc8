"""Source registry: how each dataset layout on disk turns into a list of input videos.

Registering a new source takes one function in any module (``shards/build.py --plugin
MODULE`` imports it before the build runs)::

    from shards.sources import VideoInput, register_source

    @register_source("mine")
    def mine(root: Path) -> Iterator[VideoInput]:
        for i in range(8):
            yield VideoInput(video_id=f"mine{i}", read=partial(make_frames, i), num_frames=40, fps=24.0)

``read`` must be picklable (a module-level function, or ``functools.partial`` of one),
because it runs in a worker process; it yields RGB frames as uint8 tensors [3,H,W] (or
numpy [H,W,3]) at any resolution (the builder resizes) and raises any exception for bad
input (the video is then skipped and listed with the message). ``num_frames`` and ``fps``
may be left None: the builder then calls ``probe`` (or counts by reading) in a worker.
Videos are built in the order the function yields them, so yield them in a stable order.
``meta`` goes into every clip's json beside its own fields (dulearn.shard_format.ClipMeta).
"""

from __future__ import annotations

import argparse
import re
import zipfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

from dulearn.shard_format import check_extras
from dulearn.synthetic import parse_hw, parse_objects, read_frames, video_name
from shards.decode import IMAGE_EXTS, VIDEO_EXTS, decode_image_bytes, probe_video, read_video

__all__ = ["VideoInput", "register_source", "get_source", "source_names", "filter_by_list"]


@dataclass
class VideoInput:
    """One input video: an id, a picklable frame reader and what is known without reading it."""

    video_id: str
    read: Callable[[], Iterable]
    num_frames: int | None = None
    fps: float | None = None
    probe: Callable[[], tuple[int, float | None]] | None = None
    path: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_extras(self.meta)  # a source bug: fail when listing, not in a worker


SourceFn = Callable[[Path], Iterable[VideoInput]]
_REGISTRY: dict[str, SourceFn] = {}


def register_source(name: str) -> Callable[[SourceFn], SourceFn]:
    """Decorator that makes a layout available to ``shards/build.py NAME ROOT``."""

    def deco(fn: SourceFn) -> SourceFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"source {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def get_source(name: str) -> SourceFn:
    """The registered source function for ``name`` (clear error listing the known ones)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown source {name!r}; known: {', '.join(source_names())}")
    return _REGISTRY[name]


def source_names() -> list[str]:
    return sorted(_REGISTRY)


def filter_by_list(videos: Iterable[VideoInput], root: Path, list_file: Path) -> Iterator[VideoInput]:
    """Keep the videos whose path (absolute or relative to root) or id is listed, one per line."""
    wanted = set()
    for line in Path(list_file).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            wanted.add(line.rstrip("/"))
    for v in videos:
        rel = str(Path(v.path).relative_to(root)) if v.path.startswith(str(root)) else v.path
        if {v.video_id, v.path, rel} & wanted:
            yield v


# ----------------------------------------------------------------------------- readers


def _natural_key(name: str) -> tuple:
    """Sort key that orders 2.jpg before 10.jpg."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def read_frame_files(paths: list[str]) -> Iterator:
    """Frames of a folder, decoded with the fast (libjpeg-turbo) path."""
    for p in paths:
        yield decode_image_bytes(Path(p).read_bytes(), p)


def read_zip_frames(path: str) -> Iterator:
    """Frames stored as images inside one zip file (TrackingNet's zips/ form)."""
    with zipfile.ZipFile(path) as zf:
        for name in _zip_frame_names(zf):
            yield decode_image_bytes(zf.read(name), f"{path}:{name}")


def _zip_frame_names(zf: zipfile.ZipFile) -> list[str]:
    names = [n for n in zf.namelist() if Path(n).suffix.lower() in IMAGE_EXTS]
    return sorted(names, key=_natural_key)


def _zip_count(path: str) -> tuple[int, float | None]:
    with zipfile.ZipFile(path) as zf:
        return len(_zip_frame_names(zf)), None


def frame_folder(folder: Path, root: Path, video_id: str | None = None, fps: float | None = None) -> VideoInput:
    """A folder of frame images as one video (frames in natural name order)."""
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file()),
                   key=lambda p: _natural_key(p.name))
    vid = video_id or str(folder.relative_to(root))
    return VideoInput(vid, partial(read_frame_files, [str(p) for p in files]), num_frames=len(files),
                      fps=fps, path=str(folder))


def video_file(path: Path, root: Path, meta: dict | None = None) -> VideoInput:
    """A video file decoded with PyAV (frame count and fps probed in a worker)."""
    rel = path.relative_to(root)
    return VideoInput(str(rel.with_suffix("")), partial(read_video, str(path)),
                      probe=partial(probe_video, str(path)), path=str(path), meta=meta or {})


def _video_files(root: Path) -> list[Path]:
    return sorted((p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTS and p.is_file()),
                  key=lambda p: str(p.relative_to(root)))


def _leaf_frame_dirs(top: Path) -> list[Path]:
    """Folders holding frames: every folder with images, plus empty leaf folders (reported)."""
    out = []
    for d in sorted([top, *(p for p in top.rglob("*") if p.is_dir())]):
        entries = list(d.iterdir())
        has_images = any(e.suffix.lower() in IMAGE_EXTS for e in entries)
        is_leaf = not any(e.is_dir() for e in entries)
        if has_images or (is_leaf and d != top):
            out.append(d)
    return out


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir())


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory ({what})")
    return path


# ----------------------------------------------------------------------------- layouts


@register_source("videos")
def videos(root: Path) -> Iterator[VideoInput]:
    """Any tree of video files (mp4, webm, mkv, avi, mov, ...)."""
    for p in _video_files(_need_dir(root, "a tree of video files")):
        yield video_file(p, root)


@register_source("kinetics")
def kinetics(root: Path) -> Iterator[VideoInput]:
    """Kinetics-400 as the downloaders store it: ``<class>/<youtube_id>_<start>_<end>.mp4``."""
    for p in _video_files(_need_dir(root, "Kinetics class folders")):
        yield video_file(p, root, meta={"label": p.parent.name})


@register_source("frames")
def frames(root: Path) -> Iterator[VideoInput]:
    """Any tree of frame folders (each folder with images is one video)."""
    for d in _leaf_frame_dirs(_need_dir(root, "a tree of frame folders")):
        yield frame_folder(d, root, video_id=str(d.relative_to(root)) if d != root else root.name)


@register_source("trackingnet")
def trackingnet(root: Path) -> Iterator[VideoInput]:
    """TrackingNet: ``TRAIN_<i>/frames/<video>/<n>.jpg`` or ``TRAIN_<i>/zips/<video>.zip``."""
    chunks = [d for d in _subdirs(_need_dir(root, "TrackingNet root")) if d.name.upper().startswith("TRAIN_")]
    if not chunks:
        raise FileNotFoundError(f"{root}: no TRAIN_<i> folders (TrackingNet layout)")
    for chunk in chunks:
        if (chunk / "frames").is_dir():
            for d in _subdirs(chunk / "frames"):
                yield frame_folder(d, root, video_id=f"{chunk.name}/{d.name}", fps=30.0)
        elif (chunk / "zips").is_dir():
            for z in sorted((chunk / "zips").glob("*.zip")):
                yield VideoInput(f"{chunk.name}/{z.stem}", partial(read_zip_frames, str(z)),
                                 probe=partial(_zip_count, str(z)), fps=30.0, path=str(z))


@register_source("ytvos")
def ytvos(root: Path) -> Iterator[VideoInput]:
    """YouTube-VOS: ``train_all_frames/JPEGImages/<video>/<5-digit>.jpg`` (else ``train/``)."""
    for cand in (root / "train_all_frames" / "JPEGImages", root / "train" / "JPEGImages", root / "JPEGImages"):
        if cand.is_dir():
            fps = 6.0 if cand.parent.name == "train" else 30.0  # train/ keeps every 5th frame
            for d in _subdirs(cand):
                yield frame_folder(d, cand, video_id=d.name, fps=fps)
            return
    raise FileNotFoundError(f"{root}: no train_all_frames/JPEGImages or train/JPEGImages (YouTube-VOS layout)")


@register_source("oxuva")
def oxuva(root: Path) -> Iterator[VideoInput]:
    """OxUvA: ``images/<split>/<video>/<6-digit>.jpeg`` (dev and test)."""
    images = _need_dir(root / "images", "OxUvA images/<split>/<video>")
    for split in _subdirs(images):
        for d in _subdirs(split):
            yield frame_folder(d, images, video_id=f"{split.name}/{d.name}", fps=30.0)


SYNTHETIC_DEFAULTS = {"seed": "0", "videos": "64", "frames": "48", "size": "256x256", "objects": "2-4"}


def parse_synthetic_spec(spec: str | Path) -> dict:
    """Parse a spec `seed=0,videos=64,frames=48,size=256x256,objects=2-4` (any subset, or `default`).

    Only the last path component counts: the builder hands ROOT over as a resolved path.
    """
    spec = Path(spec).name
    raw = dict(SYNTHETIC_DEFAULTS)
    for item in filter(None, (part.strip() for part in ("" if spec == "default" else spec).split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in SYNTHETIC_DEFAULTS:
            raise ValueError(f"synthetic source spec: bad item {item!r}; expected key=value with key in "
                             f"{sorted(SYNTHETIC_DEFAULTS)}")
        raw[key] = value
    try:
        return {"seed": int(raw["seed"]), "videos": int(raw["videos"]), "frames": int(raw["frames"]),
                "size": parse_hw(raw["size"]), "objects": parse_objects(raw["objects"])}
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise ValueError(f"synthetic source spec {spec!r}: {e}") from None


@register_source("synthetic")
def synthetic(root: Path) -> Iterator[VideoInput]:
    """dulearn.synthetic's procedural videos; ROOT is a spec (parse_synthetic_spec), not a folder."""
    spec = parse_synthetic_spec(root)
    for i in range(spec["videos"]):
        read = partial(read_frames, spec["seed"], i, spec["frames"], spec["size"], spec["objects"])
        yield VideoInput(video_name(spec["seed"], i), read, num_frames=spec["frames"], fps=24.0,
                         meta={"synthetic": {**spec, "index": i}})
