"""The paper's loss: L_ST (pseudo labels across views and time) + lambda * L_CV (docs/method.md, Loss).

Anchors and cross-view samples are gathered from every rank with an autograd-aware
all-gather (its backward sums the gradients), and each rank scores only its own rows with
labels offset by its rank: with DDP's gradient averaging this equals one process holding
the global batch. Every rank must hold the same number of clips. Softmax and
cross-entropy run in float32 (float64 for float64 inputs), with autocast off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dulearn.distributed import gather_rows
from dulearn.views import align, source_coords


def _draw_offsets(
    batch: int, cell: tuple[int, int], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Per clip a random (oy, ox) in [0,cy) x [0,cx) -> [B,2] int64 on `device`."""
    draw_dev = generator.device if generator is not None else device
    oy = torch.randint(0, cell[0], (batch,), generator=generator, device=draw_dev)
    ox = torch.randint(0, cell[1], (batch,), generator=generator, device=draw_dev)
    return torch.stack([oy, ox], 1).to(device)  # [B,2]


def _grid_points(feat: torch.Tensor, offsets: torch.Tensor, n: int) -> torch.Tensor:
    """Features of feat [B,K,h,w] at the n x n points (i*cy+oy, j*cx+ox) -> [B,n*n,K] (row-major)."""
    b, k, h, w = feat.shape
    steps = torch.arange(n, device=feat.device)
    ys = steps * (h // n) + offsets[:, :1]  # [B,n]
    xs = steps * (w // n) + offsets[:, 1:]  # [B,n]
    index = (ys[:, :, None] * w + xs[:, None, :]).flatten(1)  # [B,n*n]
    return feat.flatten(2).gather(2, index[:, None, :].expand(b, k, -1)).transpose(1, 2)


def _check_inputs(
    k_main: torch.Tensor, k_reg: torch.Tensor, theta: torch.Tensor, grid: int, cv_grid: int
) -> None:
    """Raise a one-line ValueError naming the bad input."""
    if k_main.dim() != 5 or k_main.shape != k_reg.shape:
        shapes = f"k_main {tuple(k_main.shape)} and k_reg {tuple(k_reg.shape)}"
        raise ValueError(f"{shapes} must both be [B,T,K,h,w]")
    b, t, _, h, w = k_main.shape
    if t < 2:
        raise ValueError(f"k_main needs T >= 2 frames, got {t}")
    if theta.shape != (b, 2, 3):
        raise ValueError(f"theta must be [{b},2,3], got {tuple(theta.shape)}")
    if min(h, w) < max(grid, cv_grid):
        raise ValueError(f"feature grid {h}x{w} is smaller than grid={grid} / cv_grid={cv_grid}")


@torch.no_grad()
def _diagnostics(
    local: torch.Tensor, theta: torch.Tensor, offsets: torch.Tensor, grid: int
) -> dict[str, torch.Tensor]:
    """Detached per-rank statistics of the pseudo labels `local` [B,T,h,w] (own-clip anchor index).

    pseudo_entropy: entropy (nats) of each clip's label histogram, mean over clips;
    anchors_used: distinct anchors per clip, mean; pseudo_nearest_frac: fraction of labels
    equal to the anchor spatially nearest to the feature's position mapped through theta.
    """
    b, _, h, w = local.shape
    n2 = grid * grid
    ones = torch.ones(b, local[0].numel(), device=local.device)  # [B,T*h*w]
    counts = torch.zeros(b, n2, device=local.device).scatter_add_(1, local.flatten(1), ones)  # [B,N2]
    p = counts / counts.sum(1, keepdim=True)
    v, u = source_coords(theta, h, w)  # [B,h], [B,w] main-view feature cells
    iy = ((v - offsets[:, :1]) / (h // grid)).round().clamp(0, grid - 1).long()  # [B,h]
    ix = ((u - offsets[:, 1:]) / (w // grid)).round().clamp(0, grid - 1).long()  # [B,w]
    nearest = iy[:, :, None] * grid + ix[:, None, :]  # [B,h,w]
    return {
        "pseudo_entropy": -torch.special.xlogy(p, p).sum(1).mean(),
        "anchors_used": (counts > 0).sum(1).float().mean(),
        "pseudo_nearest_frac": (local == nearest[:, None]).float().mean(),
    }


def dense_loss(
    k_main: torch.Tensor,
    k_reg: torch.Tensor,
    theta: torch.Tensor,
    *,
    grid: int = 8,
    cv_grid: int = 4,
    tau: float = 0.05,
    cv_weight: float = 0.1,
    anchor_offsets: torch.Tensor | None = None,
    cv_offsets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """L_ST + cv_weight * L_CV of main keys k_main and transformed keys k_reg [B,T,K,h,w].

    Returns `loss`, `st`, `cv`, `pseudo` [B,T,h,w] (global anchor index), the offsets used
    (`anchor_offsets`, `cv_offsets` [B,2] as (oy, ox)) and detached diagnostics.
    """
    _check_inputs(k_main, k_reg, theta, grid, cv_grid)
    b, t, k, h, w = k_main.shape
    with torch.autocast(device_type=k_main.device.type, enabled=False):
        dtype = torch.promote_types(k_main.dtype, torch.float32)
        k_main, k_reg = k_main.to(dtype), k_reg.to(dtype)
        if anchor_offsets is None:
            anchor_offsets = _draw_offsets(b, (h // grid, w // grid), generator, k_main.device)
        if cv_offsets is None:
            cv_offsets = _draw_offsets(b, (h // cv_grid, w // cv_grid), generator, k_main.device)
        anchor_offsets, cv_offsets = anchor_offsets.to(k_main.device), cv_offsets.to(k_main.device)

        q = _grid_points(k_main[:, 0], anchor_offsets, grid)  # [B,N2,K]
        q_all, rank = gather_rows(q.flatten(0, 1))  # [R*B*N2,K]
        n2 = grid * grid
        with torch.no_grad():
            own = torch.einsum("btkp,bnk->btpn", k_reg.flatten(3), q)  # [B,T,hw,N2]
            local = own.argmax(-1).view(b, t, h, w)  # [B,T,h,w]
            first = (rank * b + torch.arange(b, device=local.device)) * n2  # [B]
            pseudo = local + first.view(b, 1, 1, 1)  # [B,T,h,w]

        aligned = align(k_main.flatten(0, 1), theta.repeat_interleave(t, 0)).view(b, t, k, h, w)
        feats = aligned[:, 1:].permute(0, 1, 3, 4, 2).reshape(-1, k)  # [B*(T-1)*h*w,K]
        st = F.cross_entropy(feats @ q_all.T / tau, pseudo[:, 1:].reshape(-1))

        m2 = cv_grid * cv_grid
        r = _grid_points(aligned[:, 0], cv_offsets, cv_grid).flatten(0, 1)  # [B*M2,K]
        r_hat_all, _ = gather_rows(_grid_points(k_reg[:, 0], cv_offsets, cv_grid).flatten(0, 1))  # [R*B*M2,K]
        cv_labels = torch.arange(b * m2, device=r.device) + rank * b * m2
        cv = F.cross_entropy(r @ r_hat_all.T / tau, cv_labels)

    return {
        "loss": st + cv_weight * cv,
        "st": st,
        "cv": cv,
        "pseudo": pseudo,
        "anchor_offsets": anchor_offsets,
        "cv_offsets": cv_offsets,
        **_diagnostics(local, theta, anchor_offsets, grid),
    }
