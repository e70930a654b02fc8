"""Training configuration: typed sections, YAML + `key=value` overrides, validation.

Every error is a `ConfigError` whose one-line message names the offending key, raised
before anything (processes, data, model) starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dulearn.model import EVAL_LAYER, LAYERS
from dulearn.propagate import PropSettings


class ConfigError(ValueError):
    """A bad configuration value; the message is one line and names the key."""


@dataclass
class DataConfig:
    """The training stream (dulearn.data.build_train_loader)."""

    train: list[str] = field(default_factory=list)  # index.json paths, brace patterns, URLs, pipe:
    weights: list[float] | None = None  # mixing weights of the sources
    clip_len: int = 5
    frame_gap: int = 2
    short_side: list[int] = field(default_factory=lambda: [256, 320])  # [min, max] random resize
    crop: int = 256
    crop_mode: str = "random"  # random | center
    hflip: bool = False
    num_workers: int = 4
    videos_per_epoch: int = 0  # documentation of the epoch: one clip per training video
    steps_per_epoch: int = 0  # 0 = ceil(videos_per_epoch / train.batch_size)


@dataclass
class ModelConfig:
    """The feature network (dulearn.model.DenseNet)."""

    feat_dim: int = 128
    output_stride: int = 8
    channels_last: bool = False
    sync_bn: bool = False
    zero_init_residual: bool = False  # residual blocks start as the identity (no early dip; docs/method.md, Model)


@dataclass
class LossConfig:
    """The dense loss (docs/method.md, Loss) and the view sampling."""

    grid: int = 8
    cv_grid: int = 4
    tau: float = 0.05
    cv_weight: float = 0.1
    scale_min: float = 0.5


@dataclass
class OptimConfig:
    """Optimiser of the original release: decay on weights, none on biases, biases at 2x lr."""

    name: str = "adam"  # adam | sgd
    lr: float = 1e-4
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    momentum: float = 0.9
    bias_lr_mult: float = 2.0
    grad_clip: float = 0.0  # max gradient norm; 0 = off


@dataclass
class ScheduleConfig:
    """Step LR schedule in optimiser steps, with an optional linear warm-up."""

    total_steps: int = 1000
    lr_step: int = 0  # multiply the lr by lr_gamma every lr_step steps; 0 = constant
    lr_gamma: float = 0.5
    warmup_steps: int = 0


@dataclass
class TrainConfig:
    """Batch, precision, checkpointing and failure handling."""

    batch_size: int = 16  # global: clips per step over all processes
    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16 | auto (bf16 where the hardware runs it natively)
    cpu: bool = False  # force CPU even where a GPU exists
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    max_nonfinite: int = 20  # stop after this many non-finite losses in a row
    check_replicas_every: int = 0  # compare a checksum of the weights across ranks; 0 = off


@dataclass
class LogConfig:
    """metrics.jsonl, progress bar, wandb."""

    every: int = 20
    progress: bool = True
    wandb: bool = False
    project: str = "dulearn"
    entity: str | None = None
    run_name: str | None = None
    image_every: int = 500  # wandb images every K steps; 0 = off


@dataclass
class EvalConfig:
    """Periodic DAVIS evaluation (dulearn.evaluate.evaluate_davis); off without davis_root."""

    davis_root: str | None = None
    every: int = 0
    sequences: list[str] | None = None
    layer: str = EVAL_LAYER
    input_size: int = 0  # short side of the evaluated frames; 0 = full resolution (480p)
    # label propagation (dulearn.propagate; its defaults are the paper's)
    context: int = PropSettings.context  # previous frames besides the first
    radius: float = PropSettings.radius  # spatial radius of the neighbours, in feature cells
    temperature: float = PropSettings.temperature
    topk: int = PropSettings.topk


@dataclass
class Config:
    """The whole training configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a plain nested dict (for checkpoints, YAML and wandb)."""
        return dataclasses.asdict(self)


CHOICES = {
    "data.crop_mode": ("random", "center"),
    "optim.name": ("adam", "sgd"),
    "train.mixed_precision": ("no", "bf16", "fp16", "auto"),
    "model.output_stride": (4, 8),
    "eval.layer": LAYERS,
}


def _type_name(tp: Any) -> str:
    """A short human name of a field type (`int`, `list[str]`, `float or null`)."""
    args = typing.get_args(tp)
    if _is_optional(tp):
        return f"{_type_name(next(a for a in args if a is not type(None)))} or null"
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(args[0])}]"
    return getattr(tp, "__name__", str(tp))


def _is_optional(tp: Any) -> bool:
    """True for `X | None` field types."""
    return isinstance(tp, types.UnionType) and type(None) in typing.get_args(tp)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` (from YAML or a `key=value` string) to the field type, or raise.

    Not pydantic (here only as wandb's dependency): its lax mode does not read the overrides'
    `[a,b]` and `null` strings as YAML, and its errors are several lines that name no config key.
    """
    bad = ConfigError(f"config key {key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if _is_optional(tp):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(key, value, next(a for a in typing.get_args(tp) if a is not type(None)))
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else [value]
            value = parsed if isinstance(parsed, list) else [value]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(f"{key}[{i}]", v, typing.get_args(tp)[0]) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise bad
    if tp in (int, float):  # numbers from YAML, or strings from key=value overrides; never bools
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int) or (tp is float and isinstance(value, float)):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise TypeError(f"config key {key}: unsupported field type {tp}")


def _field_types(section: Any) -> dict[str, Any]:
    """Field name -> resolved type of a config dataclass."""
    return typing.get_type_hints(type(section))


# Keys that existed once: an error that says what replaced them rather than "unknown key".
REMOVED = {"data.shuffle_buffer": "the stream draws distinct videos per global batch from per-epoch "
                                  "permutations (dulearn.sampler); there is no shuffle buffer any more: delete it"}


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set `section.name` to `value` converted to the field's type; unknown keys raise."""
    if key in REMOVED:
        raise ConfigError(f"config key {key}: removed: {REMOVED[key]}")
    parts = key.split(".")
    sections = _field_types(cfg)
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(f"config key {key}: unknown key (sections: {', '.join(sections)})")
    section = getattr(cfg, parts[0])
    types_ = _field_types(section)
    if parts[1] not in types_:
        raise ConfigError(f"config key {key}: unknown key (section {parts[0]} has: {', '.join(types_)})")
    setattr(section, parts[1], _coerce(key, value, types_[parts[1]]))


def from_dict(tree: dict[str, Any], cfg: Config | None = None) -> Config:
    """Apply a nested dict (YAML layout: section -> key -> value) onto a config."""
    cfg = cfg or Config()
    if not isinstance(tree, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(tree).__name__}")
    for name, values in tree.items():
        if not isinstance(values, dict):
            raise ConfigError(f"config key {name}: unknown key or not a section (sections: "
                              f"{', '.join(_field_types(cfg))})")
        for key, value in values.items():
            set_value(cfg, f"{name}.{key}", value)
    return cfg


def parse_override(text: str) -> tuple[str, str]:
    """Split a command-line `section.key=value` override."""
    if "=" not in text:
        raise ConfigError(f"config override {text!r}: expected section.key=value")
    key, value = text.split("=", 1)
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file, then `key=value` overrides (strings coerced to the field type)."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        from_dict(yaml.safe_load(path.read_text()) or {}, cfg)
    for text in overrides:
        set_value(cfg, *parse_override(text))
    return cfg


def _local_shard_paths(source: str) -> list[str]:
    """The local files a data source names (nothing for URLs and pipes)."""
    if source.startswith("pipe:") or "://" in source:
        return []
    from braceexpand import braceexpand

    return list(braceexpand(source))


def _check_positive(cfg: Config, keys: typing.Iterable[str]) -> None:
    """Each `section.key` must be > 0."""
    for key in keys:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) <= 0:
            raise ConfigError(f"config key {key}: must be > 0, got {getattr(getattr(cfg, section), name)}")


def validate(cfg: Config, world_size: int = 1, *, check_paths: bool = True) -> None:
    """Check the values against each other and the number of processes; raise ConfigError."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"config key {key}: must be one of {', '.join(map(str, allowed))}, got {value!r}")
    _check_positive(cfg, ("train.batch_size", "schedule.total_steps", "data.clip_len", "data.frame_gap",
                          "data.crop", "loss.grid", "loss.cv_grid", "loss.tau", "log.every",
                          "train.checkpoint_every", "train.keep_checkpoints", "train.max_nonfinite",
                          "eval.context", "eval.radius", "eval.temperature", "eval.topk"))
    b = cfg.train.batch_size
    if b % world_size:
        raise ConfigError(f"config key train.batch_size: global batch {b} is not divisible by the "
                          f"number of processes {world_size}")
    feat = cfg.data.crop // cfg.model.output_stride
    for key, grid in (("loss.grid", cfg.loss.grid), ("loss.cv_grid", cfg.loss.cv_grid)):
        if grid > feat:
            raise ConfigError(f"config key {key}: grid {grid} is larger than the feature map "
                              f"{feat}x{feat} (data.crop {cfg.data.crop} / model.output_stride "
                              f"{cfg.model.output_stride})")
    if len(cfg.data.short_side) not in (1, 2) or min(cfg.data.short_side) < cfg.data.crop:
        raise ConfigError(f"config key data.short_side: expected [min, max] >= data.crop "
                          f"{cfg.data.crop}, got {cfg.data.short_side}")
    if cfg.data.steps_per_epoch <= 0 and cfg.data.videos_per_epoch <= 0:
        raise ConfigError("config key data.steps_per_epoch: set it or data.videos_per_epoch (> 0)")
    if cfg.optim.lr <= 0 or len(cfg.optim.betas) != 2:
        key = "optim.lr" if cfg.optim.lr <= 0 else "optim.betas"
        raise ConfigError(f"config key {key}: got {getattr(cfg.optim, key.split('.')[1])!r}")
    if cfg.data.weights is not None and len(cfg.data.weights) != len(cfg.data.train):
        raise ConfigError(f"config key data.weights: {len(cfg.data.weights)} weights for "
                          f"{len(cfg.data.train)} sources in data.train")
    if cfg.eval.davis_root is not None and cfg.eval.every <= 0:
        raise ConfigError("config key eval.every: must be > 0 when eval.davis_root is set")
    if check_paths:
        _validate_paths(cfg)


def _validate_paths(cfg: Config) -> None:
    """Data sources and the DAVIS root must exist (URLs and pipes are not checked)."""
    if not cfg.data.train:
        raise ConfigError("config key data.train: no shard source given")
    for i, source in enumerate(cfg.data.train):
        for path in _local_shard_paths(source):
            if not Path(path).exists():
                raise ConfigError(f"config key data.train[{i}]: shard path {path} does not exist")
    if cfg.eval.davis_root is not None and not Path(cfg.eval.davis_root).is_dir():
        raise ConfigError(f"config key eval.davis_root: {cfg.eval.davis_root} is not a directory")


def steps_per_epoch(cfg: Config) -> int:
    """Steps of one epoch: data.steps_per_epoch, else one clip per video at the global batch."""
    if cfg.data.steps_per_epoch > 0:
        return cfg.data.steps_per_epoch
    return math.ceil(cfg.data.videos_per_epoch / cfg.train.batch_size)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved configuration as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
