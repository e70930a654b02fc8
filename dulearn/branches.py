"""One training step's forward: the two branches of the paper and the loss (docs/method.md, Views and alignment, Loss).

The main branch runs with grad on the T main frames plus the transformed reference frame
(one pass, B*(T+1) images); the regularising branch runs on the other T-1 transformed
frames under `torch.no_grad()` (BatchNorm stays in train mode). Nothing here syncs with
the host, so the training loop can queue steps back to back.
"""

from __future__ import annotations

import torch
from torch import nn

from dulearn.loss import dense_loss
from dulearn.views import normalize, sample_theta, transform


def _keys(model: nn.Module, images: torch.Tensor, clips: int) -> torch.Tensor:
    """`key` maps of images [B*n,3,H,W] -> [B,n,K,h,w]."""
    return model(images, layers=("key",))["key"].unflatten(0, (clips, -1))


def forward_branches(
    model: nn.Module, frames: torch.Tensor, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 clips [B,T,3,H,W] and theta [B,2,3] -> (k_main, k_reg), each [B,T,K,h,w].

    k_reg[:, 0] (transformed reference) carries grad, k_reg[:, 1:] does not.
    """
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise ValueError(f"frames must be uint8 [B,T,3,H,W], got {tuple(frames.shape)}")
    b, t = frames.shape[:2]
    x = normalize(frames)  # [B,T,3,H,W]
    x_hat = transform(x.flatten(0, 1), theta.repeat_interleave(t, 0)).unflatten(0, (b, t))  # [B,T,3,H,W]
    main = _keys(model, torch.cat([x, x_hat[:, :1]], 1).flatten(0, 1), b)  # [B,T+1,K,h,w]
    with torch.no_grad():
        rest = _keys(model, x_hat[:, 1:].flatten(0, 1), b)  # [B,T-1,K,h,w]
    return main[:, :t], torch.cat([main[:, t:], rest], 1)


def training_loss(
    model: nn.Module,
    frames: torch.Tensor,
    *,
    generator: torch.Generator | None,
    scale_min: float = 0.5,
    grid: int = 8,
    cv_grid: int = 4,
    tau: float = 0.05,
    cv_weight: float = 0.1,
) -> dict[str, torch.Tensor]:
    """Sample theta, run both branches on uint8 clips [B,T,3,H,W], return dense_loss's dict + `theta`.

    All randomness (theta, anchor and cross-view offsets) comes from `generator`; one on the
    frames' device avoids host-device copies.
    """
    theta = sample_theta(frames.shape[0], scale_min=scale_min, generator=generator, device=frames.device)
    k_main, k_reg = forward_branches(model, frames, theta)
    out = dense_loss(
        k_main, k_reg, theta, grid=grid, cv_grid=cv_grid, tau=tau, cv_weight=cv_weight, generator=generator
    )
    out["theta"] = theta
    return out
