"""Training-step benchmark: both branches, loss, backward and optimiser step (`training_loss`).

Each variant runs in a fresh process (so peak memory is its own); the baseline (fp32, no
channels_last, no compile) always runs first in the same invocation, and every variant is
reported relative to it.

    python tests/benchmarks/step.py --device cpu --batch 2 --frames 5 --crop 128 \
        --variants fp32+cl,bf16,bf16+cl
    python tests/benchmarks/step.py --device cuda --batch 16 --crop 256 --variants bf16+cl,bf16+cl+compile

A variant is a precision (fp32 | bf16, the latter as bf16 autocast) with optional `+cl`
(channels_last) and `+compile` (torch.compile of the network).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

BASELINE = "fp32"


def _parse_variant(spec: str) -> dict[str, object]:
    """'bf16+cl+compile' -> {'precision': 'bf16', 'channels_last': True, 'compile': True}."""
    precision, *flags = spec.split("+")
    if precision not in ("fp32", "bf16") or not set(flags) <= {"cl", "compile"}:
        raise SystemExit(f"bad variant {spec!r}: want fp32|bf16 with optional +cl, +compile")
    return {"precision": precision, "channels_last": "cl" in flags, "compile": "compile" in flags}


def run_one(args: argparse.Namespace, spec: str) -> dict[str, object]:
    """Time `args.steps` training steps of one variant after `args.warmup` untimed ones."""
    import torch

    from dulearn.branches import training_loss
    from dulearn.config import OptimConfig
    from dulearn.model import DenseNet
    from dulearn.optim import build_optimizer

    variant = _parse_variant(spec)
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DenseNet(feat_dim=128, channels_last=variant["channels_last"]).to(device).train()
    net = torch.compile(model) if variant["compile"] else model
    optim = build_optimizer(model, OptimConfig(lr=1e-4))  # the training's: fused Adam, betas (0.5, 0.999)
    shape = (args.batch, args.frames, 3, args.crop, args.crop)
    frames = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)  # [B,T,3,H,W]
    generator = torch.Generator(device).manual_seed(0)
    use_bf16 = variant["precision"] == "bf16"

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = training_loss(net, frames, generator=generator)
        optim.zero_grad(set_to_none=True)
        out["loss"].backward()
        optim.step()
        return out["loss"].detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS
    return {
        "variant": spec,
        "steps_per_s": args.steps / seconds,
        "clips_per_s": args.steps * args.batch / seconds,
        "peak_mb": peak_mb,
        "loss": float(loss),
    }


def _child(args: argparse.Namespace, spec: str) -> dict[str, object]:
    """Run one variant in a fresh interpreter and return its JSON result."""
    cmd = [sys.executable, __file__, "--one", spec] + [
        f"--{k}={v}" for k, v in vars(args).items() if k not in ("one", "variants") and v is not None
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"variant {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2, help="clips per step (B)")
    parser.add_argument("--frames", type=int, default=5, help="frames per clip (T)")
    parser.add_argument("--crop", type=int, default=128, help="square crop side")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--variants", default="bf16,fp32+cl,bf16+cl", help="comma list besides the fp32 baseline")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args, args.one)))
        return 0

    specs = [BASELINE] + [s for s in args.variants.split(",") if s and s != BASELINE]
    for spec in specs:
        _parse_variant(spec)
    print(f"device={args.device} B={args.batch} T={args.frames} crop={args.crop} "
          f"steps={args.steps} warmup={args.warmup}")
    print(f"{'variant':<20}{'steps/s':>10}{'clips/s':>10}{'peak MB':>10}{'x base':>8}{'loss':>9}")
    base = None
    for spec in specs:
        r = _child(args, spec)
        base = base or r["steps_per_s"]
        print(f"{spec:<20}{r['steps_per_s']:>10.3f}{r['clips_per_s']:>10.3f}{r['peak_mb']:>10.0f}"
              f"{r['steps_per_s'] / base:>8.2f}{r['loss']:>9.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
