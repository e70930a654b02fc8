"""The whole pipeline on real video: shards -> training -> periodic DAVIS evaluation -> report.

    python tests/benchmarks/real_video.py --steps 300 --eval-every 100 --out runs/real-video

Shards from ../shared/data/train-videos (30 DAVIS-2016 train videos), training with a preset
(configs/cpu.yaml by default, `key=value` overrides after `--`), a checkpoint every
`--eval-every` steps, then every checkpoint and the random initialisation (step 0, the
baseline measured in the same run) evaluated by label propagation on
../shared/data/davis-mini (sequences disjoint from the training videos). Report: J&F-Mean of
the trained vs the random-init network, the learning curve (J&F against step) as a PNG,
steps/s, data wait, peak memory, and the pseudo-label diagnostics (collapse shows as a
falling `anchors_used` / `pseudo_entropy`).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dulearn.config import load_config  # noqa: E402
from dulearn.demo import build_shards, default_shared  # noqa: E402
from dulearn.evaluate import evaluate_davis  # noqa: E402
from dulearn.model import load_weights, random_model  # noqa: E402
from dulearn.train import train  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shared", type=Path, default=default_shared())
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "real-video")
    p.add_argument("--preset", type=Path, default=ROOT / "configs" / "cpu.yaml")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-input-size", type=int, default=240, help="short side for evaluation (0 = 480p)")
    p.add_argument("--sequences", nargs="*", default=None, help="davis-mini sequences (default: all 5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    return p.parse_args(argv)


def evaluate_step(cfg, checkpoint: Path | None, davis: Path, a: argparse.Namespace) -> dict:
    """J&F of the network at a checkpoint (None: the random initialisation training starts from)."""
    torch.manual_seed(cfg.train.seed)
    net = random_model(cfg.model)
    if checkpoint is not None:
        load_weights(net, torch.load(checkpoint, map_location="cpu", weights_only=False)["model"])
    return evaluate_davis(net.eval(), davis, sequences=a.sequences, input_size=a.eval_input_size)


def train_summary(metrics_path: Path) -> dict:
    """Mean step time, data wait and the last pseudo-label diagnostics from metrics.jsonl."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "step_time_s" in r]
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    last = rows[-1]
    return {"steps_per_s": 1 / mean("step_time_s"), "data_wait_s": mean("data_wait_s"),
            "data_wait_frac": mean("data_wait_frac"), "clips_per_s": mean("clips_per_s"),
            **{k: last.get(k) for k in ("loss", "pseudo_entropy", "anchors_used", "pseudo_nearest_frac")}}


def plot_curve(curve: list[tuple[int, float]], path: Path) -> None:
    """J&F-Mean against training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([s for s, _ in curve], [100 * v for _, v in curve], "o-")
    ax.axhline(100 * curve[0][1], color="grey", ls="--", label="random init")
    ax.set(xlabel="training step", ylabel="J&F-Mean (davis-mini)", title="real video: learning curve")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    data = a.shared / "data"
    davis = data / "davis-mini"
    index = build_shards("videos", data / "train-videos", a.out / "shards", short_side=160, clip_len=20, workers=2)
    cfg = load_config(a.preset, [f"data.train=[{index}]", f"schedule.total_steps={a.steps}",
                                 f"train.checkpoint_every={a.eval_every}", "train.keep_checkpoints=1000",
                                 "train.cpu=true", "log.wandb=false", "log.progress=false", *a.overrides])
    run_dir = a.out / "run"
    start = time.perf_counter()
    run = train(cfg, run_dir, resume="auto")
    train_s = time.perf_counter() - start
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
               + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    curve = [(0, evaluate_step(cfg, None, davis, a)["J&F-Mean"])]
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*.pt")):
        curve.append((int(ckpt.stem.split("_")[1]), evaluate_step(cfg, ckpt, davis, a)["J&F-Mean"]))
        print(f"step {curve[-1][0]}: J&F-Mean {100 * curve[-1][1]:.1f}", flush=True)
    plot_curve(curve, a.out / "learning_curve.png")
    report = {"steps": run["step"], "train_seconds": train_s, "peak_rss_mb": peak_mb,
              "J&F random init": curve[0][1], "J&F trained": curve[-1][1], "curve": curve,
              **train_summary(run_dir / "metrics.jsonl"), "config": cfg.to_dict()}
    (a.out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"real video (machine: {torch.get_num_threads()} threads, CPU): {run['step']} steps in {train_s / 60:.1f} min, "
          f"{report['steps_per_s']:.2f} steps/s, data wait {1000 * report['data_wait_s']:.0f} ms/step "
          f"({100 * report['data_wait_frac']:.0f}%), peak RSS {peak_mb:.0f} MB")
    print(f"J&F-Mean davis-mini (input short side {a.eval_input_size or 480}): random init {100 * curve[0][1]:.1f}, "
          f"trained {100 * curve[-1][1]:.1f} ({100 * (curve[-1][1] - curve[0][1]):+.1f}); "
          f"pseudo-label entropy {report['pseudo_entropy']:.2f}, anchors used {report['anchors_used']:.1f}")
    print(f"learning curve: {a.out / 'learning_curve.png'}; report: {a.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
