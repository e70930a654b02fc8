"""What a training run shows: metrics.jsonl, a progress bar, wandb scalars and images.

Only the main process writes. `metrics.jsonl` holds one JSON object per logging step; on
resume the lines after the resumed step are dropped, so no step appears twice.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from tqdm import tqdm

from dulearn.fileio import atomic_write_bytes
from dulearn.config import Config

logger = logging.getLogger(__name__)


def new_wandb_id() -> str:
    """A fresh wandb run id (kept in checkpoints so resumes continue the same run)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _has_wandb_key() -> bool:
    """True if wandb can authenticate (API key in the environment or ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_init_kwargs(cfg: Config, run_dir: Path, run_id: str) -> dict[str, Any]:
    """wandb.init arguments: same id across resumes, offline without a key unless WANDB_MODE says."""
    kwargs: dict[str, Any] = {"id": run_id, "resume": "allow", "dir": str(run_dir),
                              "name": cfg.log.run_name or run_dir.name}
    if cfg.log.entity:
        kwargs["entity"] = cfg.log.entity
    if "WANDB_MODE" not in os.environ and not _has_wandb_key():
        kwargs["mode"] = "offline"
        logger.info(f"wandb: no API key, logging offline under {run_dir / 'wandb'} (upload later with `wandb sync`)")
    return kwargs


def _step_of(line: str) -> int | None:
    """The step of a metrics line, None for a torn line (a crash mid-write)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop the lines of metrics.jsonl logged after `last_step` (a resumed run repeats them) and torn ones."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if (step := _step_of(line)) is not None
            and step <= last_step]
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


class Monitor:
    """metrics.jsonl + tqdm bar + wandb (through accelerate's tracker) for the main process."""

    def __init__(self, accelerator: Any, cfg: Config, run_dir: Path, start_step: int, wandb_id: str | None):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = run_dir / "metrics.jsonl"
        self.wandb = cfg.log.wandb
        if self.main:
            truncate_metrics(self.path, start_step)
        if self.wandb:
            accelerator.init_trackers(cfg.log.project, config=cfg.to_dict(),
                                      init_kwargs={"wandb": wandb_init_kwargs(cfg, run_dir, wandb_id)})
        self.total = cfg.schedule.total_steps
        self.bar = tqdm(total=self.total, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not (self.main and cfg.log.progress))
        self.loss = math.nan  # of the last metrics line: the loop reads losses only at logging steps

    def step(self, clips_per_s: float) -> None:
        """Advance the progress bar by one step (ETA comes from tqdm's rate)."""
        self.bar.set_postfix(loss=f"{self.loss:.4f}", clips_s=f"{clips_per_s:.1f}", refresh=False)
        self.bar.update(1)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one metrics line, send the scalars to wandb, and log a line where there is no bar."""
        if not self.main:
            return
        line = {"step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        self.loss = metrics.get("loss", self.loss)
        if self.bar.disable:
            logger.info(f"step {step}/{self.total}: loss {self.loss:.4f}, lr {metrics['lr']:.3g}, "
                        f"{metrics['clips_per_s']:.2f} clips/s, data wait {metrics['data_wait_frac']:.1%}")
        if self.wandb:
            scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.accelerator.log(scalars, step=step)

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """Send uint8 [H,W,3] images to wandb."""
        if self.main and self.wandb:
            self.accelerator.get_tracker("wandb").log_images({k: [v] for k, v in images.items()}, step=step)

    def close(self) -> None:
        """Close the bar and finish the wandb run (flushes offline files)."""
        self.bar.close()
        if self.wandb:
            self.accelerator.end_training()


def _colours(n: int) -> torch.Tensor:
    """n distinct RGB colours in [0, 1], one per anchor of a clip."""
    return torch.tensor(colormaps["hsv"](np.linspace(0, 1, n, endpoint=False))[:, :3], dtype=torch.float32)


def _paint(frame: torch.Tensor, labels: torch.Tensor, colours: torch.Tensor, alpha: float = 0.5) -> np.ndarray:
    """Blend a label map [h,w] (nearest-upsampled) over a uint8 frame [3,H,W] -> uint8 [H,W,3]."""
    size = frame.shape[-2:]
    up = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()  # [H,W]
    rgb = colours[up].permute(2, 0, 1)  # [3,H,W]
    out = (1 - alpha) * frame.float() / 255 + alpha * rgb
    return (out.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()


def anchor_points(h: int, w: int, grid: int, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of one clip's grid x grid anchors (docs/method.md, Loss, step 1)."""
    cy, cx = h // grid, w // grid
    ys = torch.arange(grid) * cy + int(offset[0])  # [N]
    xs = torch.arange(grid) * cx + int(offset[1])  # [N]
    return ys, xs


@torch.no_grad()
def visualise(model: torch.nn.Module, frames: torch.Tensor, out: dict[str, Any], grid: int,
              frame: int = 1) -> dict[str, np.ndarray]:
    """Images of clip 0: reference frame with its anchor grid, pseudo labels and predicted assignment.

    frames: uint8 [B,T,3,H,W]; out: training_loss's dict (pseudo, anchor_offsets, theta). The
    prediction is the eval-mode assignment of frame `frame` (main view) to the reference anchors.
    """
    from dulearn.views import normalize, transform

    clip = frames[0]  # [T,3,H,W]
    was_training = model.training
    model.eval()
    keys = model(normalize(clip), layers=("key",))["key"].float()  # [T,K,h,w]
    model.train(was_training)
    h, w = keys.shape[-2:]
    ys, xs = anchor_points(h, w, grid, out["anchor_offsets"][0].cpu())
    q = keys[0][:, ys][:, :, xs].flatten(1)  # [K,N*N]
    assign = torch.einsum("khw,kn->nhw", keys[frame], q).argmax(0).cpu()  # [h,w]
    colours = _colours(grid * grid)
    clip_cpu = clip.cpu()
    ref = clip_cpu[0].permute(1, 2, 0).numpy().copy()  # [H,W,3]
    stride_y, stride_x = clip.shape[-2] / h, clip.shape[-1] / w
    for n, (y, x) in enumerate((int(y), int(x)) for y in ys for x in xs):
        py, px = int((y + 0.5) * stride_y), int((x + 0.5) * stride_x)
        ref[max(py - 2, 0):py + 3, max(px - 2, 0):px + 3] = (colours[n] * 255).byte().numpy()
    theta = out["theta"][:1].float()  # [1,2,3]
    warped = transform(clip[frame:frame + 1].float(), theta.to(clip.device))[0].round().clamp(0, 255).cpu()  # [3,H,W]
    pseudo = out["pseudo"][0, frame].cpu() % (grid * grid)  # [h,w] local anchor index
    return {
        "images/anchors": ref,
        "images/pseudo_labels": _paint(warped, pseudo, colours),
        "images/assignment": _paint(clip_cpu[frame], assign, colours),
    }
