"""Byte-range reads of shards and their index files: local paths, http(s):// and s3:// URLs.

The training stream reads only the members it decodes (a clip's json, then its chosen
frames), so every backend reads byte ranges: ``os.pread`` on local files, a ``Range``
request over http(s), ``GetObject`` with ``Range`` on S3 (boto3; the endpoint and the
credentials come from boto3's usual environment: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, or a profile). Nearby ranges are read as one (``read_ranges``),
since a request costs far more than a few KiB on any remote store. Transient errors are
retried with backoff; then a one-line StorageError names the URL and the cause.
urllib and boto3 rather than fsspec: two small backends, no buffered readahead that would
read past the range (which is what the read amplification target forbids).
"""

from __future__ import annotations

import os
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

__all__ = ["StorageError", "ReadStats", "read_ranges", "read_all", "exists", "merge_gap", "is_local", "RETRIES"]

RETRIES = 4  # attempts of a remote read before it is an error
TIMEOUT_S = 10  # per request: RETRIES attempts of a hung server end well within a minute
BACKOFF_S = 0.5  # first wait between attempts; doubles after each
LOCAL_GAP = 1024  # merge local ranges closer than this (a tar header between two frames)
REMOTE_GAP = 16 * 1024  # merge remote ranges closer than this (a request costs more than 16 KiB)
_OPEN_FILES = 64  # local file descriptors kept open per process

T = TypeVar("T")


class StorageError(OSError):
    """A read that failed for good (after retries); the message is one line naming the URL.

    ``missing``: the object does not exist (404, no such file or key).
    """

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


@dataclass
class ReadStats:
    """What one process has read: bytes and requests (the stream reports them per batch)."""

    bytes: int = 0
    requests: int = 0


STATS = ReadStats()
_lock = threading.RLock()  # the stream reads a batch's clips from several threads
_files: OrderedDict[str, int] = OrderedDict()
_s3 = {"pid": None, "client": None}


def _scheme(url: str) -> str:
    if url.startswith("pipe:"):
        return "pipe"
    return url.split("://", 1)[0] if "://" in url else "file"


def merge_gap(url: str) -> int:
    return LOCAL_GAP if _scheme(url) == "file" else REMOTE_GAP


def is_local(url: str) -> bool:
    return _scheme(url) == "file"


# ----------------------------------------------------------------------------- backends


def _fd(path: str) -> int:
    """A cached read-only descriptor of a local file (least recently used ones are closed)."""
    with _lock:
        if path in _files:
            _files.move_to_end(path)
            return _files[path]
        fd = os.open(path, os.O_RDONLY)
        _files[path] = fd
        if len(_files) > _OPEN_FILES:
            os.close(_files.popitem(last=False)[1])
        return fd


def _read_local(path: str, start: int, size: int) -> bytes:
    with _lock:  # no other thread may evict (close) the descriptor mid-read; local reads are short
        return os.pread(_fd(path), size, start)


def _read_http(url: str, start: int, size: int) -> bytes:
    """``size`` bytes at ``start``; a server that ignores Range (200) is read up to the range's end."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-{start + size - 1}"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        if response.status == 206:
            return response.read(size)
        skipped = 0  # no range support: read up to the start, in chunks, counted as read
        while skipped < start and (chunk := response.read(min(1 << 20, start - skipped))):
            skipped += len(chunk)
        with _lock:
            STATS.bytes += skipped
        return response.read(size)


def _s3_client():
    """One boto3 S3 client per process (clients are not fork-safe)."""
    if _s3["pid"] != os.getpid():
        try:
            import boto3
        except ImportError:
            raise StorageError("s3:// shards need boto3: pip install 'dulearn[s3]'") from None
        from botocore.config import Config

        # our own retries (_with_retries) and short timeouts: a dead endpoint is an error within a minute
        config = Config(connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S, retries={"max_attempts": 1},
                        max_pool_connections=32)
        _s3.update(pid=os.getpid(), client=boto3.client("s3", config=config))
    return _s3["client"]


def _bucket_key(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    return bucket, key


def _read_s3(url: str, start: int, size: int) -> bytes:
    bucket, key = _bucket_key(url)
    body = _s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + size - 1}")["Body"]
    return body.read()


def _read_whole(url: str) -> bytes:
    scheme = _scheme(url)
    if scheme == "file":
        with open(url, "rb") as f:
            return f.read()
    if scheme == "s3":
        bucket, key = _bucket_key(url)
        return _s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        return response.read()


_BACKENDS: dict[str, Callable[[str, int, int], bytes]] = {"file": _read_local, "http": _read_http,
                                                          "https": _read_http, "s3": _read_s3}


def _s3_code(error: Exception) -> str | None:
    response = getattr(error, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def _missing(error: Exception) -> bool:
    """Whether an error says the object does not exist (not worth retrying)."""
    if isinstance(error, FileNotFoundError) or (isinstance(error, urllib.error.HTTPError) and error.code == 404):
        return True
    return _s3_code(error) in ("NoSuchKey", "404", "NoSuchBucket")


def _past_end(error: Exception) -> bool:
    """Whether a range read started past the end of the object (a truncated shard: no bytes)."""
    return (isinstance(error, urllib.error.HTTPError) and error.code == 416) or _s3_code(error) == "InvalidRange"


def _transient(error: Exception) -> bool:
    """Errors a later attempt may not meet: network trouble, timeouts, 5xx, throttling."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500 or error.code == 429
    if isinstance(error, (urllib.error.URLError, ConnectionError, TimeoutError)):
        return True
    name = type(error).__name__
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ResponseStreamingError",
                "IncompleteReadError", "ConnectionClosedError"):
        return True
    response = getattr(error, "response", None)
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) if isinstance(response, dict) else 0
    return status >= 500 or _s3_code(error) in ("SlowDown", "Throttling", "RequestTimeout")


def _with_retries(url: str, read: Callable[[], T]) -> T:
    """``read()`` with up to RETRIES attempts on transient errors; StorageError naming ``url`` after."""
    remote = _scheme(url) != "file"
    for attempt in range(RETRIES if remote else 1):
        try:
            return read()
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 (classified below; the message names the cause)
            last = e
            if _past_end(e):
                return b""
            if _missing(e) or not _transient(e) or attempt == RETRIES - 1:
                break
            time.sleep(BACKOFF_S * 2 ** attempt)
    cause = str(last).splitlines()[0] if str(last) else ""
    tries = f" after {attempt + 1} attempts" if remote and attempt else ""
    raise StorageError(f"cannot read {url}{tries}: {type(last).__name__}: {cause}".rstrip(": "),
                       missing=_missing(last)) from None


# ----------------------------------------------------------------------------- API


def _merged(ranges: Sequence[tuple[int, int]], gap: int) -> list[tuple[int, int, list[int]]]:
    """Sorted ranges joined where less than ``gap`` bytes lie between: (start, end, indices of the members)."""
    out: list[tuple[int, int, list[int]]] = []
    for i in sorted(range(len(ranges)), key=lambda i: ranges[i][0]):
        start, size = ranges[i]
        if out and start - out[-1][1] <= gap:
            out[-1] = (out[-1][0], max(out[-1][1], start + size), out[-1][2] + [i])
        else:
            out.append((start, start + size, [i]))
    return out


def read_ranges(url: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """The bytes of each (offset, size) of ``url``, nearby ranges read in one request.

    A range past the end of the object comes back short (a truncated shard), never raises.
    """
    backend = _BACKENDS.get(_scheme(url))
    if backend is None:
        raise StorageError(f"cannot read {url}: only local paths, http(s):// and s3:// can be read by range")
    out: list[bytes] = [b""] * len(ranges)
    for start, end, members in _merged(ranges, merge_gap(url)):
        data = _with_retries(url, lambda: backend(url, start, end - start))
        with _lock:
            STATS.bytes += len(data)
            STATS.requests += 1
        for i in members:
            offset, size = ranges[i]
            out[i] = data[offset - start: offset - start + size]
    return out


def read_all(url: str) -> bytes:
    """A whole (small) object, e.g. an index.json or samples.json."""
    if _scheme(url) not in _BACKENDS:
        raise StorageError(f"cannot read {url}: only local paths, http(s):// and s3:// are supported")
    data = _with_retries(url, lambda: _read_whole(url))
    with _lock:
        STATS.bytes += len(data)
        STATS.requests += 1
    return data


def exists(url: str) -> bool:
    """Whether ``url`` can be read (a missing object is False; other failures raise StorageError)."""
    if _scheme(url) == "file":
        return os.path.exists(url)
    try:
        _with_retries(url, lambda: _BACKENDS[_scheme(url)](url, 0, 1))
        return True
    except StorageError as e:
        if e.missing:
            return False
        raise
