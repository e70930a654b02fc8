"""The real training loop in-process on tiny synthetic shards, with a callback at every step boundary.

`run_probed` replaces the loop's stream with one that calls `on_step(k)` after batch k is
fetched, i.e. before step k's forward; the data loading itself runs with `on_step(0)`. The
work between two calls is exactly one step's (forward to checkpoint), so a test can watch
what each step does to the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from accelerate.state import AcceleratorState

from dulearn import train as train_module
from dulearn.config import Config, load_config


def tiny_shards(out: Path) -> Path:
    """Two synthetic videos of 12 frames at 40x40 as shards of 4-7 frame clips; index.json."""
    from shards import build

    if build.main(["synthetic", "seed=0,videos=2,frames=12,size=40x40", "--out", str(out), "--clip-len", "4",
                   "--min-clip-len", "4", "--workers", "1"]) != 0:
        raise RuntimeError("tiny shard build failed")
    return out / "index.json"


def tiny_config(index: Path, **overrides: Any) -> Config:
    """32x32 crops (a 4x4 feature grid), 3-frame clips, 1 clip per step, fp32, no workers, no bar."""
    base = {"data.train": f"[{index}]", "data.short_side": "[32,40]", "data.crop": 32, "data.clip_len": 3,
            "data.frame_gap": 1, "data.num_workers": 0, "data.steps_per_epoch": 4,
            "loss.grid": 4, "loss.cv_grid": 2, "train.batch_size": 1, "train.mixed_precision": "no",
            "log.progress": "false", "log.wandb": "false"}
    return load_config(None, [f"{k}={v}" for k, v in {**base, **overrides}.items()])


def run_probed(cfg: Config, run_dir: Path, monkeypatch: pytest.MonkeyPatch,
               on_step: Callable[[int], None]) -> dict[str, Any]:
    """train(cfg, run_dir) with `on_step` called at each step boundary (see the module docstring)."""
    build = train_module._build_loader

    def probed(*args: Any, **kwargs: Any) -> Iterator[dict]:
        stream = iter(build(*args, **kwargs))
        step = 0
        while True:
            on_step(0)
            batch = next(stream)
            step += 1
            on_step(step)
            yield batch

    monkeypatch.setattr(train_module, "_build_loader", probed)
    with fresh_accelerator():
        try:
            return train_module.train(cfg, run_dir, resume="none")
        finally:
            on_step(0)


@contextmanager
def fresh_accelerator() -> Iterator[None]:
    """The body with a fresh accelerate state, none left behind.

    accelerate keeps one state per process and refuses another precision or device (the
    private reset is what accelerate's own tests call).
    """
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
