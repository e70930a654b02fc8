"""Shared fixtures: paths to the real data beside the checkout, skipped when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DULEARN_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
GOLDEN = SHARED / "golden"

# Two cores in CI: keep every test process from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (the real test data lives in ../shared beside the checkout)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: real DAVIS video and masks."""
    return _need(DATA)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """../shared/golden: reference figures of the original implementation."""
    return _need(GOLDEN)


@pytest.fixture(scope="session")
def davis_mini() -> Path:
    return _need(DATA / "davis-mini")


@pytest.fixture(scope="session")
def train_videos() -> Path:
    return _need(DATA / "train-videos")
