"""The two views of a clip, made on the device from one `theta` per clip (docs/method.md, Views and alignment).

`theta` [B,2,3] follows `F.affine_grid` (align_corners=False): it maps normalised
coordinates of the transformed view to those of the main view. For a zoom-in crop of scale
s with normalised centre offset (dx, dy) and flip f in {+1,-1}:
`theta = [[f*s, 0, f*dx], [0, s, dy]]`. It is axis-aligned (no rotation), which `transform`
relies on.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=None)
def _imagenet_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std [3,1,1] on `device`, copied there once (a copy per step would sync)."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    return mean, std


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames [...,3,H,W] -> float32 with ImageNet mean/std, on the frames' device."""
    if frames.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 frames, got {frames.dtype}")
    mean, std = _imagenet_stats(frames.device)
    return (frames.float() / 255.0 - mean) / std


def sample_theta(
    batch: int,
    *,
    scale_min: float = 0.5,
    flip_prob: float = 0.5,
    generator: torch.Generator | None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per clip a random zoom-in crop (s ~ U[scale_min,1], inside the frame) and flip -> [B,2,3].

    Drawn on the generator's device (no host sync when it is the frames' device), returned on
    `device` (default: the generator's).
    """
    if not 0.0 < scale_min <= 1.0:
        raise ValueError(f"views.scale_min must be in (0, 1], got {scale_min}")
    draw_dev = generator.device if generator is not None else torch.device(device or "cpu")
    u = torch.rand(batch, 4, generator=generator, device=draw_dev)  # [B,4]
    s = scale_min + (1.0 - scale_min) * u[:, 0]  # [B]
    dx = (1.0 - s) * (2.0 * u[:, 1] - 1.0)
    dy = (1.0 - s) * (2.0 * u[:, 2] - 1.0)
    f = torch.where(u[:, 3] < flip_prob, -1.0, 1.0)
    zero = torch.zeros_like(s)
    theta = torch.stack([f * s, zero, f * dx, zero, s, dy], 1).view(batch, 2, 3)  # [B,2,3]
    return theta.to(device or draw_dev)


def source_coords(theta: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Main-view pixel coordinates (float64) of the transformed view's pixel centres: ([B,h], [B,w]).

    Written in pixel units around the centre so that scale +-1 without shift gives exact
    integers (flip and identity are then exact).
    """
    theta = theta.to(torch.float64)

    def axis(scale: torch.Tensor, shift: torch.Tensor, n: int) -> torch.Tensor:
        centred = torch.arange(n, device=theta.device, dtype=torch.float64) + 0.5 - n / 2  # [n]
        return scale[:, None] * centred + shift[:, None] * (n / 2) + (n - 1) / 2  # [B,n]

    return axis(theta[:, 1, 1], theta[:, 1, 2], h), axis(theta[:, 0, 0], theta[:, 0, 2], w)


def _lerp_axis(x: torch.Tensor, coords: torch.Tensor, dim: int) -> torch.Tensor:
    """Linear interpolation of x [B,C,H,W] along `dim` (-1 or -2) at coords [B,n], zeros outside."""
    size = x.shape[dim]
    lo = coords.floor()
    frac = coords - lo  # [B,n]
    out = None
    for idx, weight in ((lo, 1.0 - frac), (lo + 1, frac)):
        inside = (idx >= 0) & (idx <= size - 1)
        weight = (weight * inside).to(x.dtype)
        idx = idx.clamp(0, size - 1).long()
        shape = (x.shape[0], 1, 1, -1) if dim == -1 else (x.shape[0], 1, -1, 1)
        idx, weight = idx.view(shape), weight.view(shape)
        expand = list(x.shape)
        expand[dim] = idx.shape[dim]
        term = x.gather(dim, idx.expand(expand)) * weight
        out = term if out is None else out + term
    return out


def transform(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The transformed view of x [B,C,H,W] (bilinear, zero padding), same size.

    Equals `grid_sample(x, affine_grid(theta), bilinear, align_corners=False)` for the
    axis-aligned thetas of `sample_theta`, computed separably so that flips and scale 1 are
    exact.
    """
    v, u = source_coords(theta, x.shape[-2], x.shape[-1])  # [B,H], [B,W]
    return _lerp_axis(_lerp_axis(x, u, -1), v, -2)


def align(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Align a main-view map x [B,C,h,w] into the transformed view (nearest, zeros outside).

    Computed in at least float32 (a bf16 sampling grid would pick wrong cells).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    grid = F.affine_grid(theta.to(dtype), list(x.shape), align_corners=False)  # [B,h,w,2]
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
