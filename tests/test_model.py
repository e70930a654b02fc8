"""The feature network of docs/method.md, Model: shapes, strides, unit norms, original-checkpoint import."""

from __future__ import annotations

import pytest
import torch

from dulearn.model import CheckpointMismatch, DenseNet, feat_dim_of, load_weights


@pytest.fixture(scope="module")
def net() -> DenseNet:
    torch.manual_seed(0)
    return DenseNet(feat_dim=32).eval()


@pytest.mark.parametrize("size,grid", [((256, 256), (32, 32)), ((480, 854), (60, 107))])
def test_shapes_strides_and_norms(net, size, grid):
    with torch.no_grad():
        out = net(torch.randn(1, 3, *size))
    channels = {"res3": 256, "res4": 512, "key": 32}
    for name, c in channels.items():
        assert out[name].shape == (1, c, *grid), name
        norms = out[name].norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), msg=name)


def test_output_stride_4_and_channels_last():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        s4 = DenseNet(feat_dim=16, output_stride=4).eval()(x, layers=("key",))
        cl_net = DenseNet(feat_dim=16, channels_last=True).eval()
        plain = DenseNet(feat_dim=16).eval()
        plain.load_state_dict(cl_net.state_dict())
        cl, ref = cl_net(x, layers=("key",)), plain(x, layers=("key",))
    assert list(s4) == ["key"] and s4["key"].shape == (2, 16, 16, 24)
    torch.testing.assert_close(cl["key"], ref["key"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="output_stride"):
        DenseNet(output_stride=16)


def _original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in the original release's key layout (DDP prefix, fc and a second net included)."""
    out = {}
    for key, value in state.items():
        module, rest = key.split(".", 1)
        out[f"module.fast_net.{'backbone' if module == 'backbone' else 'emb_q'}.{rest}"] = value.clone()
    out["module.fast_net.backbone.fc.weight"] = torch.zeros(1000, 512)
    out["module.slow_net.backbone.conv1.weight"] = torch.zeros(1)
    return out


def test_import_original_checkpoint():
    torch.manual_seed(1)
    source = DenseNet(feat_dim=24)
    original = _original_layout(source.state_dict())
    assert feat_dim_of(original) == 24
    target = DenseNet(feat_dim=24)
    load_weights(target, original)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key

    broken = dict(original)
    broken["module.fast_net.backbone.layer9.weight"] = torch.zeros(1)
    del broken["module.fast_net.backbone.layer1.0.conv1.weight"]
    with pytest.raises(CheckpointMismatch, match=r"backbone\.layer1\.0\.conv1\.weight.*backbone\.layer9\.weight"):
        load_weights(DenseNet(feat_dim=24), broken)
    with pytest.raises(CheckpointMismatch, match="head.conv2.weight"):
        load_weights(DenseNet(feat_dim=8), original)


def test_a_missing_head_is_refused_unless_evaluation_imports_an_original_release():
    torch.manual_seed(2)
    source = DenseNet(feat_dim=24)
    ours = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    with pytest.raises(CheckpointMismatch, match=r"missing keys \['head\.") as refused:
        load_weights(DenseNet(feat_dim=24), ours)  # how training resumes: strict
    assert "\n" not in str(refused.value)
    original = {k: v for k, v in _original_layout(source.state_dict()).items() if ".emb_q." not in k}
    target = DenseNet(feat_dim=24)
    load_weights(target, original, allow_missing_head=True)  # evaluate's import of a release without the head
    assert torch.equal(target.backbone.conv1.weight, source.backbone.conv1.weight)
    with pytest.raises(CheckpointMismatch, match="head"):
        load_weights(DenseNet(feat_dim=24), original)


def test_zero_init_residual_starts_every_block_as_the_identity():
    """model.zero_init_residual: every block's last BatchNorm starts at gamma 0, so a block without a
    downsample passes its (non-negative, post-ReLU) input through, in train and in eval mode."""
    from dulearn.config import ModelConfig
    from dulearn.model import random_model

    torch.manual_seed(0)
    net = random_model(ModelConfig(zero_init_residual=True))
    plain = random_model(ModelConfig())
    b = net.backbone
    assert all(float(blk.bn2.weight.detach().abs().max()) == 0 for layer in (b.layer1, b.layer2, b.layer3, b.layer4)
               for blk in layer)
    assert all(float(blk.bn2.weight.detach().min()) == 1 for blk in plain.backbone.layer1)  # torchvision's default
    x = torch.rand(2, 64, 16, 16)  # [B,C,H,W] >= 0, as after the stem's ReLU
    for mode in (True, False):
        assert torch.equal(b.layer1.train(mode)(x), x)
