"""The training loop: `accelerate launch dulearn/train.py --config configs/ytvos.yaml [key=value ...]`.

Also runs as `python dulearn/train.py` (one process), under `torchrun`, and in-process
through `train(cfg, run_dir)` (the SLURM launcher). Resumable (`--resume auto|PATH|none`),
checkpoints on SIGTERM/SIGUSR1/SIGUSR2 or `request_checkpoint()` at the next step boundary.
Between logging steps the host never waits for the device.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import random
import re
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import the package, not the sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from dulearn import distributed
from dulearn.checkpoint import (CheckpointWriteError, checkpoint_dir, load_file, load_latest, save_best,
                                save_checkpoint)
from dulearn.config import Config, ConfigError, load_config, save_config, steps_per_epoch, validate
from dulearn.logger import setup_logging
from dulearn.model import CheckpointMismatch, load_weights, random_model
from dulearn.monitor import Monitor, new_wandb_id, visualise
from dulearn.optim import backward_loss, build_optimizer, load_optimizer_state, lr_factor, step_unless
from dulearn.stepstats import LossTerms, NonFinite, Window

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
_checkpoint_requested = threading.Event()
logger = logging.getLogger("dulearn.train")  # also when run as a script (__main__)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; the last good state has been checkpointed."""


class DataSourceError(RuntimeError):
    """A rank's training data failed for good (a source down after retries, nothing readable);
    every rank stopped at the same step, checkpointed."""


GO, CHECKPOINT, DATA_FAILED = 0, 1, 2  # what the ranks agree on before each step (the largest wins)
_QUALIFIED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): ")


def one_line(error: BaseException) -> str:
    """An error as one line: a DataLoader worker's re-raised error keeps only its original message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and _QUALIFIED.match(lines[-1]):  # "Caught X in DataLoader worker ... Traceback ..."
        return _QUALIFIED.sub("", lines[-1])
    return lines[0] if lines else type(error).__name__


def next_batch(stream: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(the next batch, None) or (None, why the stream failed, in one line)."""
    try:
        return next(stream), None
    except Exception as e:  # noqa: BLE001 (reported by every rank, then the run stops cleanly)
        return None, one_line(e)


def request_checkpoint() -> None:
    """Ask the loop to checkpoint at the next step boundary and return (thread/signal safe)."""
    _checkpoint_requested.set()


def _on_signal(signum: int, frame: Any) -> None:
    """Signal handler: only sets the flag (the loop acts at the step boundary)."""
    request_checkpoint()


def _install_signal_handlers() -> dict[int, Any]:
    """Route stop signals to request_checkpoint; handlers a host installed (submitit) are kept."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS
            if signal.getsignal(sig) in (signal.SIG_DFL, None)}


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    """Put back the handlers train() replaced."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed from (seed, step, rank): the views and offsets of a step, exactly on resume."""
    digest = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of one step's theta and offsets on `device` (independent of history)."""
    g = torch.Generator(device=device)
    g.manual_seed(step_seed(seed, step, rank))
    return g


def _rng_state() -> dict[str, Any]:
    """This process's global RNG states (python, numpy, torch, CUDA), loadable with weights_only=True."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss,
                                                    gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restore what _rng_state saved."""
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def params_crc(model: torch.nn.Module) -> int:
    """CRC32 of all parameter bytes: equal on every rank iff the replicas are identical."""
    crc = 0
    for p in model.parameters():
        flat = p.detach().cpu().reshape(-1)  # [N], logical order: channels_last weights included
        crc = zlib.crc32(flat.view(torch.uint8).numpy().tobytes(), crc)
    return crc


def native_bf16(cpu: bool) -> bool:
    """Whether bf16 runs in hardware: a CUDA GPU with bf16 units, or a CPU with AVX512-BF16 or AMX.

    DULEARN_CPU_BF16=0 makes any CPU count as fp32-only (to test as on a CPU without bf16 units).
    """
    if not cpu:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if os.environ.get("DULEARN_CPU_BF16") == "0":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence the getattr
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(setting: str, cpu: bool) -> str:
    """train.mixed_precision with `auto` made concrete: bf16 where it is native, else no (fp32)."""
    if setting != "auto":
        return setting
    return "bf16" if native_bf16(cpu) else "no"


def make_accelerator(cfg: Config) -> Accelerator:
    """Accelerator: mixed precision from the config, CPU (gloo) where there is no GPU."""
    cpu = cfg.train.cpu or not torch.cuda.is_available()
    distributed.init_process_group(cpu)  # under torchrun: keys scoped to the restart attempt
    return Accelerator(
        mixed_precision=resolve_precision(cfg.train.mixed_precision, cpu),
        cpu=cpu,
        log_with="wandb" if cfg.log.wandb else None,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=distributed.TIMEOUT)],
    )


def _resume_state(run_dir: Path, resume: str | Path | None) -> dict[str, Any] | None:
    """The checkpoint to continue from: auto = latest usable one of the run, a path, or none."""
    if resume is None or str(resume) == "none":
        return None
    if str(resume) == "auto":
        found = load_latest(run_dir)
        return found[0] if found else None
    return load_file(resume)


def _build_loader(cfg: Config, accelerator: Accelerator, start_step: int) -> Any:
    """This rank's training stream from `start_step` (not passed through accelerator.prepare)."""
    from dulearn.data import build_train_loader

    d = cfg.data
    lo, hi = d.short_side[0], d.short_side[-1]
    return build_train_loader(
        d.train, batch_size=cfg.train.batch_size // accelerator.num_processes, clip_len=d.clip_len,
        frame_gap=d.frame_gap, short_side=(lo, hi), crop=d.crop, crop_mode=d.crop_mode, hflip=d.hflip,
        num_workers=d.num_workers, seed=cfg.train.seed, rank=accelerator.process_index,
        world_size=accelerator.num_processes, steps_per_epoch=steps_per_epoch(cfg), start_step=start_step,
        weights=d.weights, pin_memory=accelerator.device.type == "cuda")


@dataclass(frozen=True)
class Hook:
    """Periodic work of the loop: `run(frames, out)` after every `every`-th step, returns metrics."""

    name: str
    every: int
    run: Callable[[torch.Tensor, dict[str, Any]], dict[str, Any]]


class Trainer:
    """One training run: model, optimiser, schedule and counters; `run()` is the loop."""

    def __init__(self, cfg: Config, run_dir: Path, resume: str | Path | None):
        self.cfg, self.run_dir = cfg, run_dir
        self.accelerator = acc = make_accelerator(cfg)
        validate(cfg, acc.num_processes)
        self.world, self.rank, self.device = acc.num_processes, acc.process_index, acc.device
        if acc.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        state = _resume_state(run_dir, resume)
        torch.manual_seed(cfg.train.seed)
        model = random_model(cfg.model)
        if state is not None:
            load_weights(model, state["model"])
        if cfg.model.sync_bn and self.world > 1:
            if self.device.type == "cpu":
                raise ConfigError("config key model.sync_bn: SyncBatchNorm needs GPUs; set it to false on CPU")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        optimizer = build_optimizer(model, cfg.optim, fused=self.device.type in ("cpu", "cuda"))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.schedule))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.host_group = distributed.host_group()  # where the ranks agree on stop requests
        self.heartbeat = distributed.start_heartbeat()  # names a rank that died
        self.step, self.best_score = 0, -math.inf
        self.wandb_id = new_wandb_id() if cfg.log.wandb and acc.is_main_process else None
        nonfinite_total = 0
        if state is not None:
            nonfinite_total = self._load_state(state)
        self.nonfinite = NonFinite.start(self.device, nonfinite_total)
        logger.info(f"{self.world} process(es) on {self.device.type}, mixed precision {acc.mixed_precision}"
                    f" (train.mixed_precision={cfg.train.mixed_precision})")

    def _load_state(self, state: dict[str, Any]) -> int:
        """Optimiser, scheduler, scaler, counters and this rank's RNG state from a checkpoint; the non-finite total."""
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best_score = float(state.get("best_score", -math.inf))
        self.wandb_id = state.get("wandb_id") or self.wandb_id
        if state.get("data", {}).get("world_size", self.world) != self.world:
            logger.warning(f"resuming a run of {state['data']['world_size']} processes on {self.world}: the data "
                           "stream continues from the same step but not with the same clips")
        rng = state.get("rng") or []
        if len(rng) == self.world:
            _set_rng_state(rng[self.rank])
        else:
            logger.warning(f"checkpoint holds RNG states of {len(rng)} processes, this run has {self.world}; "
                           "keeping fresh RNG states (views and offsets are seeded per step anyway)")
        logger.info(f"resumed from step {self.step}")
        return int(state.get("nonfinite_total", 0))

    def _state(self) -> dict[str, Any]:
        """Everything a resume needs; RNG states of all ranks are gathered (collective)."""
        scaler = self.accelerator.scaler
        return {
            "model": self.accelerator.unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": self.step,
            "config": self.cfg.to_dict(),
            "rng": distributed.gather_objects(_rng_state()),
            "data": {"step": self.step, "seed": self.cfg.train.seed, "world_size": self.world},
            "wandb_id": self.wandb_id,
            "nonfinite_total": int(self.nonfinite.total.item()),
            "best_score": self.best_score,
        }

    def save(self) -> Path:
        """Checkpoint the current step (all ranks call; the main process writes; all raise if it failed)."""
        state = self._state()
        path = checkpoint_dir(self.run_dir) / f"step_{self.step:08d}.pt"
        error = None
        if self.accelerator.is_main_process:
            try:
                path = save_checkpoint(self.run_dir, state, self.cfg.train.keep_checkpoints)
            except CheckpointWriteError as e:
                error = str(e)
                logger.error(error)
        if distributed.any_rank(error is not None, self.host_group):  # also the barrier after the write
            raise CheckpointWriteError(error or "rank 0 could not write the checkpoint (see its log)")
        return path

    def run(self) -> dict[str, Any]:
        """Train until schedule.total_steps or a stop request; return how it ended.

        A step, top to bottom: schedule, data, what the ranks agree on before the step (on the
        host group: go, checkpoint and stop on a request, or stop on a failed data source),
        forward, the non-finite flag (agreed by all ranks on the device), backward, clip,
        optimiser step (skipped on the device where the flag is set), metrics (accumulated on
        the device), periodic hooks, a metrics line at logging steps (the one host sync),
        checkpoint. train.max_nonfinite is checked at logging steps (exact with log.every=1).
        A failed collective with a rank gone (the heartbeat) ends the run with PeerLost.
        """
        cfg, acc = self.cfg, self.accelerator
        status, last_saved, failure = "finished", self.step, None
        stream = monitor = None
        try:
            stream = self._open_stream()
            monitor = Monitor(acc, cfg, self.run_dir, self.step, self.wandb_id)
            hooks = self._hooks(monitor)
            window = Window(self.device)
            while self.step < cfg.schedule.total_steps:
                t0 = time.perf_counter()
                lr = self.scheduler.get_last_lr()[0]
                batch, failure = next_batch(stream)
                wait = time.perf_counter() - t0
                code = DATA_FAILED if failure else CHECKPOINT if _checkpoint_requested.is_set() else GO
                code = distributed.max_rank(code, self.host_group)  # every rank stops at the same step
                if code != GO:
                    status, failure = "checkpoint", self._data_failure(failure) if code == DATA_FAILED else None
                    break
                frames = batch["frames"].to(self.device, non_blocking=True)  # [B,T,3,H,W] uint8
                out = self._forward(frames)
                bad = distributed.reduce((~torch.isfinite(out["loss"].detach())).float(), "max")  # [] 0/1
                acc.backward(backward_loss(out["loss"], bad, scaled=acc.scaler is not None))
                grad_norm = self._clip()
                step_unless(self.optimizer, bad)
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step += 1

                self.nonfinite.add(bad)
                window.add(LossTerms.of(out), bad, self.nonfinite, grad_norm, batch=batch, wait_s=wait,
                           step_s=time.perf_counter() - t0, lr=lr)
                monitor.step(cfg.train.batch_size * window.steps / max(window.step_time_s, 1e-12))
                due = [hook for hook in hooks if self.step % hook.every == 0]  # the same on every rank
                extra: dict[str, Any] = {}
                for hook in due:
                    extra.update(hook.run(frames, out))
                if due or self.step % cfg.log.every == 0 or self.step == cfg.schedule.total_steps:
                    window = self._log(monitor, window, extra)
                if self.step % cfg.train.checkpoint_every == 0:
                    self.save()
                    last_saved = self.step
            if window.steps:  # stopped between logging steps: the rest of the window
                window = self._log(monitor, window, {})
            if last_saved != self.step:
                self.save()
        except (RuntimeError, OSError) as e:
            if self.heartbeat is None or isinstance(e, (NonFiniteLossError, CheckpointWriteError, DataSourceError)):
                raise
            lost = self.heartbeat.dead()  # a failed collective: is a peer gone?
            if lost.startswith("a collective failed but"):
                raise
            raise distributed.PeerLost(f"{lost}; stopping at step {self.step} (last checkpoint: step "
                                       f"{last_saved}; the run resumes from it)") from None
        finally:
            if monitor is not None:
                monitor.close()
            getattr(stream, "close", lambda: None)()  # stops the DataLoader workers
            if self.heartbeat is not None:
                self.heartbeat.stop()
        path = checkpoint_dir(self.run_dir) / f"step_{self.step:08d}.pt"
        if failure:
            raise DataSourceError(f"{failure}; stopped at step {self.step}, checkpoint {path}")
        logger.info(f"{status} at step {self.step}; checkpoint {path}")
        return {"status": status, "step": self.step, "checkpoint": str(path), "run_dir": str(self.run_dir),
                "nonfinite_steps": int(self.nonfinite.total.item()),
                "best_score": None if math.isinf(self.best_score) else self.best_score}

    def _open_stream(self) -> Any:
        """This rank's batches from the current step; a one-line DataSourceError where they cannot start."""
        try:
            return iter(_build_loader(self.cfg, self.accelerator, self.step))
        except (OSError, ValueError) as e:  # an unreachable index, a source without clips: one line, exit 1
            raise DataSourceError(f"cannot start the training data: {one_line(e)}") from None

    def _log(self, monitor: Monitor, window: Window, extra: dict[str, Any]) -> Window:
        """A metrics line of the window (one all-reduce); stops on too many non-finite steps; a fresh window."""
        metrics, longest_run = window.summary(self.nonfinite, self.cfg.train.batch_size,
                                              self.step / steps_per_epoch(self.cfg))
        monitor.log(self.step, {**metrics, **extra})
        if longest_run >= self.cfg.train.max_nonfinite:
            self._stop_nonfinite(longest_run)
        return Window(self.device)

    def _data_failure(self, mine: str | None) -> str:
        """Every rank's account of the data failure (all ranks call): the first one, naming its rank."""
        reports = distributed.gather_objects(mine)
        r, message = next((r, m) for r, m in enumerate(reports) if m)
        logger.error(f"rank {r}'s training data failed: {message}")
        return f"rank {r}'s training data failed: {message}"

    def _forward(self, frames: torch.Tensor) -> dict[str, Any]:
        """Both branches and the dense loss of one batch, with this step's seeded randomness."""
        from dulearn.branches import training_loss

        lc = self.cfg.loss
        gen = step_generator(self.cfg.train.seed, self.step, self.rank, self.device)
        return training_loss(self.model, frames, generator=gen, scale_min=lc.scale_min, grid=lc.grid,
                             cv_grid=lc.cv_grid, tau=lc.tau, cv_weight=lc.cv_weight)

    def _clip(self) -> torch.Tensor | None:
        """Clip the gradients to optim.grad_clip (if set); their norm before clipping, as a tensor."""
        if self.cfg.optim.grad_clip <= 0:
            return None
        return self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)

    def _stop_nonfinite(self, run: int) -> None:
        """Checkpoint (the non-finite steps did not update the weights) and raise."""
        path = self.save()
        raise NonFiniteLossError(
            f"stopping at step {self.step}: {run} non-finite losses in a row "
            f"(train.max_nonfinite={self.cfg.train.max_nonfinite}); the weights were not updated by them "
            f"and are saved in {path}; lower optim.lr or enable optim.grad_clip")

    def _hooks(self, monitor: Monitor) -> list[Hook]:
        """The periodic work this configuration asks for."""
        cfg, hooks = self.cfg, []
        if cfg.train.check_replicas_every > 0:
            hooks.append(Hook("replica check", cfg.train.check_replicas_every, lambda _, __: self._check_replicas()))
        if cfg.log.wandb and cfg.log.image_every > 0:
            hooks.append(Hook("wandb images", cfg.log.image_every, lambda frames, out: self._images(monitor, frames, out)))
        if cfg.eval.davis_root is not None:
            hooks.append(Hook("DAVIS evaluation", cfg.eval.every, lambda _, __: self._evaluate()))
        return hooks

    def _check_replicas(self) -> dict[str, Any]:
        """Raise if the ranks' weights differ; their CRCs for the metrics line."""
        crcs = distributed.gather_objects(params_crc(self.model))
        if len(set(crcs)) != 1:
            raise RuntimeError(f"replicas diverged at step {self.step}: parameter CRCs {crcs}")
        return {"replica_crc": crcs}

    def _images(self, monitor: Monitor, frames: torch.Tensor, out: dict[str, Any]) -> dict[str, Any]:
        """wandb images of the anchors, pseudo labels and assignment of clip 0 (main process)."""
        if self.accelerator.is_main_process:
            model = self.accelerator.unwrap_model(self.model)
            monitor.images(self.step, visualise(model, frames, out, self.cfg.loss.grid))
        return {}

    def _evaluate(self) -> dict[str, float]:
        """DAVIS evaluation split across the ranks (sequences[rank::world]), per-object scores gathered.

        No rank waits in a collective for more than one rank's share; every rank gets the
        same J&F (so the same best_score); the main process keeps best.pt when it improves.
        """
        from dulearn.evaluate import davis_videos, run as segment_videos
        from dulearn.metrics import Scores

        e, start = self.cfg.eval, time.perf_counter()
        model = self.accelerator.unwrap_model(self.model)
        distributed.broadcast_buffers(model)  # rank 0's BatchNorm statistics, as checkpoints keep them
        mine = davis_videos(e.davis_root, e.sequences)[self.rank::self.world]
        scores, _ = segment_videos(model, mine, video_format=None, layer=e.layer, device=str(self.device),
                                   input_size=e.input_size, context=e.context, radius=e.radius,
                                   temperature=e.temperature, topk=e.topk)  # restores train mode
        rows = {name: row for part in distributed.gather_objects(scores.rows) for name, row in part.items()}
        metrics = {f"eval/{k}": float(v) for k, v in Scores(rows).summary().items()}
        metrics["eval/seconds"] = time.perf_counter() - start
        score = metrics["eval/J&F-Mean"]
        if score > self.best_score:
            self.best_score = score  # the same on every rank: the same gathered scores
            if self.accelerator.is_main_process:
                save_best(self.run_dir, {"model": model.state_dict(), "config": self.cfg.to_dict(),
                                         "step": self.step, "score": score})
        return metrics if self.accelerator.is_main_process else {}


def train(cfg: Config, run_dir: str | Path, resume: str | Path | None = "auto") -> dict[str, Any]:
    """Train with `cfg` in `run_dir`; returns {"status": "finished" | "checkpoint", "step", ...}.

    Uses the torch.distributed environment (RANK, WORLD_SIZE, ...) when set, so a launcher can
    call it in-process. Stop signals are handled unless the host already installed handlers.
    """
    setup_logging()
    previous = _install_signal_handlers()
    try:
        result = Trainer(cfg, Path(run_dir), resume).run()
        distributed.shutdown()  # an orderly end of the group: a finished run exits 0 (no abort at exit)
        return result
    finally:
        _checkpoint_requested.clear()
        _restore_signal_handlers(previous)


def _parser() -> argparse.ArgumentParser:
    """Command-line arguments of dulearn/train.py."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (configs/*.yaml)")
    p.add_argument("--run-dir", help="run directory (default runs/<config name>)")
    p.add_argument("--resume", default="auto", help="auto (latest in the run dir), PATH, or none")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.batch_size=32 optim.lr=3e-4")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: load + validate the config, then train; one-line errors, exit 2 on bad config."""
    args = _parser().parse_args(argv)
    run_dir = Path(args.run_dir or Path("runs") / (Path(args.config).stem if args.config else "default"))
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        train(cfg, run_dir, args.resume)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except CheckpointMismatch as err:
        print(f"error: cannot resume: {err}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, DataSourceError, CheckpointWriteError, distributed.PeerLost) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
