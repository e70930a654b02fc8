"""The optimiser of the training loop: parameter groups, the LR schedule through torch's LambdaLR,
and the update a non-finite loss skips on the device, leaving no trace in the optimiser's state.

The runs in test_train.py check the same as the loop applies it (logged lr, clipped update).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from dulearn.config import OptimConfig, ScheduleConfig
from dulearn.model import DenseNet
from dulearn.optim import backward_loss, build_optimizer, load_optimizer_state, lr_factor, param_groups, step_unless

LR = 1e-3


@pytest.fixture(scope="module")
def model() -> DenseNet:
    torch.manual_seed(0)
    return DenseNet(feat_dim=16)


def _lrs(model: nn.Module, schedule: ScheduleConfig, steps: int) -> list[list[float]]:
    """The lr of each parameter group at steps 0..steps-1, stepping a real optimiser and LambdaLR."""
    optimizer = build_optimizer(model, OptimConfig(lr=LR))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(schedule))
    out = []
    for _ in range(steps):
        out.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()  # no gradients: parameters stay, the schedule advances
        scheduler.step()
    return out


def test_warmup_then_step_decay(model):
    lrs = _lrs(model, ScheduleConfig(warmup_steps=4, lr_step=10, lr_gamma=0.5), 32)
    weights = [w for w, _ in lrs]
    expected = {0: LR / 4, 1: LR / 2, 2: 3 * LR / 4, 3: LR, 9: LR, 10: LR / 2, 19: LR / 2, 20: LR / 4, 31: LR / 8}
    assert {s: weights[s] for s in expected} == pytest.approx(expected, rel=1e-12)
    assert weights[3:10] == pytest.approx([LR] * 7, rel=1e-12)  # full lr from the end of the warm-up
    assert all(b == pytest.approx(2 * w, rel=1e-12) for w, b in lrs)  # biases at 2x, at every step


def test_warmup_and_decay_multiply_and_off_means_constant(model):
    lrs = [w for w, _ in _lrs(model, ScheduleConfig(warmup_steps=6, lr_step=4, lr_gamma=0.1), 9)]
    assert lrs == pytest.approx([LR * min(1, (s + 1) / 6) * 0.1 ** (s // 4) for s in range(9)], rel=1e-12)
    assert lrs[4] == pytest.approx(LR * 5 / 6 * 0.1)  # still warming up when the first decay comes
    assert [w for w, _ in _lrs(model, ScheduleConfig(warmup_steps=0, lr_step=0), 5)] == [LR] * 5


def test_biases_at_twice_the_lr_without_decay_all_weights_with_decay(model):
    net = copy.deepcopy(model)
    net.head.conv1.bias.requires_grad_(False)  # a frozen parameter belongs to no group
    cfg = OptimConfig(lr=LR, weight_decay=5e-4, bias_lr_mult=2.0)
    groups = param_groups(net, cfg)
    name = {id(p): n for n, p in net.named_parameters()}
    grouped = [name[id(p)] for group in groups for p in group["params"]]
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)  # every trainable parameter, each exactly once
    assert "head.conv1.bias" not in grouped
    (weights,) = [g for g in groups if g["weight_decay"] > 0]
    (biases,) = [g for g in groups if g["weight_decay"] == 0]
    assert weights["lr"] == LR and weights["weight_decay"] == 5e-4
    assert biases["lr"] == 2 * LR
    bias_names = {name[id(p)] for p in biases["params"]}
    weight_names = {name[id(p)] for p in weights["params"]}
    assert all(n.endswith(".bias") for n in bias_names) and not any(n.endswith(".bias") for n in weight_names)
    bn = [m for m, mod in net.named_modules() if isinstance(mod, nn.BatchNorm2d)]
    assert len(bn) == 21  # ResNet-18's 20 and the head's
    assert {f"{m}.weight" for m in bn} <= weight_names  # BN scales are decayed, as in the original
    assert {f"{m}.bias" for m in bn} <= bias_names
    assert {"head.conv2.bias", "head.conv2.weight"} <= bias_names | weight_names


@pytest.mark.parametrize("name,setting", [("adam", ("betas", (0.5, 0.999))), ("sgd", ("momentum", 0.9))])
def test_both_optimisers_get_the_groups(model, name, setting):
    optimizer = build_optimizer(model, OptimConfig(name=name, lr=LR, weight_decay=0.1))
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(LR, 0.1), (2 * LR, 0.0)]
    assert all(g[setting[0]] == setting[1] for g in optimizer.param_groups)


def test_an_sgd_step_applies_the_groups(model):
    """Unit gradients: weights move by lr (1 + decay x w), biases by 2 lr and no decay."""
    net = copy.deepcopy(model)
    optimizer = build_optimizer(net, OptimConfig(name="sgd", lr=LR, weight_decay=0.1))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    error = {}
    for n, p in net.named_parameters():
        want = before[n] - 2 * LR if n.endswith(".bias") else before[n] - LR * (1 + 0.1 * before[n])
        error[n] = (p.detach() - want).abs().max().item()
    assert max(error.values()) < 1e-7, error


def _tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))


def _loss(model: torch.nn.Module, poison: bool) -> torch.Tensor:
    """A loss that is NaN when `poison` (the inputs are always the same)."""
    x = torch.arange(12.0).view(2, 6) / 12  # [2,6]
    return model(x).square().mean() + (math.nan if poison else 0.0)


def _steps(name: str, losses: list[bool], scaler: torch.amp.GradScaler | None = None) -> torch.nn.Module:
    """Run one step per entry (True: a NaN loss) as the training loop does; the model after them."""
    model = _tiny_net()
    optimizer = build_optimizer(model, OptimConfig(name=name, lr=0.1))
    wrapped = optimizer if scaler is None else _ScaledOptimizer(optimizer, scaler)
    for poison in losses:
        loss = _loss(model, poison)
        bad = (~torch.isfinite(loss.detach())).float()  # [] 0/1
        loss = backward_loss(loss, bad, scaled=scaler is not None)
        (loss if scaler is None else scaler.scale(loss)).backward()
        step_unless(wrapped, bad)
        optimizer.zero_grad(set_to_none=True)
    return model


class _ScaledOptimizer:
    """What accelerate's AcceleratedOptimizer does with a GradScaler (fp16): scaler.step, then update."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler):
        self.optimizer, self.scaler = optimizer, scaler

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_skipped_steps_leave_no_trace(name: str) -> None:
    # a NaN first step must not even initialise state differently (fused SGD's momentum buffers)
    assert _equal(_steps(name, [True, False, True, False]), _steps(name, [False, False]))
    assert not _equal(_steps(name, [False]), _tiny_net())


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_skipping_under_a_grad_scaler(name: str) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    model = _steps(name, [True], scaler)
    assert _equal(model, _tiny_net()) and scaler.get_scale() == 2.0**3  # skipped, and the scale backed off
    assert _equal(_steps(name, [True, False], torch.amp.GradScaler("cpu", init_scale=2.0**4)),
                  _steps(name, [False], torch.amp.GradScaler("cpu", init_scale=2.0**3)))


def test_a_checkpoint_of_a_non_fused_optimizer_keeps_the_fused_kernels() -> None:
    model = _tiny_net()
    old = build_optimizer(model, OptimConfig(lr=0.1), fused=False)  # as checkpoints before the fused kernels
    _loss(model, False).backward()
    old.step()
    optimizer = build_optimizer(model, OptimConfig(lr=0.1))
    load_optimizer_state(optimizer, old.state_dict())
    assert all(g["fused"] for g in optimizer.param_groups)
    before = [p.detach().clone() for p in model.parameters()]
    step_unless(optimizer, torch.ones(()))  # would assert inside torch without the fused kernels
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
