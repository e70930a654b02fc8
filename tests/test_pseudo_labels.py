"""On textured video frames (the synthetic DAVIS set) a random-init network already gives informative
pseudo labels and a descent step."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dulearn.branches import training_loss
from dulearn.model import DenseNet

SEQUENCES = ("synth-3-0000", "synth-3-0002")  # the davis_set fixture, 144x256
FRAMES = (0, 3, 6)
CROP = 128
GRID = 8


def _clip(root, sequence: str) -> torch.Tensor:
    """uint8 [T,3,CROP,CROP]: frames resized to short side CROP and centre-cropped."""
    paths = [root / "JPEGImages" / "480p" / sequence / f"{i:05d}.jpg" for i in FRAMES]
    x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))) for p in paths])  # [T,H,W,3]
    x = x.permute(0, 3, 1, 2).float()  # [T,3,H,W]
    h, w = x.shape[-2:]
    x = F.interpolate(x, size=(CROP, round(w * CROP / h)), mode="bilinear", antialias=True, align_corners=False)
    left = (x.shape[-1] - CROP) // 2
    return x[..., left : left + CROP].round().clamp(0, 255).to(torch.uint8)


def test_random_init_pseudo_labels_and_one_step(davis_set):
    frames = torch.stack([_clip(davis_set, s) for s in SEQUENCES])  # [B,T,3,128,128]
    torch.manual_seed(0)
    model = DenseNet(feat_dim=128).train()
    optim = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.999))

    def loss_at_fixed_views() -> dict[str, torch.Tensor]:
        return training_loss(model, frames, generator=torch.Generator().manual_seed(4), grid=GRID)

    before = loss_at_fixed_views()
    for b, sequence in enumerate(SEQUENCES):
        used = before["pseudo"][b].unique().numel()
        assert used > GRID * GRID / 4, f"{sequence}: pseudo labels use only {used} anchors"
    assert before["anchors_used"].item() > GRID * GRID / 4

    optim.zero_grad()
    before["loss"].backward()
    optim.step()
    with torch.no_grad():
        after = loss_at_fixed_views()
    assert torch.equal(after["theta"], before["theta"])
    assert after["loss"].item() < before["loss"].item()
