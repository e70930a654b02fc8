"""Atomic, rotating training checkpoints with a `latest` pointer and corrupt-file fallback.

Layout of `<run_dir>/checkpoints/`: `step_00001000.pt` ... (the last k kept), `latest` (a
text file naming the newest one), `best.pt` (best evaluation score). Files are written to a
temporary name, fsynced and renamed, so a reader sees either the old or the new file.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from dulearn.fileio import atomic_write_bytes

logger = logging.getLogger(__name__)
REQUIRED_KEYS = ("model", "config", "step")
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / "checkpoints"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def step_files(run_dir: str | Path) -> list[Path]:
    """The step checkpoints of a run, oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (e.g. a full disk); the previous one is intact."""


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as step_<step>.pt, point `latest` at it, keep the newest `keep` step files.

    Older files are removed only after the new one and `latest` are on disk; a failed write
    raises CheckpointWriteError (one line) and leaves the previous checkpoint and `latest`.

    Not accelerate's save_state(total_limit=...): it rotates folders of several files, with no
    atomic single file and no `latest` pointer to fall back from.
    """
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step_{int(state['step']):08d}.pt"
    try:
        atomic_torch_save(state, path)
        atomic_write_bytes(d / "latest", (path.name + "\n").encode())
    except OSError as e:
        previous = [p.name for p in step_files(run_dir) if p != path][-1:]
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {e.strerror or e}; the previous checkpoint "
                                   f"({previous[0] if previous else 'none'}) is intact") from e
    for old in step_files(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    logger.info(f"saved {path}")
    return path


def save_best(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` atomically as best.pt (the best evaluation score so far)."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, d / "best.pt")
    return d / "best.pt"


def load_file(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint and check that it is complete; raise ValueError if it is not."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, I/O error: all mean unusable
        raise ValueError(f"checkpoint {path} is corrupt or partial: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise ValueError(f"checkpoint {path} is incomplete: needs keys {', '.join(REQUIRED_KEYS)}")
    return state


def _candidates(run_dir: str | Path) -> list[Path]:
    """Step files newest first, the one named by `latest` in front."""
    files = step_files(run_dir)[::-1]
    pointer = checkpoint_dir(run_dir) / "latest"
    if pointer.is_file():
        named = checkpoint_dir(run_dir) / pointer.read_text().strip()
        files = [named] + [p for p in files if p != named]
    return files


def load_latest(run_dir: str | Path) -> tuple[dict[str, Any], Path] | None:
    """The newest usable checkpoint of a run; corrupt ones are skipped with a warning."""
    for path in _candidates(run_dir):
        if not path.is_file():
            warnings.warn(f"checkpoint {path} named by `latest` is missing; trying the previous one")
            continue
        try:
            return load_file(path), path
        except ValueError as err:
            warnings.warn(f"{err}; falling back to the previous checkpoint")
    return None
