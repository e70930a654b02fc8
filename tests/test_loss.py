"""The loss of docs/method.md, Loss: golden figures of the original, diagnostics, bf16, any h x w."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dulearn.loss import dense_loss

SETTINGS = ("grid", "cv_grid", "tau", "cv_weight", "anchor_offsets", "cv_offsets")


def _golden_cases(golden_dir):
    files = sorted(golden_dir.glob("loss_case_*.pt"))
    assert files, f"no loss_case_*.pt in {golden_dir}"
    return files


def test_golden_cases(golden_dir):
    """Loss, L_ST, L_CV, pseudo labels and input gradients of the original (1e-6 relative, float64)."""
    for path in _golden_cases(golden_dir):
        case = torch.load(path, weights_only=True)
        k_main = case["k_main"].clone().requires_grad_()
        k_reg = case["k_reg"].clone().requires_grad_()
        out = dense_loss(k_main, k_reg, case["theta"], **{k: case[k] for k in SETTINGS})
        out["loss"].backward()
        for name in ("loss", "st", "cv"):
            torch.testing.assert_close(out[name], case[name], rtol=1e-6, atol=0, msg=f"{path.name}: {name}")
        assert torch.equal(out["pseudo"], case["pseudo"]), path.name
        for grad, name in ((k_main.grad, "grad_k_main"), (k_reg.grad, "grad_k_reg")):
            ref = case[name]
            atol = 1e-6 * ref.abs().max().item()
            torch.testing.assert_close(grad, ref, rtol=1e-6, atol=atol, msg=f"{path.name}: {name}")


def _position_keys(h: int, w: int, sigma: float = 1.0) -> torch.Tensor:
    """Unit keys [h*w,h,w] whose dot product decreases with spatial distance (Gaussian bumps)."""
    yy, xx = torch.meshgrid(torch.arange(h).double(), torch.arange(w).double(), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1)  # [hw,2]
    bumps = torch.exp(-torch.cdist(pos, pos) ** 2 / (2 * sigma**2))  # [hw(channel), hw(position)]
    return F.normalize(bumps.view(h * w, h, w), dim=0)


@pytest.mark.parametrize("flip", [1.0, -1.0])
def test_diagnostics_on_spatial_keys(flip):
    """Keys encoding position: every label is the spatially nearest anchor, 64 anchors, uniform use.

    24x24 grid, N=8: cells of 3, so every position has one nearest anchor and 9 positions per anchor.
    The transformed view is the (flipped) main view, so the diagnostic must map through theta.
    """
    h = w = 24
    keys = _position_keys(h, w)  # [K,h,w]
    k_main = keys.expand(2, 3, -1, -1, -1).clone()  # [B=2,T=3,K,h,w]
    k_reg = torch.flip(k_main, [-1]) if flip < 0 else k_main.clone()
    theta = torch.tensor([[flip, 0.0, 0.0], [0.0, 1.0, 0.0]]).double().expand(2, -1, -1)
    offsets = torch.tensor([[1, 1], [1, 1]])
    out = dense_loss(k_main, k_reg, theta, anchor_offsets=offsets, cv_offsets=torch.tensor([[0, 5], [3, 1]]))
    assert out["pseudo_nearest_frac"].item() == 1.0
    assert out["anchors_used"].item() == 64
    assert out["pseudo_entropy"].item() == pytest.approx(math.log(64), rel=1e-6)
    assert not out["pseudo_entropy"].requires_grad


def test_diagnostics_of_a_collapsed_clip():
    """Identical transformed features everywhere: a single anchor, zero entropy."""
    g = torch.Generator().manual_seed(0)
    k_main = F.normalize(torch.randn(2, 3, 8, 16, 16, generator=g), dim=2)
    k_reg = F.normalize(torch.randn(2, 1, 8, 1, 1, generator=g), dim=2).expand(-1, 3, -1, 16, 16)
    out = dense_loss(k_main, k_reg, torch.eye(2, 3).expand(2, -1, -1), generator=g)
    assert out["anchors_used"].item() == 1
    assert out["pseudo_entropy"].item() == 0
    for b in range(2):
        assert out["pseudo"][b].unique().numel() == 1


@pytest.mark.parametrize("size", [(8, 8), (13, 19), (31, 9)])
def test_anchor_placement_for_any_size(size):
    """h, w >= N, not multiples: anchor (i,j) of clip b sits at (i*(h//N)+oy, j*(w//N)+ox).

    With k_reg = k_main (identity theta) an anchor's own position is labelled with that anchor.
    """
    h, w = size
    g = torch.Generator().manual_seed(5)
    k_main = F.normalize(torch.randn(3, 2, 16, h, w, generator=g, dtype=torch.float64), dim=2).requires_grad_()
    theta = torch.eye(2, 3, dtype=torch.float64).expand(3, -1, -1)
    offsets = torch.tensor([[0, 0], [h // 8 - 1, w // 8 - 1], [(h // 8) // 2, (w // 8) // 2]])
    out = dense_loss(k_main, k_main.detach().clone(), theta, anchor_offsets=offsets)
    out["loss"].backward()
    assert torch.isfinite(k_main.grad).all()
    for b in range(3):
        for i in range(8):
            for j in range(8):
                y, x = i * (h // 8) + offsets[b, 0], j * (w // 8) + offsets[b, 1]
                assert out["pseudo"][b, 0, y, x] == b * 64 + i * 8 + j


def test_offsets_follow_generator():
    g = torch.Generator().manual_seed(7)
    k = F.normalize(torch.randn(16, 2, 4, 20, 27, generator=g), dim=2)
    theta = torch.eye(2, 3).expand(16, -1, -1)
    a = dense_loss(k, k, theta, generator=torch.Generator().manual_seed(1))
    b = dense_loss(k, k, theta, generator=torch.Generator().manual_seed(1))
    for name in ("anchor_offsets", "cv_offsets"):
        assert torch.equal(a[name], b[name]), name
    assert torch.equal(a["loss"], b["loss"])
    for name, cell in (("anchor_offsets", (20 // 8, 27 // 8)), ("cv_offsets", (20 // 4, 27 // 4))):
        off = a[name]
        assert off.min() >= 0 and (off < torch.tensor(cell)).all(), name
        assert off[:, 0].unique().numel() > 1 and off[:, 1].unique().numel() > 1, name


def test_bf16_inputs_are_scored_in_float32(golden_dir):
    """bf16 keys (also under autocast) give the float32 loss of the same values, close to the float64 one."""
    case = torch.load(_golden_cases(golden_dir)[0], weights_only=True)
    kwargs = {k: case[k] for k in SETTINGS}
    k_main, k_reg = case["k_main"].bfloat16(), case["k_reg"].bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dense_loss(k_main, k_reg, case["theta"].float(), **kwargs)
    ref32 = dense_loss(k_main.float(), k_reg.float(), case["theta"].float(), **kwargs)
    for name in ("loss", "st", "cv"):
        assert out[name].dtype == torch.float32, name
        torch.testing.assert_close(out[name], ref32[name], rtol=1e-6, atol=0)
    torch.testing.assert_close(out["loss"].double(), case["loss"], rtol=2e-2, atol=0)


def test_bad_inputs_raise_clear_errors():
    k = torch.randn(2, 3, 4, 16, 16)
    theta = torch.eye(2, 3).expand(2, -1, -1)
    with pytest.raises(ValueError, match="k_reg"):
        dense_loss(k, k[:, :2], theta)
    with pytest.raises(ValueError, match="theta"):
        dense_loss(k, k, theta[:1])
    with pytest.raises(ValueError, match="grid"):
        dense_loss(k[..., :6, :], k[..., :6, :], theta)
