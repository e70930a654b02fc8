"""Configuration: presets load, overrides coerce, and every error is one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dulearn.config import Config, ConfigError, load_config, save_config, steps_per_epoch, validate
from dulearn.train import main

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["ytvos", "oxuva", "trackingnet", "kinetics", "cpu"]


@pytest.fixture()
def shard(tmp_path: Path) -> Path:
    """A stand-in shard file: only its existence matters to validation."""
    path = tmp_path / "shard-000000.tar"
    path.write_bytes(b"")
    return path


def _error(cfg_file: Path | None, overrides: list[str], world_size: int = 1) -> str:
    """The one-line ConfigError message of loading + validating."""
    with pytest.raises(ConfigError) as info:
        validate(load_config(cfg_file, overrides), world_size)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_validate(name: str) -> None:
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    validate(cfg, 1, check_paths=False)
    assert cfg.train.batch_size % 2 == 0 or name == "cpu"
    assert cfg.schedule.total_steps % steps_per_epoch(cfg) == 0


def test_paper_settings() -> None:
    yt, tn = load_config(ROOT / "configs/ytvos.yaml"), load_config(ROOT / "configs/trackingnet.yaml")
    assert (yt.optim.name, yt.optim.lr, yt.optim.betas, yt.data.frame_gap) == ("adam", 1e-4, [0.5, 0.999], 2)
    assert (yt.schedule.total_steps, yt.schedule.lr_step, yt.schedule.lr_gamma) == (108500, 21700, 0.5)
    assert (tn.optim.name, tn.optim.lr, tn.optim.momentum, tn.data.crop_mode) == ("sgd", 1e-3, 0.9, "center")
    assert (tn.schedule.lr_gamma, tn.schedule.lr_step) == (0.9, 20 * steps_per_epoch(tn))


def test_overrides_are_coerced(shard: Path) -> None:
    cfg = load_config(ROOT / "configs/cpu.yaml", [
        "train.batch_size=8", "optim.lr=3e-4", "train.cpu=false", "data.short_side=[96,112]", "data.crop=64",
        f"data.train={shard}", "eval.sequences=null", "log.run_name=demo"])
    assert (cfg.train.batch_size, cfg.optim.lr, cfg.train.cpu) == (8, 3e-4, False)
    assert cfg.data.short_side == [96, 112] and cfg.data.train == [str(shard)]
    assert cfg.eval.sequences is None and cfg.log.run_name == "demo"
    validate(cfg, 2)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs/ytvos.yaml", ["optim.lr=2e-4"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 2e-4


def test_unknown_key_on_command_line(shard: Path) -> None:
    msg = _error(None, [f"data.train={shard}", "train.batchsize=4"])
    assert msg.startswith("config key train.batchsize: unknown key") and "batch_size" in msg


def test_a_removed_key_says_what_replaced_it(shard: Path) -> None:
    msg = _error(None, [f"data.train={shard}", "data.shuffle_buffer=100"])
    assert msg.startswith("config key data.shuffle_buffer: removed:") and "distinct videos" in msg


def test_unknown_section(shard: Path) -> None:
    assert _error(None, ["trainer.batch_size=4"]).startswith("config key trainer.batch_size: unknown key")


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    assert _error(path, []).startswith("config key optim.learning_rate: unknown key")


def test_wrong_type_on_command_line() -> None:
    assert _error(None, ["train.batch_size=sixteen"]) == \
        "config key train.batch_size: expected int, got str 'sixteen'"


def test_wrong_type_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  short_side: [256, big]\n")
    assert _error(path, []) == "config key data.short_side[1]: expected int, got str 'big'"


def test_bad_choice(shard: Path) -> None:
    assert _error(None, [f"data.train={shard}", "train.mixed_precision=fp8"]) == \
        "config key train.mixed_precision: must be one of no, bf16, fp16, auto, got 'fp8'"


def test_batch_not_divisible_by_processes(shard: Path) -> None:
    msg = _error(None, [f"data.train={shard}", "train.batch_size=6", "data.videos_per_epoch=10"], world_size=4)
    assert msg == "config key train.batch_size: global batch 6 is not divisible by the number of processes 4"


def test_grid_larger_than_feature_map(shard: Path) -> None:
    msg = _error(None, [f"data.train={shard}", "data.crop=48", "data.short_side=[48,64]", "data.videos_per_epoch=1"])
    assert msg == ("config key loss.grid: grid 8 is larger than the feature map 6x6 "
                   "(data.crop 48 / model.output_stride 8)")


def test_missing_shard_path(tmp_path: Path) -> None:
    pattern = str(tmp_path / "shard-{000000..000001}.tar")
    (tmp_path / "shard-000000.tar").write_bytes(b"")
    msg = _error(None, [f"data.train={pattern}", "data.videos_per_epoch=1"])
    assert msg == f"config key data.train[0]: shard path {tmp_path / 'shard-000001.tar'} does not exist"


def test_no_shard_source() -> None:
    assert _error(None, ["data.videos_per_epoch=1"]) == "config key data.train: no shard source given"


def test_main_prints_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch, shard: Path) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["--config", str(ROOT / "configs/cpu.yaml"), "--run-dir", str(tmp_path / "run"),
                 f"data.train={shard}", "train.batch_size=3"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "error: config key train.batch_size: global batch 3 is not divisible by the number of processes 2"
    assert not (tmp_path / "run").exists()


def test_defaults_are_the_paper() -> None:
    cfg = Config()
    assert (cfg.loss.grid, cfg.loss.cv_grid, cfg.loss.tau, cfg.loss.cv_weight) == (8, 4, 0.05, 0.1)
    assert (cfg.optim.weight_decay, cfg.optim.bias_lr_mult, cfg.optim.betas) == (5e-4, 2.0, [0.5, 0.999])


def test_eval_defaults_are_the_propagation_and_evaluation_defaults():
    """The training-time evaluation defaults are dulearn.propagate's and dulearn.evaluate's, defined once."""
    import inspect

    from dulearn.config import EvalConfig
    from dulearn.evaluate import evaluate_davis
    from dulearn.propagate import PropSettings

    e, p, params = EvalConfig(), PropSettings(), inspect.signature(evaluate_davis).parameters
    assert (e.context, e.radius, e.temperature, e.topk) == (p.context, p.radius, p.temperature, p.topk)
    assert e.layer == params["layer"].default and e.input_size == params["input_size"].default
