"""The training loop on real shards of synthetic H.264 videos, in real processes.

2 processes (gloo): loss goes down, replicas identical after every step, metrics and
checkpoints written; exact resume after SIGKILL (1 process bitwise, 2 processes to 1e-6);
resume on another number of processes; SIGTERM -> checkpoint + exit 0; wandb offline run
files hold the scalars and images; non-finite losses stop the run; checkpoint corruption
falls back to the previous file; the LR schedule and gradient clipping as the loop applies
them; SyncBN refused on CPU processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dulearn.checkpoint import load_latest, save_checkpoint, step_files
from dulearn.branches import training_loss
from dulearn.config import Config, load_config, steps_per_epoch
from dulearn.data import build_train_loader
from dulearn.model import DenseNet
from dulearn.monitor import truncate_metrics
from dulearn.train import NonFiniteLossError, request_checkpoint, step_generator, train

from runs import (ROOT, _descendants, _env, _finish, _latest_step, _launch, _log, _metrics, _overrides,
                  _wait_for)

pytestmark = pytest.mark.timeout(300)


def _kill_after_checkpoint(kind: str, run_dir: Path, overrides: list[str], n: int) -> None:
    """Start a run, SIGKILL every process of it (ranks, dataloader workers) after checkpoint n."""
    proc = _launch(kind, run_dir, overrides)
    _wait_for(lambda: _latest_step(run_dir) >= n, proc)
    for pid in _descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert _latest_step(run_dir) == n, "killed too late: the run passed the next checkpoint"


def _final_state(run_dir: Path, step: int) -> dict:
    """The checkpoint of `step`."""
    return torch.load(run_dir / "checkpoints" / f"step_{step:08d}.pt", weights_only=True)


def _flat_tensors(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """All tensors of a nested state (model + optimiser), by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    out: dict[str, torch.Tensor] = {}
    for k, v in items:
        out.update(_flat_tensors(v, f"{prefix}/{k}"))
    return out


def _compare(a: dict, b: dict, atol: float) -> None:
    """Model and optimiser tensors equal (atol=0: bitwise)."""
    ta = _flat_tensors({"model": a["model"], "optimizer": a["optimizer"]["state"]})
    tb = _flat_tensors({"model": b["model"], "optimizer": b["optimizer"]["state"]})
    assert ta.keys() == tb.keys()
    for k in ta:
        if atol == 0:
            assert torch.equal(ta[k], tb[k]), f"{k} differs"
        else:
            torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=atol, msg=f"{k} differs")


# ------------------------------------------------------------------------------------------
# 2 processes


@pytest.fixture(scope="module")
def two_process_run(shard_index: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """24 steps on 2 processes (accelerate launch, gloo), checkpoints every 8, replica check each step."""
    run_dir = tmp_path_factory.mktemp("two") / "run"
    overrides = _overrides(shard_index, 24, 4, **{"train.checkpoint_every": 8, "train.keep_checkpoints": 2,
                                                  "train.check_replicas_every": 1})
    _finish(_launch("accelerate", run_dir, overrides), run_dir)
    return run_dir, overrides


@pytest.mark.slow
def test_two_processes_learn_in_sync(two_process_run: tuple[Path, list[str]]) -> None:
    run_dir, _ = two_process_run
    lines = _metrics(run_dir)
    assert [m["step"] for m in lines] == list(range(1, 25))
    for m in lines:  # both ranks hold identical weights after every step
        assert len(m["replica_crc"]) == 2 and m["replica_crc"][0] == m["replica_crc"][1], m
        assert {"loss", "st", "cv", "lr", "pseudo_entropy", "data_wait_s", "clips_per_s"} <= m.keys()
    losses = [m["loss"] for m in lines]
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.2, losses
    assert [p.name for p in step_files(run_dir)] == ["step_00000016.pt", "step_00000024.pt"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000024.pt"
    assert load_config(run_dir / "config.yaml").train.batch_size == 4
    state = _final_state(run_dir, 24)
    assert len(state["rng"]) == 2 and state["step"] == 24 and state["data"]["world_size"] == 2
    assert not any(k.startswith("module.") for k in state["model"])


@pytest.mark.slow
def test_two_process_resume_after_sigkill(two_process_run: tuple[Path, list[str]], tmp_path: Path) -> None:
    straight, overrides = two_process_run
    run_dir = tmp_path / "run"
    _kill_after_checkpoint("torchrun", run_dir, overrides, 8)
    _finish(_launch("torchrun", run_dir, overrides), run_dir)
    _compare(_final_state(straight, 24), _final_state(run_dir, 24), atol=1e-6)
    assert [m["step"] for m in _metrics(run_dir)] == list(range(1, 25))


@pytest.mark.slow
def test_sync_bn_is_refused_on_cpu_processes(shard_index: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _launch("torchrun", run_dir, _overrides(shard_index, 4, 2, **{"model.sync_bn": "true"}))
    assert proc.wait(120) != 0
    log = _log(run_dir)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert errors == ["error: config key model.sync_bn: SyncBatchNorm needs GPUs; set it to false on CPU"] * 2, log
    assert "ConfigError" not in log  # one line per rank, not a traceback
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


def _loss_at(cfg: Config, weights: dict[str, torch.Tensor], step: int) -> float:
    """The loss a 1-process run of `cfg` computes at `step` from `weights`: batch `step` of its
    stream (rank 0 of 1) with that step's views and offsets."""
    d, lc = cfg.data, cfg.loss
    loader = build_train_loader(
        d.train, batch_size=cfg.train.batch_size, clip_len=d.clip_len, frame_gap=d.frame_gap,
        short_side=(d.short_side[0], d.short_side[-1]), crop=d.crop, crop_mode=d.crop_mode, hflip=d.hflip,
        num_workers=d.num_workers, seed=cfg.train.seed, rank=0, world_size=1,
        steps_per_epoch=steps_per_epoch(cfg), start_step=step, weights=d.weights)
    batch = next(iter(loader))
    assert batch["step"] == step
    model = DenseNet(cfg.model.feat_dim, cfg.model.output_stride, cfg.model.channels_last)
    model.load_state_dict(weights)
    gen = step_generator(cfg.train.seed, step, 0, torch.device("cpu"))
    with torch.no_grad():
        out = training_loss(model, batch["frames"], generator=gen, scale_min=lc.scale_min, grid=lc.grid,
                            cv_grid=lc.cv_grid, tau=lc.tau, cv_weight=lc.cv_weight)
    return out["loss"].item()


def _adam_steps(state: dict) -> set[int]:
    """The step counts of the optimiser state's parameters (Adam keeps one per parameter)."""
    return {int(s["step"]) for s in state["optimizer"]["state"].values()}


@pytest.mark.slow
def test_two_process_run_resumes_on_one(two_process_run: tuple[Path, list[str]], tmp_path: Path,
                                        one_thread: None) -> None:
    """The 2-process run, resumed from its step-16 checkpoint on 1 process (global batch 4 on one rank).

    Exact: metrics 1..16 as written, steps 17..24 once each; weights, optimiser and schedule state
    from the checkpoint; and step 17 is batch 16 of the 1-process stream (the stream starts at the
    checkpoint's step) with step 16's views. Not exact: the clips from step 17 on are not those the
    2-process run read (the stream's lanes depend on the world size), and the per-rank RNG states
    start fresh (views and offsets are seeded per step and rank, so nothing depends on them here).
    The resumed run computes in fp32 (train.mixed_precision=no) so that step 17 can be recomputed.
    """
    straight, overrides = two_process_run
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    checkpoint = run_dir / "checkpoints" / "step_00000016.pt"
    _finish(_launch("python", run_dir, [*overrides, "train.mixed_precision=no"], resume=str(checkpoint)), run_dir)
    lines = _metrics(run_dir)
    assert [m["step"] for m in lines] == list(range(1, 25))
    assert lines[:16] == _metrics(straight)[:16]
    log = _log(run_dir)
    assert "resuming a run of 2 processes on 1: the data stream continues from the same step" in log, log
    assert "checkpoint holds RNG states of 2 processes, this run has 1" in log
    assert "resumed from step 16" in log
    state = _final_state(run_dir, 24)
    assert state["step"] == 24 and state["data"]["world_size"] == 1 and len(state["rng"]) == 1
    assert _adam_steps(state) == {24}  # the optimiser went on from the 2-process run's 16 steps
    cfg = load_config(run_dir / "config.yaml")
    weights = _final_state(straight, 16)["model"]
    assert lines[16]["loss"] == pytest.approx(_loss_at(cfg, weights, 16), rel=1e-5)
    assert lines[16]["loss"] != pytest.approx(_loss_at(cfg, weights, 0), rel=1e-5)  # not a restarted stream


@pytest.mark.slow
def test_one_process_run_resumes_on_two(shard_index: Path, tmp_path: Path) -> None:
    """4 steps on 1 process, then steps 5..8 on 2 (torchrun, 1 clip per rank), from the step-4 checkpoint.

    Exact: metrics 1..8 once each, the step counter, weights and optimiser state carried over, both
    replicas identical after every resumed step. Not exact: the clips (each rank reads its lanes of
    the 2-rank stream, not the 1-process stream's batches) and the RNG states (fresh per rank);
    the first resumed step is not recomputed here, as its loss contrasts anchors of both ranks.
    """
    run_dir = tmp_path / "run"
    _finish(_launch("python", run_dir, _overrides(shard_index, 4, 2, **{"train.checkpoint_every": 4})), run_dir)
    first = _metrics(run_dir)
    overrides = _overrides(shard_index, 8, 2, **{"train.checkpoint_every": 4, "train.check_replicas_every": 1})
    _finish(_launch("torchrun", run_dir, overrides), run_dir)
    lines = _metrics(run_dir)
    assert [m["step"] for m in lines] == list(range(1, 9)) and lines[:4] == first
    assert all(len(set(m["replica_crc"])) == 1 and len(m["replica_crc"]) == 2 for m in lines[4:]), lines
    log = _log(run_dir)
    assert log.count("resuming a run of 1 processes on 2: the data stream continues from the same step") == 2
    assert "resumed from step 4" in log
    state = _final_state(run_dir, 8)
    assert state["step"] == 8 and state["data"]["world_size"] == 2 and len(state["rng"]) == 2
    assert _adam_steps(state) == {8}


# ------------------------------------------------------------------------------------------
# 1 process


@pytest.mark.slow
def test_one_process_resume_after_sigkill_is_bitwise(shard_index: Path, tmp_path: Path) -> None:
    overrides = _overrides(shard_index, 12, 2, **{"train.checkpoint_every": 6})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = _launch("python", straight, overrides)
    _kill_after_checkpoint("python", resumed, overrides, 6)
    _finish(proc, straight)
    _finish(_launch("python", resumed, overrides), resumed)
    _compare(_final_state(straight, 12), _final_state(resumed, 12), atol=0)
    a, b = _metrics(straight), _metrics(resumed)
    assert [m["step"] for m in b] == list(range(1, 13))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert [m["repeat_video_frac"] for m in a] == [m["repeat_video_frac"] for m in b]


def _wandb_records(run_dir: Path) -> list:
    """Records of the offline run's .wandb file (LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, block = path.read_bytes(), 7, 32768  # 7-byte file header (":W&B", magic, version)
    records, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a record header
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
        if length == 0 and kind == 0:
            break
    return records


def _history_value(item) -> object:
    """The value of a wandb history item (JSON or typed field)."""
    if item.value_json:
        return json.loads(item.value_json)
    return getattr(item, item.WhichOneof("value")) if item.WhichOneof("value") else None


@pytest.mark.slow
def test_sigterm_checkpoints_and_wandb_offline(shard_index: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = _overrides(shard_index, 1000, 2, **{"log.wandb": "true", "log.image_every": 2,
                                                    "train.checkpoint_every": 500})
    env = {k: v for k, v in _env().items() if k not in ("WANDB_MODE", "NETRC")}
    env["HOME"] = str(tmp_path)  # no API key anywhere: the run must go offline by itself
    proc = _launch("python", run_dir, overrides, env)
    _wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and len(_metrics(run_dir)) >= 4, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0
    last = _metrics(run_dir)[-1]["step"]
    assert 4 <= last < 1000 and _latest_step(run_dir) == last
    state = _final_state(run_dir, last)
    assert state["wandb_id"] and state["step"] == last

    history = {}
    for rec in _wandb_records(run_dir):
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): _history_value(i) for i in rec.history.item}
            history[items["_step"]] = items
    assert sorted(history) == list(range(1, last + 1))
    assert all(isinstance(h["loss"], float) and "lr" in h for h in history.values())
    names = ("images/anchors", "images/pseudo_labels", "images/assignment")
    logged = {s: {k.rsplit("/", 1)[0] for k in h if k.startswith("images/")} for s, h in history.items()}
    assert [s for s in logged if logged[s]] == list(range(2, last + 1, 2))
    assert all(logged[s] == set(names) for s in range(2, last + 1, 2))
    pngs = sorted(run_dir.glob("wandb/offline-run-*/files/media/images/**/*.png"))
    assert len(pngs) == 3 * (last // 2)
    image = np.asarray(Image.open(pngs[0]))
    assert image.shape[:2] == (64, 64) and image.std() > 10
    assert state["wandb_id"] in next(run_dir.glob("wandb/offline-run-*")).name

    # the resumed run continues the same wandb run (same id) and the same metrics file
    overrides = _overrides(shard_index, last + 1, 2, **{"log.wandb": "true", "train.checkpoint_every": 500})
    _finish(_launch("python", run_dir, overrides, env), run_dir)
    assert [m["step"] for m in _metrics(run_dir)] == list(range(1, last + 2))
    runs = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{state['wandb_id']}") for r in runs)


@pytest.mark.slow
def test_request_checkpoint_in_process(shard_index: Path, tmp_path: Path, one_thread: None) -> None:
    cfg = load_config(ROOT / "configs/cpu.yaml", _overrides(shard_index, 1000, 2, **{"data.num_workers": 0}))
    timer = threading.Timer(3.0, request_checkpoint)
    timer.start()
    result = train(cfg, tmp_path / "run")
    timer.join()
    assert result["status"] == "checkpoint" and 0 < result["step"] < 1000
    assert _latest_step(tmp_path / "run") == result["step"]


@pytest.mark.slow
def test_periodic_davis_eval_keeps_best(shard_index: Path, davis_set: Path, tmp_path: Path, one_thread: None,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """...with the eval.* settings of the config (layer and propagation), not the defaults."""
    from dulearn import evaluate

    real_run, calls = evaluate.run, []
    monkeypatch.setattr(evaluate, "run", lambda *a, **kw: calls.append(kw) or real_run(*a, **kw))
    cfg = load_config(ROOT / "configs/cpu.yaml", _overrides(
        shard_index, 4, 2, **{"data.num_workers": 0, "eval.davis_root": davis_set, "eval.every": 3,
                              "eval.sequences": "[synth-3-0000]", "eval.input_size": 64, "eval.layer": "res3",
                              "eval.context": 4, "eval.radius": 6, "eval.temperature": 0.1, "eval.topk": 5}))
    result = train(cfg, tmp_path / "run")
    assert [{k: c[k] for k in ("layer", "input_size", "context", "radius", "temperature", "topk")} for c in calls] == [
        {"layer": "res3", "input_size": 64, "context": 4, "radius": 6.0, "temperature": 0.1, "topk": 5}]
    evals = [m for m in _metrics(tmp_path / "run") if "eval/J&F-Mean" in m]
    assert [m["step"] for m in evals] == [3] and 0 < evals[0]["eval/J&F-Mean"] <= 1
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert best["step"] == 3 and best["score"] == evals[0]["eval/J&F-Mean"] == result["best_score"]


@pytest.mark.slow
def test_nonfinite_losses_stop_the_run(shard_index: Path, tmp_path: Path, one_thread: None) -> None:
    cfg = load_config(ROOT / "configs/cpu.yaml", _overrides(
        shard_index, 50, 2, **{"data.num_workers": 0, "optim.name": "sgd", "optim.lr": 1e30,
                               "train.max_nonfinite": 3}))
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        train(cfg, tmp_path / "run")
    lines = _metrics(tmp_path / "run")
    assert lines[-1]["nonfinite_total"] == 3 and lines[-1]["step"] == _latest_step(tmp_path / "run")


@pytest.mark.slow
def test_loop_trains_each_step_at_the_scheduled_lr(shard_index: Path, tmp_path: Path, one_thread: None) -> None:
    """Warm-up over 2 steps and x0.5 every 2 steps, through the loop: metrics.jsonl logs the lr each
    step trained with; the checkpointed optimiser holds the next step's (biases at 2x)."""
    lr = 1e-3
    cfg = load_config(ROOT / "configs/cpu.yaml", _overrides(shard_index, 6, 2, **{
        "data.num_workers": 0, "optim.lr": lr, "schedule.warmup_steps": 2, "schedule.lr_step": 2}))
    train(cfg, tmp_path / "run")
    assert [m["lr"] for m in _metrics(tmp_path / "run")] == pytest.approx(
        [lr / 2, lr, lr / 2, lr / 2, lr / 4, lr / 4], rel=1e-9)
    groups = _final_state(tmp_path / "run", 6)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([lr / 8, 2 * lr / 8], rel=1e-9)


@pytest.mark.slow
def test_grad_clip_scales_the_update_and_logs_the_norm(shard_index: Path, tmp_path: Path, one_thread: None) -> None:
    """One plain SGD step (no momentum, no decay) moves each parameter by -lr_group * g.

    Runs A (lr L) and B (lr 2L) without clipping give g = (pA - pB) / lr_group and the initial
    weights p0 = 2 pA - pB. Run C (lr L, optim.grad_clip = |g| / 2) must move by the clipped
    gradient, pC - p0 = s (pA - p0) with s = clip / (|g| + 1e-6), and log grad_norm = |g|.
    """
    def one_step(name: str, lr: float, **extra: object) -> tuple[dict[str, torch.Tensor], dict, Config]:
        cfg = load_config(ROOT / "configs/cpu.yaml", _overrides(shard_index, 1, 2, **{
            "data.num_workers": 0, "optim.name": "sgd", "optim.momentum": 0, "optim.weight_decay": 0,
            "optim.lr": lr, **extra}))
        train(cfg, tmp_path / name)
        return _final_state(tmp_path / name, 1)["model"], _metrics(tmp_path / name)[0], cfg

    lr = 1.0
    a, line_a, cfg = one_step("a", lr)
    b, _, _ = one_step("b", 2 * lr)
    names = [n for n, _ in DenseNet(cfg.model.feat_dim).named_parameters()]  # not the BN statistics
    group_lr = {n: lr * (cfg.optim.bias_lr_mult if n.endswith(".bias") else 1.0) for n in names}
    grad = {n: (a[n] - b[n]) / group_lr[n] for n in names}
    norm = sum((g.double() ** 2).sum() for g in grad.values()).sqrt().item()
    c, line_c, _ = one_step("c", lr, **{"optim.grad_clip": norm / 2})
    scale = (norm / 2) / (norm + 1e-6)
    assert "grad_norm" not in line_a and line_c["grad_norm"] == pytest.approx(norm, rel=1e-4)
    for n in names:
        p0 = 2 * a[n] - b[n]
        torch.testing.assert_close(c[n] - p0, scale * (a[n] - p0), rtol=1e-3, atol=1e-6, msg=n)


def test_corrupt_checkpoint_falls_back(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, {"model": {}, "config": {}, "step": step}, keep=2)
    assert [p.name for p in step_files(tmp_path)] == ["step_00000002.pt", "step_00000003.pt"]
    newest = tmp_path / "checkpoints" / "step_00000003.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # a partial write
    with pytest.warns(UserWarning, match="corrupt or partial"):
        state, path = load_latest(tmp_path)
    assert state["step"] == 2 and path.name == "step_00000002.pt"
    shutil.rmtree(tmp_path / "checkpoints")
    assert load_latest(tmp_path) is None


def test_resume_drops_later_and_torn_metrics_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n{"step": 3, "loss": 3.0}\n{"step": 4, "lo')
    truncate_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from dulearn.train import resolve_precision

    monkeypatch.delenv("DULEARN_CPU_BF16", raising=False)
    for avx512_bf16, amx, want in ((False, False, "no"), (True, False, "bf16"), (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_precision("auto", cpu=True) == want
        assert [resolve_precision(p, cpu=True) for p in ("no", "bf16", "fp16")] == ["no", "bf16", "fp16"]


def test_cpu_bf16_off_makes_auto_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """DULEARN_CPU_BF16=0: a CPU with bf16 units runs train.mixed_precision=auto in fp32."""
    from dulearn.train import resolve_precision

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    for value, want in (("0", "no"), ("1", "bf16"), ("", "bf16")):
        monkeypatch.setenv("DULEARN_CPU_BF16", value)
        assert resolve_precision("auto", cpu=True) == want
    monkeypatch.setenv("DULEARN_CPU_BF16", "0")
    assert resolve_precision("bf16", cpu=True) == "bf16"  # an explicit setting is kept


def test_replica_checksum_reads_channels_last_weights_in_logical_order() -> None:
    from dulearn.model import DenseNet
    from dulearn.train import params_crc

    torch.manual_seed(0)
    plain = DenseNet(feat_dim=16)
    torch.manual_seed(0)
    cl = DenseNet(feat_dim=16, channels_last=True)  # 1x1 convs: stride(-1) != 1 in channels_last
    assert params_crc(cl) == params_crc(plain)
    with torch.no_grad():
        weight = next(cl.parameters())
        weight[(0,) * weight.dim()] += 1e-3
    assert params_crc(cl) != params_crc(plain)


HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


def test_loop_reads_the_device_only_at_logging_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     one_thread: None) -> None:
    """No tensor is read back on the host between logging steps (on a GPU each read waits for it).

    Single process on the CPU, with clipping on: every call of a host-reading Tensor method
    is counted per step (the stream's own work excluded). Only the logging steps 4 and 8 (8
    also checkpoints) may read, and they must: the reduced window comes back in one tolist.
    """
    from loop_probe import run_probed, tiny_config, tiny_shards

    cfg = tiny_config(tiny_shards(tmp_path / "shards"), **{
        "schedule.total_steps": 8, "log.every": 4, "train.checkpoint_every": 8, "optim.grad_clip": 1.0})
    step, reads = [0], {}
    for name in HOST_READS:
        def counted(self, *args, _name=name, _original=getattr(torch.Tensor, name), **kwargs):
            if step[0]:
                reads.setdefault(step[0], []).append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    result = run_probed(cfg, tmp_path / "run", monkeypatch, lambda k: step.__setitem__(0, k))
    assert result["status"] == "finished" and result["step"] == 8
    assert {k: v for k, v in reads.items() if k not in (4, 8)} == {}, reads
    assert "tolist" in reads.get(4, []) and "tolist" in reads.get(8, []), reads
    assert [m["step"] for m in _metrics(tmp_path / "run")] == [4, 8]
