"""Durable file writes: temporary file, fsync, rename, fsync of the folder.

Checkpoints, metrics, shards and index files go through here so that a crash leaves either
the old file or the new one, never a partial one; a failed write (a full disk) removes its
temporary file and raises, and the old file is untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, tmp_suffix: str | None = None) -> None:
    """Write `data` to `path` through `.<name><tmp_suffix>` (default `.tmp.<pid>`), fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{tmp_suffix or f'.tmp.{os.getpid()}'}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, quota, I/O error, interrupt: the old file stays, the partial one goes
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, tmp_suffix: str | None = None) -> None:
    """Write `obj` as indented json with sorted keys and a final newline, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), tmp_suffix)
