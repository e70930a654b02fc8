"""The demo's recipe as a learning curve: held-out J&F at chosen steps against the random init.

    python tests/benchmarks/learning_curve.py --out /tmp/curve [--data synthetic|real]
        [--steps 0,25,50,100,200,300] [--set optim.lr=1e-3 ...] [--swap-bn]

Trains once with a checkpoint at every evaluated step (the demo's data, recipe and seed;
`--set` changes the recipe with config overrides), then evaluates the random init (step 0)
and each checkpoint on the demo's held-out set (synthetic sequences, or davis-mini with
--data real) and prints one row: J&F (x100) per step, and the trained-minus-init margin.
The curve is what the README's "Learning at small budgets" table reports. --swap-bn also
scores each checkpoint's BatchNorm running statistics on the initial weights, and its
weights on the initial statistics: which of the two moved J&F.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from functools import reduce
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dulearn import demo  # noqa: E402
from dulearn.config import set_value  # noqa: E402
from dulearn.evaluate import evaluate_davis  # noqa: E402
from dulearn.model import load_weights, random_model  # noqa: E402
from dulearn.train import train  # noqa: E402


def curve(args: argparse.Namespace) -> dict:
    """Train with checkpoints at args.steps; J&F of every checkpoint and of the random init."""
    a = demo.parser().parse_args(["--out", str(args.out), "--data", args.data, "--device", "cpu",
                                  "--steps", str(max(args.steps)), "--minutes", "0"])
    if a.data == "real" and a.eval_input_size == 0:
        a.eval_input_size = 240  # as the demo evaluates davis-mini
    index, davis_root = demo.synthetic_data(a) if a.data == "synthetic" else demo.real_data(a)
    cfg = demo.make_config(a, index, "cpu")
    every = reduce(math.gcd, [s for s in args.steps if s > 0])
    for key, value in [("train.checkpoint_every", every), ("train.keep_checkpoints", 1000),
                       *(item.split("=", 1) for item in args.set)]:
        set_value(cfg, key, value)
    run_dir = args.out / "runs" / ("-".join([a.data, *args.set]).replace("/", "_") or "base")
    start = time.perf_counter()
    if max(args.steps) > 0:
        train(cfg, run_dir, resume="auto")
    trained_s = time.perf_counter() - start
    scores, swapped = {}, {}
    torch.manual_seed(cfg.train.seed)  # as the loop builds its model
    init = random_model(cfg.model).state_dict()
    for step in args.steps:
        state = init if step == 0 else torch.load(run_dir / "checkpoints" / f"step_{step:08d}.pt",
                                                  map_location="cpu", weights_only=False)["model"]
        scores[step] = _score(cfg, state, davis_root, a.eval_input_size)
        print(f"step {step:5d}: J&F {scores[step]:5.1f}", flush=True)
        if args.swap_bn and step > 0:
            swapped[step] = {"init weights + these BN statistics": _score(cfg, _with_statistics(init, state), davis_root,
                                                                         a.eval_input_size),
                             "these weights + init BN statistics": _score(cfg, _with_statistics(state, init), davis_root,
                                                                         a.eval_input_size)}
            print(f"            {swapped[step]}", flush=True)
    return {"data": a.data, "recipe": args.set or ["demo"], "scores": scores, "swapped": swapped,
            "train_s": trained_s}


def _with_statistics(weights: dict, statistics: dict) -> dict:
    """A state dict of `weights` with the BatchNorm running statistics of `statistics`."""
    return {k: statistics[k] if k.endswith(("running_mean", "running_var", "num_batches_tracked")) else v
            for k, v in weights.items()}


def _score(cfg, state: dict, davis_root: Path, input_size: int) -> float:
    """J&F (x100) of a network with `state` on the held-out set."""
    net = random_model(cfg.model)
    load_weights(net, state)
    return 100 * evaluate_davis(net.eval(), davis_root, input_size=input_size)["J&F-Mean"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", choices=("synthetic", "real"), default="synthetic")
    p.add_argument("--steps", default="0,25,50,100,200,300", help="evaluated steps (0: the random init)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)")
    p.add_argument("--swap-bn", action="store_true",
                   help="also score each checkpoint's BatchNorm statistics on the initial weights and vice versa")
    args = p.parse_args(argv)
    args.steps = sorted({int(s) for s in args.steps.split(",")})
    out = curve(args)
    init = out["scores"].get(0)
    row = " | ".join(f"{v:.1f}" for v in out["scores"].values())
    print(f"| {out['data']} | {' '.join(out['recipe'])} | {row} |  (trained {out['train_s'] / 60:.1f} min"
          + (f"; margin at the last step {out['scores'][max(args.steps)] - init:+.1f})" if init is not None else ")"))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "curves.jsonl", "a") as f:
        f.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
