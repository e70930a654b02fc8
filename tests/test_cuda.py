"""The core on a CUDA device: equal to the CPU in fp32, sane in bf16, and a training step that
never waits for the host. Skipped without CUDA; tests/gpu/check.sh runs them on a GPU machine."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

from dulearn.branches import training_loss
from dulearn.loss import dense_loss
from dulearn.model import LAYERS, DenseNet
from dulearn.views import align, normalize, sample_theta, transform

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (tests/gpu/check.sh on a GPU machine)"),
]
CUDA = torch.device("cuda")


@pytest.fixture
def full_fp32():
    """fp32 convolutions and matmuls without TF32, so CUDA results can be compared with the CPU's."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _frames(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random uint8 frames of the given shape (CPU)."""
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-position cosine similarity of two maps [B,C,h,w] -> [B,h,w]."""
    return F.cosine_similarity(a.float(), b.float(), dim=1)


def test_model_forward_fp32_and_bf16(full_fp32):
    torch.manual_seed(0)
    cpu_model = DenseNet().train()
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    x = normalize(_frames(2, 3, 128, 160))  # [2,3,128,160]
    ref = cpu_model(x)
    out = gpu_model(x.to(CUDA))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_bf16 = gpu_model(x.to(CUDA))
    for name in LAYERS:
        channels = {"res3": 256, "res4": 512, "key": 128}[name]
        assert out[name].shape == out_bf16[name].shape == (2, channels, 16, 20), name
        for o in (out[name], out_bf16[name]):
            torch.testing.assert_close(o.float().norm(dim=1), torch.ones(2, 16, 20, device=CUDA), atol=1e-2, rtol=0)
        torch.testing.assert_close(out[name].cpu(), ref[name], atol=1e-4, rtol=0, msg=f"{name}: CUDA fp32 != CPU")
        cos = _cosine(out_bf16[name], out[name])
        assert cos.mean() > 0.99 and cos.min() > 0.9, f"{name}: bf16/fp32 cosine {cos.mean():.4f}, min {cos.min():.4f}"


def test_channels_last_model_equals_default_layout(full_fp32):
    torch.manual_seed(0)
    model = DenseNet().to(CUDA).eval()
    model_cl = DenseNet(channels_last=True).to(CUDA).eval()
    model_cl.load_state_dict(model.state_dict())
    x = normalize(_frames(2, 3, 96, 96).to(CUDA))
    for name, value in model_cl(x).items():
        torch.testing.assert_close(value, model(x)[name], atol=1e-4, rtol=0, msg=name)


def test_views_on_cuda_equal_cpu():
    frames = _frames(4, 3, 48, 64)
    theta = sample_theta(4, generator=torch.Generator().manual_seed(1))  # [4,2,3]
    flip_only = torch.tensor([[-1.0, 0, 0], [0, 1.0, 0]]).expand(4, 2, 3)
    x, x_gpu = normalize(frames), normalize(frames.to(CUDA))
    assert x_gpu.device.type == "cuda"
    torch.testing.assert_close(x_gpu.cpu(), x, atol=1e-6, rtol=0)
    feat = torch.randn(4, 8, 12, 16, generator=torch.Generator().manual_seed(2))  # [4,8,12,16]
    for th in (theta, flip_only):
        torch.testing.assert_close(transform(x_gpu, th.to(CUDA)).cpu(), transform(x, th), atol=1e-5, rtol=0)
        assert torch.equal(align(feat.to(CUDA), th.to(CUDA)).cpu(), align(feat, th))


def test_theta_drawn_on_a_cuda_generator_stays_there():
    theta = sample_theta(64, scale_min=0.5, generator=torch.Generator(CUDA).manual_seed(0))
    assert theta.device.type == "cuda" and theta.shape == (64, 2, 3)
    s = theta[:, 1, 1]
    assert bool(((s >= 0.5) & (s <= 1)).all()) and torch.equal(theta[:, 0, 0].abs(), s)
    assert bool(((theta[:, :, 2].abs() <= 1 - s[:, None] + 1e-6)).all())  # the crop stays inside the frame


def _loss_inputs(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Unit-norm keys [2,4,16,24,32] x2, theta [2,2,3] and both offsets [2,2], on the CPU."""
    g = torch.Generator().manual_seed(seed)
    k_main = F.normalize(torch.randn(2, 4, 16, 24, 32, generator=g, dtype=torch.float64), dim=2).to(dtype)
    k_reg = F.normalize(torch.randn(2, 4, 16, 24, 32, generator=g, dtype=torch.float64), dim=2).to(dtype)
    theta = sample_theta(2, generator=g)
    anchor_offsets = torch.tensor([[0, 2], [1, 3]])
    cv_offsets = torch.tensor([[5, 1], [2, 7]])
    return k_main, k_reg, theta, anchor_offsets, cv_offsets


def _loss_and_grads(k_main, k_reg, theta, anchor_offsets, cv_offsets, device) -> tuple[dict, torch.Tensor, ...]:
    """dense_loss on `device` and the gradients of both inputs, all returned on the CPU."""
    k_main = k_main.detach().to(device).requires_grad_()
    k_reg = k_reg.detach().to(device).requires_grad_()
    out = dense_loss(k_main, k_reg, theta.to(device), anchor_offsets=anchor_offsets.to(device),
                     cv_offsets=cv_offsets.to(device))
    out["loss"].backward()
    cpu = {k: v.detach().cpu() for k, v in out.items()}
    return cpu, k_main.grad.cpu(), k_reg.grad.cpu()


def test_dense_loss_fp32_on_cuda_equals_cpu():
    inputs = _loss_inputs(torch.float32)
    ref, ref_gm, ref_gr = _loss_and_grads(*inputs, "cpu")
    out, gm, gr = _loss_and_grads(*inputs, CUDA)
    for name in ("loss", "st", "cv"):
        torch.testing.assert_close(out[name], ref[name], rtol=1e-5, atol=0, msg=name)
    assert torch.equal(out["pseudo"], ref["pseudo"])
    for got, want in ((gm, ref_gm), (gr, ref_gr)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_dense_loss_float64_on_cuda_matches_golden(golden_dir):
    for path in sorted(golden_dir.glob("loss_case_*.pt")):
        case = torch.load(path, weights_only=True)
        settings = {k: case[k] for k in ("grid", "cv_grid", "tau", "cv_weight")}
        k_main = case["k_main"].to(CUDA).requires_grad_()
        k_reg = case["k_reg"].to(CUDA).requires_grad_()
        out = dense_loss(k_main, k_reg, case["theta"].to(CUDA), anchor_offsets=case["anchor_offsets"].to(CUDA),
                         cv_offsets=case["cv_offsets"].to(CUDA), **settings)
        out["loss"].backward()
        for name in ("loss", "st", "cv"):
            torch.testing.assert_close(out[name].cpu(), case[name], rtol=1e-6, atol=0, msg=f"{path.name}: {name}")
        assert torch.equal(out["pseudo"].cpu(), case["pseudo"]), path.name
        for grad, name in ((k_main.grad, "grad_k_main"), (k_reg.grad, "grad_k_reg")):
            ref = case[name]
            atol = 1e-6 * ref.abs().max().item()
            torch.testing.assert_close(grad.cpu(), ref, rtol=1e-6, atol=atol, msg=f"{path.name}: {name}")


def test_dense_loss_with_bf16_keys_is_finite_and_close():
    k_main, k_reg, *rest = _loss_inputs(torch.float32)
    ref, _, _ = _loss_and_grads(k_main, k_reg, *rest, CUDA)
    out, gm, gr = _loss_and_grads(k_main.bfloat16(), k_reg.bfloat16(), *rest, CUDA)
    assert out["loss"].dtype == torch.float32  # softmax and cross-entropy run in fp32
    assert torch.isfinite(gm.float()).all() and torch.isfinite(gr.float()).all()
    for name in ("loss", "st", "cv"):
        assert torch.isfinite(out[name]), name
        torch.testing.assert_close(out[name], ref[name], rtol=2e-2, atol=0, msg=name)
    assert (out["pseudo"] == ref["pseudo"]).float().mean() > 0.95


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16+cl"])
def test_training_step_never_syncs_with_the_host(bf16):
    torch.manual_seed(0)
    model = DenseNet(channels_last=bf16).to(CUDA).train()
    frames = _frames(2, 5, 3, 64, 64).to(CUDA)  # [B,T,3,H,W] uint8
    generator = torch.Generator(CUDA).manual_seed(0)

    def step() -> dict[str, torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = training_loss(model, frames, generator=generator)
        out["loss"].backward()
        return out

    step()  # warm-up: one-time uploads (the ImageNet statistics) and library handles
    model.zero_grad(set_to_none=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out["loss"]).item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert sum(p.grad is not None for p in model.parameters()) == len(list(model.parameters()))


def test_propagation_on_cuda_equals_cpu(golden_dir):
    try:
        propagate = importlib.import_module("dulearn.propagate").propagate
    except ImportError as err:
        pytest.skip(f"dulearn.propagate is not importable: {err}")
    case = torch.load(sorted(golden_dir.glob("prop_case_*.pt"))[0], weights_only=True)
    settings = {k: case[k] for k in ("context", "radius", "temperature", "topk")}
    feats, first = case["features"], case["first_mask"]  # [N,K,h,w] float64, [H,W]
    exact = propagate(feats.to(CUDA), first.to(CUDA), **settings).cpu()
    assert torch.equal(exact, case["masks"].to(exact.dtype)), f"{int((exact != case['masks']).sum())} pixels differ"
    for dtype, min_agree in ((torch.float32, 0.999), (torch.bfloat16, 0.99)):
        on_cpu = propagate(feats.to(dtype), first, **settings)
        on_gpu = propagate(feats.to(CUDA, dtype), first.to(CUDA), **settings).cpu()
        agree = (on_gpu == on_cpu).float().mean().item()
        assert agree >= min_agree, f"{dtype}: CUDA and CPU masks agree on {agree:.4%} of pixels"


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_training_loop_waits_for_the_device_only_at_logging_steps(precision, tmp_path, monkeypatch):
    """The real loop (clipping on; fp16 through the GradScaler) in sync-debug "error" mode on every
    step but the first (one-time uploads) and the logging steps 4 and 8 (8 also checkpoints)."""
    from loop_probe import run_probed, tiny_config, tiny_shards

    cfg = tiny_config(tiny_shards(tmp_path / "shards"), **{
        "train.mixed_precision": precision, "schedule.total_steps": 8, "log.every": 4,
        "train.checkpoint_every": 8, "optim.grad_clip": 1.0})
    checked = []

    def on_step(k: int) -> None:
        strict = k in (2, 3, 5, 6, 7)
        checked.extend([k] if strict else [])
        torch.cuda.set_sync_debug_mode("error" if strict else "default")

    result = run_probed(cfg, tmp_path / "run", monkeypatch, on_step)
    assert result["status"] == "finished" and checked == [2, 3, 5, 6, 7]


def test_the_stream_pins_batches_for_the_gpu_only(tmp_path):
    """pin_memory=True (what the loop passes on CUDA) gives page-locked batches, the CPU default does not."""
    from dulearn.data import build_train_loader
    from synthetic_data import synthetic_shards

    index = synthetic_shards(tmp_path / "shards", "seed=1,videos=4,frames=8,size=32x32,objects=1", 8, 8) / "index.json"
    kw = dict(batch_size=2, clip_len=3, frame_gap=1, short_side=32, crop=32, num_workers=1)
    pinned = next(iter(build_train_loader(str(index), pin_memory=True, **kw)))["frames"]  # [B,T,3,H,W] uint8
    assert pinned.is_pinned() and not next(iter(build_train_loader(str(index), **kw)))["frames"].is_pinned()
    on_gpu = pinned.to(CUDA, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), pinned)
