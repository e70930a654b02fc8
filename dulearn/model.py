"""The feature network: ResNet-18 at output stride 8 (or 4) with a projection head.

See docs/method.md, Model. The forward pass returns the L2-normalised `res3`, `res4` and `key`
maps; training uses `key`, evaluation `res4` (or any of the three).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

LAYERS = ("res3", "res4", "key")
EVAL_LAYER = "res4"  # the map label propagation reads unless told otherwise


class ProjectionHead(nn.Sequential):
    """1x1 conv C->C, BatchNorm, ReLU, 1x1 conv C->K (the original release's `emb_q`)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.add_module("conv1", nn.Conv2d(n_in, n_in, 1))
        self.add_module("bn1", nn.BatchNorm2d(n_in))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv2", nn.Conv2d(n_in, n_out, 1))


def _unstride(layer: nn.Module) -> None:
    """Set the stride of every conv in a ResNet stage to 1 (downsample included)."""
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            m.stride = (1, 1)


def _backbone(output_stride: int, zero_init_residual: bool = False) -> nn.Module:
    """Randomly initialised torchvision ResNet-18 without `fc`/`avgpool`, at the given stride.

    zero_init_residual: the last BatchNorm of each residual block starts at gamma = 0, so
    every block starts as the identity (docs/method.md, Model: why the CPU recipes use it).
    """
    if output_stride not in (4, 8):
        raise ValueError(f"model.output_stride must be 4 or 8, got {output_stride}")
    net = resnet18(weights=None, zero_init_residual=zero_init_residual)
    del net.fc, net.avgpool
    stages = [net.layer3, net.layer4] + ([net.layer2] if output_stride == 4 else [])
    for stage in stages:
        _unstride(stage)
    return net


class DenseNet(nn.Module):
    """ResNet-18 backbone + projection head; returns normalised `res3`, `res4`, `key` maps."""

    def __init__(self, feat_dim: int = 128, output_stride: int = 8, channels_last: bool = False,
                 zero_init_residual: bool = False):
        super().__init__()
        self.feat_dim = feat_dim
        self.output_stride = output_stride
        self.backbone = _backbone(output_stride, zero_init_residual)
        self.head = ProjectionHead(512, feat_dim)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, layers: tuple[str, ...] = LAYERS) -> dict[str, torch.Tensor]:
        """x: normalised images [B,3,H,W] -> {layer: [B,C,H/s,W/s]} for the requested layers."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer2(b.layer1(x))
        res3 = b.layer3(x)  # [B,256,h,w]
        res4 = b.layer4(res3)  # [B,512,h,w]
        out = {"res3": res3, "res4": res4}
        if "key" in layers:
            out["key"] = self.head(res4)  # [B,K,h,w]
        return {name: F.normalize(out[name], p=2, dim=1) for name in layers}


def random_model(cfg: Any) -> DenseNet:
    """A randomly initialised DenseNet as a config's `model` section (dulearn.config.ModelConfig) says."""
    return DenseNet(cfg.feat_dim, cfg.output_stride, cfg.channels_last, cfg.zero_init_residual)


def _strip(key: str, prefix: str) -> str | None:
    """Return `key` without `prefix` (after an optional `module.`), or None if it lacks it."""
    if key.startswith("module."):
        key = key[len("module."):]
    return key[len(prefix):] if key.startswith(prefix) else None


def convert_original_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an original-release state dict (`fast_net.backbone.*`, `fast_net.emb_q.*`) to ours.

    Keys of other networks in the file (e.g. a momentum copy) and of the dropped `fc` are
    ignored; everything else keeps its tensor.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix, ours in (("fast_net.backbone.", "backbone."), ("fast_net.emb_q.", "head.")):
            rest = _strip(key, prefix)
            if rest is not None and not rest.startswith("fc."):
                out[ours + rest] = value
    return out


def is_original_state(state: Mapping[str, torch.Tensor]) -> bool:
    """True if the state dict has the original release's `fast_net.` key layout."""
    return any(_strip(k, "fast_net.") is not None for k in state)


class CheckpointMismatch(ValueError):
    """A checkpoint whose keys or shapes do not fit the model; the message is one line naming them."""


def load_weights(model: DenseNet, state: Mapping[str, torch.Tensor], allow_missing_head: bool = False) -> None:
    """Load our own or an original-release state dict exactly; CheckpointMismatch names bad keys.

    ``allow_missing_head``: only for evaluation, which reads res3/res4 and may take an
    original-release checkpoint without its projection head (then only ``head.*`` may be
    missing). Training never allows it: a resume must not train a random head.
    """
    if is_original_state(state):
        state = convert_original_state(state)
    else:
        state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    head_only_missing = allow_missing_head and missing and all(k.startswith("head.") for k in missing)
    if unexpected or (missing and not head_only_missing):
        raise CheckpointMismatch(
            "checkpoint does not match the dulearn model: "
            f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)}), "
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)})"
        )
    shapes = [k for k in state if state[k].shape != expected[k].shape]
    if shapes:
        k = shapes[0]
        raise CheckpointMismatch(
            f"checkpoint key {k} has shape {tuple(state[k].shape)}, the model expects "
            f"{tuple(expected[k].shape)} (is model.feat_dim / output_stride right?)"
        )
    model.load_state_dict(state, strict=not head_only_missing)


def feat_dim_of(state: Mapping[str, torch.Tensor]) -> int | None:
    """The projection dimension K stored in a state dict (ours or original), if present."""
    if is_original_state(state):
        state = convert_original_state(state)
    for k, v in state.items():
        if k.removeprefix("module.") == "head.conv2.weight":
            return int(v.shape[0])
    return None
