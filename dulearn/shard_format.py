"""The clip shard format in one place: tar layout, clip json, index.json, writing and reading.

dulearn is the library and owns the format; ``shards/`` (the builder) writes through this
module, and dulearn never imports ``shards``.

Layout. A shard is an uncompressed USTAR tar holding one sample per clip, its members in
this order::

    <key>.json          the clip's metadata (ClipMeta), first: a streaming reader has it before the frames
    <key>.0000.jpg      the clip's frames in order, <key>.<i:04d>.jpg for i = 0 .. num_frames - 1
    ...

Since every member name is short, each member is one 512-byte header and its data padded to
512 bytes, so a clip's frames can be found from its json alone: the json's ``frame_bytes``
(the size of each frame) gives every frame member's offset from the json's (member_offsets).

``key`` is ``v<video:08d>_c<clip:04d>`` (the video's index in the build, the clip's index in
the video) and has no dot, since a member's extension starts at the first dot of its base
name. Headers carry mtime 0, mode 0644, uid/gid 0 and no user/group names, so equal inputs
give equal bytes.

``index.json`` beside the shards (ShardIndex): ``format`` (FORMAT), ``source``, ``root``,
``params`` (the build parameters), ``shards`` (name, clips, frames, videos and bytes of each,
in order), ``totals`` (their sums, and the numbers of shards and of skipped inputs) and
``skipped`` (input, video_id, reason and clips_kept of each input left out or cut short).

``samples.json`` beside it (SampleTable): for every shard, per clip in shard order, its video
(the build's video index), the offset of its json member's header, the json's size and its
number of frames: what the training stream needs to read any clip's frames by byte range
without scanning the shard. Shards without it (older builds, bare tars) are scanned once.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import tarfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping, Sequence

from webdataset.gopen import gopen

from dulearn.fileio import atomic_write_json

__all__ = ["FORMAT", "INDEX_NAME", "ShardFormatError", "ClipMeta", "ShardEntry", "ShardIndex", "sample_key",
           "frame_ext", "frame_exts", "open_shard_writer", "write_sample", "iter_samples", "count_samples",
           "check_sample", "check_extras", "sample_frames", "skipped_input", "read_index", "parse_index", "write_index", "shard_url",
           "is_remote", "SAMPLES_NAME", "ShardSamples", "video_of_key", "write_samples", "parse_samples", "scan_samples",
           "json_data_offset", "member_offsets"]

FORMAT = "dulearn-shards/1"
INDEX_NAME = "index.json"
SAMPLES_NAME = "samples.json"
SAMPLES_FORMAT = "dulearn-samples/1"
SAMPLE_COLUMNS = ("video", "offset", "json_bytes", "frames")
BLOCK = 512  # tar header and data granularity
JSON_EXT = "json"
FRAME_SUFFIX = ".jpg"
# The json's own fields; a source's extras (e.g. Kinetics' label) may not reuse these names.
CLIP_FIELDS = frozenset({"video_id", "dataset", "clip", "num_frames", "frame_indices", "fps", "orig_size", "size"})
OPTIONAL_FIELDS = frozenset({"frame_bytes"})  # written since the stream reads frames by byte range
COUNTS = ("clips", "frames", "videos", "bytes")


class ShardFormatError(ValueError):
    """A file that is not (or no longer) in the shard format; the message says what is wrong."""


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _ints(value: Any, what: str, length: int | None = None) -> tuple[int, ...]:
    """``value`` as a tuple of non-negative ints (of ``length``), else ShardFormatError naming ``what``."""
    ok = isinstance(value, (list, tuple)) and all(_is_count(v) for v in value)
    if not ok or (length is not None and len(value) != length):
        shape = f"{length} non-negative integers" if length else "a list of non-negative integers"
        raise ShardFormatError(f"clip json: {what} must be {shape}, got {value!r}")
    return tuple(value)


# ----------------------------------------------------------------------------- names


def sample_key(video_index: int, clip: int) -> str:
    """The key of clip ``clip`` of the build's video ``video_index``."""
    return f"v{video_index:08d}_c{clip:04d}"


def frame_ext(pos: int) -> str:
    """The extension of a clip's frame ``pos`` (the member is ``<key>.<ext>``)."""
    return f"{pos:04d}{FRAME_SUFFIX}"


def frame_exts(sample: Mapping[str, bytes]) -> list[str]:
    """The frame extensions of a sample in frame order."""
    return sorted(k for k in sample if k.endswith(FRAME_SUFFIX))


def _split_member(name: str) -> tuple[str, str]:
    """(sample key, extension) of a member name: the extension starts at the base name's first dot."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


# ----------------------------------------------------------------------------- clip json


@dataclass(frozen=True)
class ClipMeta:
    """The json of one clip: its source video, which source frames it holds, at what size."""

    video_id: str
    dataset: str  # the source layout (kinetics, ytvos, videos, ...)
    clip: int  # index of the clip in its video
    frame_indices: tuple[int, ...]  # source frame number of each stored frame
    fps: float | None  # of the source video, None when unknown
    orig_size: tuple[int, int]  # (H, W) of the source frames
    size: tuple[int, int]  # (H, W) of the stored frames
    extras: Mapping[str, Any] = field(default_factory=dict)  # the source's own fields (e.g. Kinetics' label)
    frame_bytes: tuple[int, ...] | None = None  # size of each JPEG member (None in shards built before it)

    def __post_init__(self) -> None:
        for name in ("video_id", "dataset"):
            if not isinstance(getattr(self, name), str):
                raise ShardFormatError(f"clip json: {name} must be a string, got {getattr(self, name)!r}")
        if not _is_count(self.clip):
            raise ShardFormatError(f"clip json: clip must be a non-negative integer, got {self.clip!r}")
        object.__setattr__(self, "frame_indices", _ints(self.frame_indices, "frame_indices"))
        if not self.frame_indices:
            raise ShardFormatError("clip json: frame_indices is empty")
        if self.fps is not None and (isinstance(self.fps, bool) or not isinstance(self.fps, (int, float))):
            raise ShardFormatError(f"clip json: fps must be a number or null, got {self.fps!r}")
        object.__setattr__(self, "orig_size", _ints(self.orig_size, "orig_size", 2))
        object.__setattr__(self, "size", _ints(self.size, "size", 2))
        if self.frame_bytes is not None:
            object.__setattr__(self, "frame_bytes", _ints(self.frame_bytes, "frame_bytes", self.num_frames))
        check_extras(self.extras)

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)

    def to_json(self) -> bytes:
        """The json member's bytes (keys sorted, extras beside the fields)."""
        fields = {"video_id": self.video_id, "dataset": self.dataset, "clip": self.clip,
                  "num_frames": self.num_frames, "frame_indices": list(self.frame_indices), "fps": self.fps,
                  "orig_size": list(self.orig_size), "size": list(self.size)}
        if self.frame_bytes is not None:
            fields["frame_bytes"] = list(self.frame_bytes)
        return json.dumps({**fields, **self.extras}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ClipMeta:
        """Parse and validate a json member; ShardFormatError names the first bad field."""
        try:
            raw = json.loads(data)
        except (ValueError, TypeError) as e:
            raise ShardFormatError(f"clip json: not JSON ({type(e).__name__})") from None
        if not isinstance(raw, dict):
            raise ShardFormatError(f"clip json: expected an object, got {type(raw).__name__}")
        missing = sorted(CLIP_FIELDS - set(raw))
        if missing:
            raise ShardFormatError(f"clip json: missing {', '.join(missing)}")
        own = CLIP_FIELDS | OPTIONAL_FIELDS
        meta = cls(raw["video_id"], raw["dataset"], raw["clip"], raw["frame_indices"], raw["fps"],
                   raw["orig_size"], raw["size"], {k: v for k, v in raw.items() if k not in own},
                   raw.get("frame_bytes"))
        if raw["num_frames"] != meta.num_frames:
            raise ShardFormatError(f"clip json: num_frames {raw['num_frames']!r} but {meta.num_frames} frame_indices")
        return meta


def check_extras(extras: Mapping[str, Any]) -> None:
    """Refuse source extras that would overwrite the clip json's own fields."""
    clash = sorted(set(extras) & (CLIP_FIELDS | OPTIONAL_FIELDS))
    if clash:
        raise ShardFormatError(f"clip json: source fields {clash} would overwrite the clip's own")


# ----------------------------------------------------------------------------- writing
# tarfile, not webdataset's TarWriter: that orders a sample's members by name (frames before
# the json), which would change the bytes of every shard built so far.


def open_shard_writer(fileobj: BinaryIO) -> tarfile.TarFile:
    """A tar writer for one shard (USTAR, uncompressed); fill it with write_sample, then close it."""
    return tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_sample(tar: tarfile.TarFile, key: str, meta: ClipMeta, frames: Sequence[bytes]) -> tuple[int, int]:
    """Append one clip: its json (with frame_bytes), then its JPEG frames in order (deterministic headers).

    Returns (offset of the json member's header, json size): the clip's samples.json entry.
    """
    if len(frames) != meta.num_frames:
        raise ValueError(f"{key}: {len(frames)} frames for a json of {meta.num_frames}")
    data = replace(meta, frame_bytes=tuple(len(f) for f in frames)).to_json()
    offset = tar.offset
    _add_member(tar, f"{key}.{JSON_EXT}", data)
    for pos, jpg in enumerate(frames):
        _add_member(tar, f"{key}.{frame_ext(pos)}", jpg)
    return offset, len(data)


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def json_data_offset(offset: int) -> int:
    """Where the json's bytes start, from its member's header offset."""
    return offset + BLOCK


def member_offsets(offset: int, json_bytes: int, frame_bytes: Sequence[int]) -> list[int]:
    """Data offset of each frame member of the clip whose json header is at ``offset``."""
    pos, out = offset + BLOCK + _padded(json_bytes), []
    for size in frame_bytes:
        out.append(pos + BLOCK)
        pos += BLOCK + _padded(size)
    return out


def skipped_input(path_or_id: str, video_id: str, reason: str, clips_kept: int = 0) -> dict:
    """index.json's entry for an input left out of the build (or cut short after clips_kept clips)."""
    return {"input": path_or_id, "video_id": video_id, "reason": reason, "clips_kept": clips_kept}


# ----------------------------------------------------------------------------- reading
# tarfile, not webdataset.tariterators: count_samples must split member names exactly as
# iter_samples does while seeking over headers only, and webdataset lower-cases extensions.


def is_remote(url: str) -> bool:
    """Whether a shard location is a ``pipe:`` command or a URL (else a local path)."""
    return url.startswith("pipe:") or "://" in url


def iter_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of a tar shard, in order; stops at a broken tail."""
    stream = gopen(url, "rb")
    key, sample = None, {}
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_member(member.name)
                if k != key and key is not None:
                    yield key, sample
                    sample = {}
                key = k
                sample[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError):
        pass  # a truncated or corrupt shard: its remaining samples count as missing
    finally:
        _close_quietly(stream)
    if key is not None:
        yield key, sample


def _close_quietly(stream) -> None:
    """Close a shard stream; a pipe closed early exits with SIGPIPE, which is expected."""
    try:
        stream.close()
    except Exception:  # noqa: BLE001 (exit status of an abandoned pipe)
        pass


def count_samples(url: str) -> int:
    """Clips in a shard: local files by seeking over tar headers, others by reading."""
    if not is_remote(url):
        with tarfile.open(url, "r:") as tar:
            keys = (_split_member(m.name)[0] for m in tar.getmembers() if m.isfile())
            return sum(1 for _ in itertools.groupby(keys))
    return sum(1 for _ in iter_samples(url))


def check_sample(sample: Mapping[str, bytes]) -> ClipMeta:
    """The validated json of a sample whose members are exactly json, then frames 0..n-1 in order."""
    if JSON_EXT not in sample:
        raise ShardFormatError("no json member")
    meta = ClipMeta.from_json(sample[JSON_EXT])
    found = len(frame_exts(sample))
    if found != meta.num_frames:
        raise ShardFormatError(f"json says {meta.num_frames} frames, found {found}")
    sizes = tuple(len(sample[k]) for k in frame_exts(sample))
    if meta.frame_bytes is not None and meta.frame_bytes != sizes:
        raise ShardFormatError(f"json's frame_bytes {list(meta.frame_bytes)[:4]}... differ from the frames' "
                               f"sizes {list(sizes)[:4]}...")
    expected = [JSON_EXT, *(frame_ext(i) for i in range(meta.num_frames))]
    if list(sample) != expected:
        raise ShardFormatError(f"members {', '.join(list(sample)[:4])}, ... are not json, then "
                               f"{frame_ext(0)} .. {frame_ext(meta.num_frames - 1)} in order")
    return meta


def sample_frames(sample: Mapping[str, bytes]) -> list[bytes] | None:
    """A sample's JPEG frames in order, or None if its json is unreadable or a frame is missing.

    Lenient, for the training stream: only the json's num_frames is read (a sample without
    json has as many frames as it holds); check_sample is the strict reading.
    """
    names = frame_exts(sample)
    try:
        n = json.loads(sample[JSON_EXT])["num_frames"] if JSON_EXT in sample else len(names)
    except (ValueError, KeyError, TypeError):
        return None
    return [sample[k] for k in names] if n == len(names) else None


# ----------------------------------------------------------------------------- index.json


@dataclass(frozen=True)
class ShardEntry:
    """One shard as index.json lists it; a hand-written index may give only name and clips."""

    name: str  # file name beside index.json, or a URL / pipe: command
    clips: int
    frames: int | None = None
    videos: int | None = None
    bytes: int | None = None

    @classmethod
    def from_dict(cls, d: Any) -> ShardEntry:
        """Entry from an index.json item (or a builder's shard summary: other keys are ignored)."""
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not _is_count(d.get("clips")):
            raise ShardFormatError(f"a shard entry needs a name and a clip count, got {d!r}")
        counts = {k: d.get(k) for k in COUNTS[1:]}
        bad = [k for k, v in counts.items() if v is not None and not _is_count(v)]
        if bad:
            raise ShardFormatError(f"shard {d['name']}: {bad[0]} must be a non-negative integer, got {d[bad[0]]!r}")
        return cls(d["name"], d["clips"], **counts)


@dataclass(frozen=True)
class ShardIndex:
    """index.json: the shards of one build, in order, with what the build was and what it skipped."""

    shards: list[ShardEntry]
    source: str = ""
    root: str = ""
    params: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)  # skipped_input() entries

    def totals(self) -> dict[str, int]:
        sums = {k: sum(getattr(s, k) or 0 for s in self.shards) for k in COUNTS}
        return {**sums, "shards": len(self.shards), "skipped": len(self.skipped)}

    def to_dict(self) -> dict:
        return {"format": FORMAT, "source": self.source, "root": self.root, "params": self.params,
                "shards": [asdict(s) for s in self.shards], "totals": self.totals(), "skipped": self.skipped}


def read_index(path: str | Path) -> ShardIndex:
    """Read a local index.json; ShardFormatError (with the path) for a file that is not a shard index."""
    return parse_index(Path(path).read_bytes(), str(path))


def write_index(path: str | Path, index: ShardIndex) -> None:
    """Write index.json atomically (temporary ``.index.json.part``, fsync, rename)."""
    atomic_write_json(Path(path), index.to_dict(), ".part")


def shard_url(index_path: str | Path, name: str) -> str:
    """Where an index's shard is: URLs and ``pipe:`` as listed, file names beside the index (or the index's URL)."""
    if is_remote(name):
        return name
    index_path = str(index_path)
    return f"{index_path.rsplit('/', 1)[0]}/{name}" if is_remote(index_path) else str(Path(index_path).parent / name)


def parse_index(data: bytes, where: str) -> ShardIndex:
    """An index.json's bytes as a ShardIndex; ShardFormatError naming ``where`` for anything else."""
    try:
        raw = json.loads(data)
    except ValueError as e:
        raise ShardFormatError(f"{where}: not a shard index.json (not JSON: {type(e).__name__})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("shards"), list):
        raise ShardFormatError(f"{where}: no 'shards' list (not a shard index.json)")
    if raw.get("format", FORMAT) != FORMAT:
        raise ShardFormatError(f"{where}: format {raw['format']!r}, this dulearn reads {FORMAT!r}")
    try:
        shards = [ShardEntry.from_dict(s) for s in raw["shards"]]
    except ShardFormatError as e:
        raise ShardFormatError(f"{where}: {e}") from None
    return ShardIndex(shards, raw.get("source", ""), raw.get("root", ""), raw.get("params", {}),
                      raw.get("skipped", []))


# ----------------------------------------------------------------------------- samples.json

_KEY = re.compile(r"v(\d+)_c\d+")


@dataclass
class ShardSamples:
    """The clips of one shard in order: columns of samples.json, and frame locations when scanned.

    ``video`` is the build's video index (-1: unknown, e.g. a bare tar: each clip its own video);
    ``offset``/``json_bytes`` locate the json member (-1/0: none); ``frame_data`` (only from a
    scan) holds (data offset, size) of each frame member, else they follow from the json.
    """

    video: list[int] = field(default_factory=list)
    offset: list[int] = field(default_factory=list)
    json_bytes: list[int] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    frame_data: list[list[tuple[int, int]]] | None = None

    def add(self, video: int, offset: int, json_bytes: int, frames: int) -> None:
        for name, value in zip(SAMPLE_COLUMNS, (video, offset, json_bytes, frames)):
            getattr(self, name).append(value)

    def columns(self) -> dict[str, list[int]]:
        return {name: getattr(self, name) for name in SAMPLE_COLUMNS}


def video_of_key(key: str) -> int:
    """The build's video index in a sample key ``v<video>_c<clip>`` (-1 for other keys)."""
    m = _KEY.fullmatch(key.rpartition("/")[2])
    return int(m.group(1)) if m else -1


def write_samples(path: str | Path, shards: Mapping[str, ShardSamples]) -> None:
    """Write samples.json atomically: per shard name, the columns of its clips."""
    atomic_write_json(Path(path), {"format": SAMPLES_FORMAT, "columns": list(SAMPLE_COLUMNS),
                                   "shards": {name: s.columns() for name, s in shards.items()}}, ".part")


def parse_samples(data: bytes, where: str) -> dict[str, ShardSamples]:
    """samples.json's bytes as {shard name: ShardSamples}; ShardFormatError naming ``where``."""
    try:
        raw = json.loads(data)
        if raw.get("format") != SAMPLES_FORMAT:
            raise ShardFormatError(f"{where}: format {raw.get('format')!r}, this dulearn reads {SAMPLES_FORMAT!r}")
        out = {name: ShardSamples(*(list(cols[c]) for c in SAMPLE_COLUMNS)) for name, cols in raw["shards"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ShardFormatError(f"{where}: not a samples.json ({type(e).__name__}: {e})") from None
    for name, s in out.items():
        if len({len(getattr(s, c)) for c in SAMPLE_COLUMNS}) != 1:
            raise ShardFormatError(f"{where}: shard {name}: columns of different lengths")
    return out


def scan_samples(url: str) -> ShardSamples:
    """Locate every clip of a tar shard from its headers (local: seeks only; remote: one full read).

    A truncated or corrupt tail ends the scan; the clips before it are kept.
    """
    out = ShardSamples(frame_data=[])
    stream = open(url, "rb") if not is_remote(url) else gopen(url, "rb")
    key = None
    try:
        with tarfile.open(fileobj=stream, mode="r:" if not is_remote(url) else "r|") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                k, ext = _split_member(m.name)
                if k != key:
                    key = k
                    out.add(video_of_key(k), -1, 0, 0)
                    out.frame_data.append([])
                if ext == JSON_EXT:
                    out.offset[-1], out.json_bytes[-1] = m.offset, m.size
                elif ext.endswith(FRAME_SUFFIX):
                    out.frame_data[-1].append((m.offset_data, m.size))
                    out.frames[-1] += 1
    except (tarfile.TarError, OSError, EOFError):
        pass  # a truncated shard: the clips scanned so far
    finally:
        _close_quietly(stream)
    return out
