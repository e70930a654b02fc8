"""The main job on an embedded default: shards -> a few minutes of training -> J&F vs random init.

    python -m dulearn.demo                  # synthetic video (no download), CPU, or the GPU if any
    python -m dulearn.demo --data real      # ../shared/data: train-videos shards, davis-mini eval

Synthetic: `dulearn.synthetic` videos (seed `--seed`) become shards, and held-out sequences
(other seeds) with exact masks become a DAVIS-layout evaluation set. The network trains for
`--steps` steps (or until `--minutes` have passed), then the trained network and the same
network at its random initialisation segment the held-out sequences by label propagation;
the demo prints J&F of both, the paths of the overlay videos and a ready `dulearn segment`
command on one held-out video with the trained checkpoint. Everything lives under
`--out`; a rerun with the same settings reuses the data and the finished run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from dulearn import synthetic
from dulearn.config import Config, load_config
from dulearn.evaluate import davis_videos, evaluate_davis
from dulearn.logger import setup_logging
from dulearn.model import DenseNet, load_weights, random_model
from dulearn.shard_format import INDEX_NAME
from dulearn.train import request_checkpoint, train

EVAL_SEED_OFFSET = 1_000_003  # held-out sequences: a seed far from any training seed
MIN_STEPS = 25  # the fewest steps at which the recipe has been measured above its random init (README)
logger = logging.getLogger("dulearn.demo")  # also under python -m (__main__)


def default_shared() -> Path:
    """../shared beside the checkout (or $DULEARN_SHARED), where the real data lives."""
    return Path(os.environ.get("DULEARN_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def build_shards(source: str, root: str | Path, out: Path, *, short_side: int, clip_len: int, workers: int) -> Path:
    """Run the shard builder once (a finished build is reused); returns index.json.

    It runs as its own process (``python -m shards.build``): the builder uses dulearn, and
    dulearn never imports it.
    """
    index = out / INDEX_NAME
    if not index.is_file():
        argv = [source, str(root), "--out", str(out), "--short-side", str(short_side),
                "--clip-len", str(clip_len), "--min-clip-len", str(clip_len), "--workers", str(workers)]
        if subprocess.run([sys.executable, "-m", "shards.build", *argv]).returncode != 0:
            raise RuntimeError(f"shard build failed: python shards/build.py {' '.join(argv)}")
    return index


def synthetic_data(a: argparse.Namespace) -> tuple[Path, Path]:
    """Training shards and the held-out DAVIS set from the generator -> (index.json, DAVIS root)."""
    h, w = a.train_size
    spec = f"seed={a.seed},videos={a.videos},frames={a.frames},size={h}x{w}"
    index = build_shards("synthetic", spec, a.out / "data" / f"shards-{spec.replace(',', '-')}",
                         short_side=min(h, w), clip_len=a.frames, workers=a.workers)
    eh, ew = a.eval_size
    seed = a.seed + EVAL_SEED_OFFSET
    root = a.out / "data" / f"davis-seed={seed}-n={a.eval_sequences}-f={a.eval_frames}-{eh}x{ew}"
    if not (root / "ImageSets/2017/val.txt").is_file():
        synthetic.write_davis(root, sequences=a.eval_sequences, frames=a.eval_frames, size=(eh, ew), seed=seed)
    return index, root


def real_data(a: argparse.Namespace) -> tuple[Path, Path]:
    """Shards of ../shared/data/train-videos and the davis-mini evaluation set."""
    data = a.shared / "data"
    videos, davis = data / "train-videos", data / "davis-mini"
    for need in (videos, davis):
        if not need.is_dir():
            raise FileNotFoundError(f"--data real needs {need} (the shared test data beside the checkout)")
    short = train_short_side(a)
    index = build_shards("videos", videos, a.out / "data" / f"shards-train-videos-{short + short // 4}",
                         short_side=short + short // 4, clip_len=20, workers=a.workers)
    return index, davis


def train_short_side(a: argparse.Namespace) -> int:
    """Short side training frames are resized to (at most 1.25x more): crops keep objects large."""
    return max(a.crop, min(a.train_size)) if a.data == "synthetic" else 2 * a.crop


def make_config(a: argparse.Namespace, index: Path, device: str) -> Config:
    """The demo's training configuration (configs/cpu.yaml's recipe at the demo's size)."""
    videos = a.videos if a.data == "synthetic" else 30
    short = train_short_side(a)
    return load_config(None, [
        f"data.train=[{index}]", f"data.short_side=[{short},{short + short // 4}]", f"data.crop={a.crop}",
        "data.clip_len=5", "data.frame_gap=2", f"data.num_workers={a.loader_workers}",
        f"data.videos_per_epoch={videos}", f"loss.grid={min(8, a.crop // 16)}", f"loss.cv_grid={min(4, a.crop // 32)}",
        f"optim.lr={a.lr}", f"schedule.total_steps={a.steps}", f"schedule.lr_step={max(1, a.steps // 2)}",
        f"train.batch_size={a.batch_size}", f"train.seed={a.seed}", f"train.cpu={str(device == 'cpu').lower()}",
        f"train.mixed_precision={a.precision}", "model.channels_last=true", "model.zero_init_residual=true",
        f"train.checkpoint_every={a.steps}", "train.keep_checkpoints=1", f"log.every={max(1, a.steps // 20)}",
        "log.image_every=0", "log.wandb=false",
    ])


def _run_dir(a: argparse.Namespace, cfg: Config) -> Path:
    """Run folder named by the config's hash: reruns with the same settings reuse the run."""
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:10]
    return a.out / "runs" / f"{a.data}-{digest}"


def train_with_deadline(cfg: Config, run_dir: Path, minutes: float) -> dict[str, Any]:
    """Train; after `minutes` ask the loop to checkpoint and stop at the next step boundary."""
    timer = threading.Timer(minutes * 60, request_checkpoint) if minutes > 0 else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        return train(cfg, run_dir, resume="auto")
    finally:
        if timer is not None:
            timer.cancel()


def networks(cfg: Config, checkpoint: Path) -> dict[str, DenseNet]:
    """{'random init': the network as training initialised it, 'trained': after training}."""
    torch.manual_seed(cfg.train.seed)  # the training loop seeds the same way before building the model
    init, trained = random_model(cfg.model), random_model(cfg.model)
    load_weights(trained, torch.load(checkpoint, map_location="cpu", weights_only=False)["model"])
    return {"random init": init.eval(), "trained": trained.eval()}


def evaluate_both(nets: dict[str, DenseNet], root: Path, out: Path, device: str, input_size: int) -> dict[str, dict]:
    """J&F of every network on the held-out DAVIS set; overlay videos under out/<name>/videos."""
    results = {}
    for name, net in nets.items():
        folder = out / name.replace(" ", "-")
        summary = evaluate_davis(net.to(device), root, device=device, out_dir=folder, video_format="mp4",
                                 input_size=input_size)
        results[name] = {k: summary[k] for k in ("J&F-Mean", "J-Mean", "F-Mean")} | {"videos": str(folder / "videos")}
    return results


def report(results: dict[str, dict], run: dict[str, Any], seconds: float, steps: int) -> str:
    """The printed table: J&F, J and F of each network, where the overlay videos are, and budget warnings."""
    lines = [f"{'network':<24}{'J&F-Mean':>10}{'J-Mean':>9}{'F-Mean':>9}   overlay videos"]
    for name, r in results.items():
        label = f"{name} ({run['step']} steps)" if name == "trained" else name
        lines.append(f"{label:<24}{100 * r['J&F-Mean']:>10.1f}{100 * r['J-Mean']:>9.1f}{100 * r['F-Mean']:>9.1f}   {r['videos']}")
    gain = 100 * (results["trained"]["J&F-Mean"] - results["random init"]["J&F-Mean"])
    lines.append(f"trained - random init: {gain:+.1f} J&F points; checkpoint {run['checkpoint']}; {seconds / 60:.1f} min")
    return "\n".join(lines + budget_warnings(run["step"], steps))


def budget_warnings(done: int, planned: int) -> list[str]:
    """What the verdict is worth when the time box stopped training early (nothing when it did not)."""
    if done >= planned:
        return []
    lines = [f"note: the time box (--minutes) stopped training at step {done} of {planned}; the same command "
             f"continues from step {done}, and --minutes 0 trains all {planned} steps"]
    if done < MIN_STEPS:
        lines.append(f"WARNING: {done} steps are fewer than the {MIN_STEPS} this recipe needs to pass its random "
                     "init: the verdict above says nothing about the method yet")
    return lines


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dulearn.demo", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--data", choices=("synthetic", "real"), default="synthetic")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for data, run and results")
    p.add_argument("--shared", type=Path, default=default_shared(), help="the shared data folder (--data real)")
    p.add_argument("--steps", type=int, default=200, help="training steps (the LR halves at half of them)")
    p.add_argument("--minutes", type=float, default=12.0,
                   help="stop training after this long (0 = no limit); 200 steps take about 8 min on 2 CPU "
                        "cores in fp32, 2-4 min with bf16 units; the table warns when it stopped training early")
    p.add_argument("--batch-size", type=int, default=4, help="clips per step")
    p.add_argument("--crop", type=int, default=128, help="training crop side (pixels)")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
    p.add_argument("--precision", choices=("auto", "no", "bf16"), default="auto",
                   help="bf16 autocast (2x on CPUs with AVX512-BF16, 4x with AMX); auto = bf16 where native, else fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--videos", type=int, default=32, help="synthetic training videos")
    p.add_argument("--frames", type=int, default=32, help="frames per synthetic training video")
    p.add_argument("--train-size", type=synthetic.parse_hw, default=(160, 160), help="HxW of synthetic training video")
    p.add_argument("--eval-sequences", type=int, default=6, help="held-out synthetic sequences")
    p.add_argument("--eval-frames", type=int, default=32, help="frames per held-out sequence")
    p.add_argument("--eval-size", type=synthetic.parse_hw, default=(192, 256), help="HxW of held-out synthetic sequences")
    p.add_argument("--eval-input-size", type=int, default=0,
                   help="evaluate at this short side (0 = as stored; --data real defaults to 240)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 2) - 1)), help="shard build processes")
    p.add_argument("--loader-workers", type=int, default=1, help="data loader worker processes")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns {'results': {network: scores}, 'run': train()'s dict, 'report': text}."""
    a = parser().parse_args(argv)
    setup_logging()
    start = time.perf_counter()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if a.data == "real" and a.eval_input_size == 0:
        a.eval_input_size = 240
    a.out.mkdir(parents=True, exist_ok=True)
    logger.info(f"data: {a.data}; device: {device}; output: {a.out}")
    index, davis_root = synthetic_data(a) if a.data == "synthetic" else real_data(a)
    cfg = make_config(a, index, device)
    run_dir = _run_dir(a, cfg)
    limit = f"at most {a.minutes:g} min" if a.minutes > 0 else "no time limit"
    logger.info(f"training {a.steps} steps ({limit}) in {run_dir}")
    run = train_with_deadline(cfg, run_dir, a.minutes)
    return evaluate_and_report(a, cfg, run, davis_root, device, start)


def evaluate_and_report(a: argparse.Namespace, cfg: Config, run: dict[str, Any], davis_root: Path, device: str,
                        start: float) -> dict[str, Any]:
    """The demo's ending: J&F of both networks, the table, and a ready `dulearn segment` command."""
    logger.info(f"evaluating on {davis_root}")
    results = evaluate_both(networks(cfg, Path(run["checkpoint"])), davis_root, a.out / "eval", device,
                            a.eval_input_size)
    text = report(results, run, time.perf_counter() - start, a.steps)
    print(text, flush=True)  # the result table: stdout, for a pipe
    (a.out / "eval" / "demo.json").write_text(json.dumps({"results": results, "run": run}, indent=2, default=str))
    command = segment_command(davis_root, Path(run["checkpoint"]), a.out / "segment", device, a.eval_input_size)
    print(f"segment a held-out video with the trained network (masks, overlay and side-by-side mp4):\n  {command}",
          flush=True)
    return {"results": results, "run": run, "report": text, "segment": command}


def segment_command(root: Path, checkpoint: Path, out: Path, device: str, input_size: int) -> str:
    """A ready `dulearn segment` command line: the first sequence of `root` with `checkpoint`, as the demo evaluated it."""
    video = davis_videos(root)[0]
    program = ["dulearn"] if shutil.which("dulearn") else [sys.executable, "-m", "dulearn"]
    return shlex.join([*program, "segment", str(video.frames[0].parent.resolve()),
                       "--mask", str(video.annotations[0].resolve()), "--checkpoint", str(checkpoint.resolve()),
                       "--out", str((out / video.name).resolve()), "--input-size", str(input_size), "--device", device])


if __name__ == "__main__":
    main()
