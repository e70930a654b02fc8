"""Views: theta convention of docs/method.md (Views and alignment), exact flips/identity, alignment commutes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dulearn.views import align, normalize, sample_theta, transform


def _theta(s: float, dx: float, dy: float, f: float) -> torch.Tensor:
    return torch.tensor([[[f * s, 0.0, f * dx], [0.0, s, dy]]])  # [1,2,3]


@pytest.mark.parametrize("size", [(16, 16), (17, 33), (64, 100)])
def test_flip_and_identity_are_exact(size):
    x = torch.rand(1, 3, *size)
    for fn in (transform, align):
        assert torch.equal(fn(x, _theta(1, 0, 0, -1)), torch.flip(x, [-1]))
        assert torch.equal(fn(x, _theta(1, 0, 0, 1)), x)


def test_transform_matches_grid_sample():
    """Same sampling positions as grid_sample(affine_grid(theta)) for random thetas."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 40, 56, generator=g, dtype=torch.float64)
    theta = sample_theta(6, scale_min=0.3, generator=g).double()
    ref = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    torch.testing.assert_close(transform(x, theta), ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("flip", [1.0, -1.0])
def test_theta_is_a_zoom_in_crop(flip):
    """theta = [[f*s,0,f*dx],[0,s,dy]], s=0.5, dx=-0.25, dy=0.25: the 32x32 crop centred at
    normalised (f*dx, dy), upsampled 2x, flipped when f=-1."""
    x = torch.rand(1, 3, 64, 64)
    out = transform(x, _theta(0.5, -0.25, 0.25, flip))
    col = 8 if flip > 0 else 24
    crop = x[..., 24:56, col : col + 32]
    ref = F.interpolate(crop, scale_factor=2, mode="bilinear", align_corners=False)
    ref = torch.flip(ref, [-1]) if flip < 0 else ref
    torch.testing.assert_close(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1])


def test_sampled_crops_stay_inside_and_follow_generator():
    theta = sample_theta(512, scale_min=0.5, generator=torch.Generator().manual_seed(3))
    again = sample_theta(512, scale_min=0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(theta, again)
    s = theta[:, 1, 1]
    assert s.min() >= 0.5 and s.max() <= 1.0
    assert torch.equal(theta[:, 0, 0].abs(), s) and (theta[:, 0, 1] == 0).all() and (theta[:, 1, 0] == 0).all()
    flipped = theta[:, 0, 0] < 0
    assert 0.4 < flipped.float().mean() < 0.6
    corners = [theta[:, :, 0] * sx + theta[:, :, 1] * sy + theta[:, :, 2] for sx in (-1, 1) for sy in (-1, 1)]
    corners = torch.stack(corners)  # [4,B,2] main-view positions of the view's corners
    assert corners.abs().max() <= 1.0 + 1e-6


def _block_image(n_blocks: int, block: int, generator: torch.Generator) -> torch.Tensor:
    """A piecewise-constant image [1,3,H,W] of n_blocks^2 random colour blocks."""
    colours = torch.rand(1, 3, n_blocks, n_blocks, generator=generator)
    return F.interpolate(colours, scale_factor=block, mode="nearest")


def test_align_commutes_with_per_pixel_function():
    """align(f(main)) == f(transformed) for a per-pixel f, away from block edges and borders."""
    g = torch.Generator().manual_seed(1)
    block, n = 8, 12
    x = torch.cat([_block_image(n, block, g) for _ in range(4)])  # [4,3,96,96]
    weight = torch.randn(5, 3, 1, 1, generator=g)

    def f(img: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.conv2d(img, weight))  # [B,5,H,W]

    theta = sample_theta(4, scale_min=0.5, generator=g)
    local = torch.arange(n * block) % block
    interior = ((local >= 1) & (local <= block - 2)).float()
    interior = (interior[:, None] * interior[None, :]).expand(4, 1, -1, -1)  # [4,1,H,W]
    valid = (transform(interior, theta) > 1 - 1e-6) & (align(interior, theta) > 0)  # [4,1,H,W]
    assert valid.float().mean() > 0.3
    aligned, direct = align(f(x), theta), f(transform(x, theta))
    torch.testing.assert_close(aligned * valid, direct * valid, rtol=1e-5, atol=1e-5)


def test_normalize_uses_imagenet_statistics():
    frames = torch.full((2, 3, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(frames)
    assert out.dtype == torch.float32
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out[0, 0, :, 0, 0], expected)
    with pytest.raises(TypeError, match="uint8"):
        normalize(frames.float())


def test_align_picks_the_nearest_main_pixel():
    """align of the main view's pixel-coordinate map lands within half a pixel of the exact source."""
    h, w = 24, 40
    theta = sample_theta(8, scale_min=0.5, generator=torch.Generator().manual_seed(2)).double()
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).double()  # [2,h,w]
    got = align(coords.expand(8, -1, -1, -1), theta)  # [8,2,h,w]
    yn = (2 * torch.arange(h).double() + 1) / h - 1  # normalised transformed-view centres
    xn = (2 * torch.arange(w).double() + 1) / w - 1
    src_x = ((theta[:, 0, 0, None] * xn + theta[:, 0, 2, None] + 1) * w - 1) / 2  # [8,w]
    src_y = ((theta[:, 1, 1, None] * yn + theta[:, 1, 2, None] + 1) * h - 1) / 2  # [8,h]
    assert (got[:, 1] - src_x[:, None, :]).abs().max() <= 0.5 + 1e-9
    assert (got[:, 0] - src_y[:, :, None]).abs().max() <= 0.5 + 1e-9
