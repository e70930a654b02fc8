"""The original release's optimiser and LR schedule, and an update that a non-finite loss skips on the device.

The optimisers use torch's fused kernels (on CPU and CUDA since torch 2.4). A fused step
reads a `found_inf` tensor on the device and leaves the parameters (and Adam its step
count) untouched where it is 1, so the loop never has to wait for the loss to decide.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from dulearn.config import OptimConfig, ScheduleConfig


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """The original's groups: weight decay on weights (BN weights too), none on biases at 2x lr."""
    weights = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".bias")]
    biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")]
    return [
        {"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": biases, "lr": cfg.lr * cfg.bias_lr_mult, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, fused: bool = True) -> torch.optim.Optimizer:
    """Adam with betas (0.5, 0.999) or SGD with momentum 0.9 (the original's settings), fused by default.

    SGD's momentum buffers start at zero: the first update is the same (0 * m + g = g), and a
    skipped first step leaves them defined (fused SGD would leave them uninitialised).
    """
    groups = param_groups(model, cfg)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused)
    if cfg.momentum:
        for p in (p for g in optimizer.param_groups for p in g["params"]):
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return optimizer


def lr_factor(cfg: ScheduleConfig) -> Callable[[int], float]:
    """Step schedule (x lr_gamma every lr_step steps) times a linear warm-up."""
    def factor(step: int) -> float:
        """LR multiplier of a step."""
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
        decay = cfg.lr_gamma ** (step // cfg.lr_step) if cfg.lr_step > 0 else 1.0
        return warm * decay
    return factor


def load_optimizer_state(optimizer: Any, state: dict[str, Any]) -> None:
    """Load a saved optimiser state but keep this optimiser's kernel choice (fused/foreach).

    torch takes a group's options from the file, so a checkpoint of a non-fused optimiser
    would otherwise switch the fused kernels (and with them the skipping) off.
    """
    groups = [{**saved, "fused": now.get("fused"), "foreach": now.get("foreach")}
              for saved, now in zip(state["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**state, "param_groups": groups})


def backward_loss(loss: torch.Tensor, bad: torch.Tensor, scaled: bool) -> torch.Tensor:
    """The loss to back-propagate: under a GradScaler (fp16), NaN times it where `bad`, else the loss.

    The GradScaler decides the skip from the gradients; the NaN makes them all non-finite
    exactly when the loss was (x * 1 is exact, so a finite step is unchanged).
    """
    if not scaled:
        return loss
    return loss * torch.where(bad > 0, math.nan, 1.0)


def step_unless(optimizer: Any, bad: torch.Tensor) -> None:
    """optimizer.step() (an accelerate AcceleratedOptimizer or a torch one), skipped where `bad` is 1.

    `bad`: float32 [] 0/1 on the parameters' device, equal on every rank. Fused kernels skip
    on the device; under a GradScaler the scaler sets `found_inf` itself (see backward_loss)
    and its scale backs off as for any overflow. An optimiser without fused kernels reads
    `bad` on the host (a device sync every step).
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    if not all(group.get("fused") for group in inner.param_groups):
        if not bad.item():
            optimizer.step()
        return
    if getattr(optimizer, "scaler", None) is None:
        inner.found_inf = bad
    try:
        optimizer.step()
    finally:
        inner.__dict__.pop("found_inf", None)
