"""Shared fixtures: synthetic inputs built once per session, and the real data in ../shared.

Tests of video, shards, training and evaluation mechanics run on data rendered with
dulearn.synthetic (tests/synthetic_data.py), so a fresh clone runs them. Only tests against
reference figures or real DAVIS masks read ../shared (DULEARN_SHARED overrides the place):
without it they skip with the reason, except under CI (CI set, not 0/false), where a
missing ../shared fails them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import pytest
import torch

import synthetic_data
from dulearn import synthetic
from runs import _env

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DULEARN_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
GOLDEN = SHARED / "golden"

# Two cores in CI: keep every test process from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the body at `n` intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test, like each training process (cores are shared).

    Rendering and in-process training are many small ops: a second thread gains them little,
    and waiting for it costs several times that on a busy machine.
    """
    with threads(1):
        yield


def in_ci() -> bool:
    """True when the environment variable CI is set to anything but empty, 0 or false."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def unavailable(reason: str) -> NoReturn:
    """Skip the test with the reason; under CI fail instead (CI provides everything a test needs)."""
    if in_ci():
        pytest.fail(f"{reason}; CI={os.environ['CI']} requires it", pytrace=False)
    pytest.skip(reason)


def _need(path: Path) -> Path:
    """`path`, or skip (fail under CI) with the reason when it is absent."""
    if not path.exists():
        unavailable(f"{path} is absent (the real test data lives in ../shared beside the checkout, "
                    "or where DULEARN_SHARED points)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: real DAVIS video and masks, and the official evaluator's figures."""
    return _need(DATA)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """../shared/golden: reference figures of the original implementation."""
    return _need(GOLDEN)


def _written(tmp_path_factory: pytest.TempPathFactory, name: str, write) -> Path:
    """A fresh folder filled by `write(folder)` on one thread."""
    root = tmp_path_factory.mktemp(name)
    with threads(1):
        write(root)
    return root


@pytest.fixture(scope="session")
def frame_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tree of 5 frame folders (50, 40, 60, 50, 49 JPEG frames at 108x192)."""
    return _written(tmp_path_factory, "frame-folders", synthetic_data.write_frame_folders)


@pytest.fixture(scope="session")
def video_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 12 H.264 mp4 videos (25 to 91 frames at 96x160, 24 fps)."""
    return _written(tmp_path_factory, "videos", synthetic_data.write_mp4_folder)


@pytest.fixture(scope="session")
def large_video() -> synthetic.Video:
    """One 30-frame video at 360x640: larger than the builder's default short side (320)."""
    with threads(1):
        return synthetic.make_video(4, 0, frames=30, size=synthetic_data.LARGE_SIZE)


@pytest.fixture(scope="session")
def davis_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DAVIS-2017 layout: 3 single-object sequences of 24 frames at 144x256, exact masks."""
    root = tmp_path_factory.mktemp("davis")
    with threads(1):
        synthetic.write_davis(root, sequences=3, frames=24, size=(144, 256), seed=3, objects=(1, 1))
    return root


@pytest.fixture(scope="session")
def shard_index(video_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small shards (72 px short side) of the 12 synthetic videos, built once per session."""
    out = tmp_path_factory.mktemp("train-shards")
    cmd = [sys.executable, "shards/build.py", "videos", str(video_folder), "--out", str(out),
           "--short-side", "72", "--clip-len", "16", "--shard-clips", "12", "--workers", "2"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=_env())
    return out / "index.json"
