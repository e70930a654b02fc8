"""Benchmark: steps/s and data-wait fraction of the real training loop with the real stream.

    python tests/benchmarks/train_loop.py                 # CPU: 2 processes (gloo), 128px crops
    python tests/benchmarks/train_loop.py --paper --nproc 1   # GPU: B=16, T=5, 256px (paper)

Shards are built from ../shared/data/train-videos (or --shards DIR/index.json). The baseline,
measured in the same run, is the bare step (training_loss + backward + optimiser step on a
fixed in-memory batch of one rank's size) run in --nproc independent processes at once (so
it competes for the cores as the ranks do): the loop's step time over it is the cost of the
stream, DDP and logging.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
VIDEOS = ROOT.parent / "shared" / "data" / "train-videos"


def parse_args() -> argparse.Namespace:
    """Benchmark settings (--paper: the paper's batch, clip length and crop)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2, help="training processes")
    p.add_argument("--batch", type=int, default=4, help="global batch (clips per step)")
    p.add_argument("--clip-len", type=int, default=5)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="loop steps (the first --warmup are not timed)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=2, help="dataloader workers per process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    p.add_argument("--paper", action="store_true", help="B=16, T=5, 256px crops, short side [256,320]")
    p.add_argument("--shards", type=Path, help="index.json of prebuilt shards (default: build from train-videos)")
    p.add_argument("--compare", metavar="REF", help="also run the loop of git ref REF, alternating with this "
                   "checkout --rounds times (before vs after in one run)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--log-every", type=int, default=1, help="log.every of the runs (the loop syncs only there)")
    args = p.parse_args()
    if args.paper:
        args.batch, args.clip_len, args.crop = 16, 5, 256
    return args


def build_shards(out: Path, short_side: int) -> Path:
    """Shards of the 30 DAVIS training videos at the stream's largest short side."""
    cmd = [sys.executable, "shards/build.py", "videos", str(VIDEOS), "--out", str(out), "--short-side",
           str(short_side), "--clip-len", "24", "--shard-clips", "8", "--workers", str(os.cpu_count() or 1)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return out / "index.json"


def baseline(args: argparse.Namespace, device: torch.device) -> float:
    """Seconds per bare step of one rank (no stream, no DDP, no logging)."""
    from dulearn.branches import training_loss
    from dulearn.config import OptimConfig
    from dulearn.model import DenseNet
    from dulearn.optim import build_optimizer
    from dulearn.train import step_generator

    torch.set_num_threads(args.threads)
    model = DenseNet().to(device).train()
    opt = build_optimizer(model, OptimConfig(lr=1e-4))
    b = args.batch // args.nproc
    frames = torch.randint(0, 256, (b, args.clip_len, 3, args.crop, args.crop), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)  # [B,T,3,H,W]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    times = []
    for step in range(args.warmup + 10):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = training_loss(model, frames, generator=step_generator(0, step, 0, device))
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sum(times[args.warmup:]) / len(times[args.warmup:])


def run_loop(args: argparse.Namespace, index: Path, run_dir: Path, root: Path = ROOT) -> list[dict]:
    """The real loop (of the tree `root`) under torchrun; returns its metrics lines."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    short = [args.crop, args.crop + args.crop // 4]
    overrides = [f"data.train=[{index}]", f"data.short_side=[{short[0]},{short[1]}]", f"data.crop={args.crop}",
                 f"data.clip_len={args.clip_len}", f"data.num_workers={args.workers}",
                 "data.videos_per_epoch=30", f"train.batch_size={args.batch}", f"schedule.total_steps={args.steps}",
                 f"train.checkpoint_every={args.steps}", f"log.every={args.log_every}", "log.progress=false",
                 f"train.mixed_precision={args.mixed_precision}", f"train.cpu={not torch.cuda.is_available()}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port",
           str(port), "dulearn/train.py", "--config", "configs/cpu.yaml", "--run-dir", str(run_dir), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), WANDB_MODE="offline")
    subprocess.run(cmd, cwd=root, check=True, env={**env, "PYTHONPATH": str(root)})
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_time(lines: list[dict], warmup: int, every: int) -> float:
    """Mean step seconds of the metrics lines after the first `warmup` steps."""
    timed = [m for m in lines if m["step"] > warmup]
    return sum(m["step_time_s"] for m in timed) / len(timed)


def compare(args: argparse.Namespace) -> None:
    """This checkout's loop vs REF's on the same shards, alternating (before, after, before, ...)."""
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        before.mkdir()
        archive = subprocess.run(["git", "archive", args.compare], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
        index = args.shards or build_shards(Path(tmp) / "shards", args.crop + args.crop // 4)
        times: dict[str, list[float]] = {args.compare: [], "this checkout": []}
        for r in range(args.rounds):
            for name, root in ((args.compare, before), ("this checkout", ROOT)):
                lines = run_loop(args, index, Path(tmp) / f"run-{r}-{name.replace(' ', '-')}", root)
                times[name].append(step_time(lines, args.warmup, args.log_every))
                print(f"round {r}: {name:>14}: {times[name][-1] * 1e3:8.1f} ms/step", flush=True)
    old, new = (sum(t) / len(t) for t in times.values())
    print(f"{args.nproc} processes, global batch {args.batch}, T={args.clip_len}, {args.crop}px, log.every "
          f"{args.log_every}: {args.compare} {old * 1e3:.1f} ms/step, this checkout {new * 1e3:.1f} ms/step "
          f"({old / new:.3f}x)")


def main() -> None:
    """Build shards, run the loop, run the baseline, print the figures."""
    args = parse_args()
    if args.compare:
        return compare(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        index = args.shards or build_shards(Path(tmp) / "shards", args.crop + args.crop // 4)
        lines = run_loop(args, index, Path(tmp) / "run")[args.warmup:]
        with ProcessPoolExecutor(args.nproc, mp_context=mp.get_context("spawn")) as pool:
            bases = list(pool.map(baseline, [args] * args.nproc, [device] * args.nproc))
        base = sum(bases) / len(bases)
    step = step_time(lines, 0, args.log_every)
    wait = sum(m["data_wait_s"] for m in lines) / len(lines)
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{os.cpu_count()}-core CPU"
    print(f"machine: {machine}; {args.nproc} processes, global batch {args.batch}, T={args.clip_len}, "
          f"{args.crop}px crops, {args.workers} workers/process, {args.threads} thread(s)/process, "
          f"precision {args.mixed_precision}; {len(lines)} timed steps")
    print(f"baseline bare step ({args.nproc} x 1 process, {args.batch // args.nproc} clips): {base * 1e3:8.1f} ms  "
          f"{1 / base:6.2f} steps/s")
    print(f"real loop ({args.nproc} processes, stream, DDP):   {step * 1e3:8.1f} ms  {1 / step:6.2f} steps/s  "
          f"{args.batch / step:6.2f} clips/s")
    print(f"data wait: {wait * 1e3:.1f} ms/step = {wait / step:.1%} of the step; loop/baseline = {step / base:.2f}x")


if __name__ == "__main__":
    main()
