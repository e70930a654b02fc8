"""The real-video part of the GPU check: training curve and J&F of trained vs random init.

    python tests/gpu/summarize.py --run-dir RUN --trained EVAL_DIR --random EVAL_DIR --out OUT_DIR

Reads RUN/metrics.jsonl (dulearn.train) and each EVAL_DIR/summary.json (dulearn.evaluate);
writes OUT_DIR/real_video.png and OUT_DIR/real_video.json and prints a markdown section.
Whatever is missing is said, not fatal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SCORES = ("J&F-Mean", "J-Mean", "F-Mean")


def read_metrics(run_dir: Path) -> list[dict]:
    """The training loop's logged windows (one dict per line), [] when there is no file."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_eval(eval_dir: Path | None) -> dict | None:
    """An evaluation's summary.json without the per-object rows, or None."""
    path = eval_dir / "summary.json" if eval_dir else None
    if path is None or not path.is_file():
        return None
    summary = json.loads(path.read_text())
    summary.pop("per_object", None)
    return summary


def training_figures(lines: list[dict]) -> dict:
    """Steps, throughput, data wait, memory and first/last loss of the logged windows."""
    timed = [m for m in lines if "step_time_s" in m]
    if not timed:
        return {}
    step_time = sum(m["step_time_s"] for m in timed) / len(timed)
    losses = [m for m in timed if "loss" in m]
    last = timed[-1]
    return {
        "steps": last["step"],
        "steps_per_s": 1.0 / step_time,
        "steps_per_s_last_window": 1.0 / last["step_time_s"],
        "clips_per_s_last_window": last.get("clips_per_s"),
        "data_wait_frac": sum(m["data_wait_frac"] for m in timed) / len(timed),
        "peak_gpu_mem_gb": last.get("gpu_mem_gb"),
        "loss_first": losses[0]["loss"] if losses else None,
        "loss_last": losses[-1]["loss"] if losses else None,
        **{f"{k}_last": losses[-1].get(k) for k in ("anchors_used", "pseudo_entropy", "pseudo_nearest_frac")
           if losses},
        "nonfinite_total": last.get("nonfinite_total"),
    }


def plot(lines: list[dict], evals: dict[str, dict | None], path: Path) -> None:
    """Loss curves against step, and J&F / J / F bars of each evaluated model."""
    fig, (ax_loss, ax_jf) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "st", "cv"):
        points = [(m["step"], m[key]) for m in lines if key in m]
        if points:
            ax_loss.plot(*zip(*points), label=key)
    ax_loss.set(xlabel="step", ylabel="loss (window mean)", title="training on the carried train-videos")
    ax_loss.legend()
    names = [n for n, s in evals.items() if s]
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = [evals[name].get(k, float("nan")) for k in SCORES]
        ax_jf.bar([j + i * width for j in range(len(SCORES))], values, width, label=name)
    ax_jf.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(SCORES))], SCORES)
    ax_jf.set(ylabel="score", title="label propagation on the carried DAVIS sequences")
    ax_jf.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown(train: dict, evals: dict[str, dict | None]) -> str:
    """The summary section: training figures, then the J&F table and the difference."""
    out = ["## Real video: training + evaluation", ""]
    if train:
        mem = train["peak_gpu_mem_gb"]
        out.append(
            f"- training: {train['steps']} steps, {train['steps_per_s']:.2f} steps/s "
            f"(last window {train['steps_per_s_last_window']:.2f}), data wait {train['data_wait_frac']:.1%} "
            f"of step time, peak GPU memory {'n/a' if mem is None else f'{mem:.2f} GB'}; "
            f"loss {train['loss_first']:.4f} -> {train['loss_last']:.4f}; last window: anchors used "
            f"{train.get('anchors_used_last', float('nan')):.1f}, pseudo entropy "
            f"{train.get('pseudo_entropy_last', float('nan')):.3f}, nearest frac "
            f"{train.get('pseudo_nearest_frac_last', float('nan')):.3f}; non-finite steps {train['nonfinite_total']}")
    else:
        out.append("- training: no metrics.jsonl (the run did not log a window)")
    out += ["", "| model | J&F-Mean | J-Mean | F-Mean | frames/s |", "| --- | --- | --- | --- | --- |"]
    for name, s in evals.items():
        if s is None:
            out.append(f"| {name} | missing | | | |")
        else:
            out.append(f"| {name} | " + " | ".join(f"{s.get(k, float('nan')):.4f}" for k in SCORES)
                       + f" | {s.get('frames/s', float('nan')):.2f} |")
    trained, random = evals.get("trained"), evals.get("random init")
    if trained and random:
        out.append(f"\ntrained - random init: J&F-Mean {trained['J&F-Mean'] - random['J&F-Mean']:+.4f} "
                   f"on {', '.join(trained.get('sequences', []))}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, required=True, help="training run directory (metrics.jsonl)")
    ap.add_argument("--trained", type=Path, default=None, help="evaluation output folder of the trained model")
    ap.add_argument("--random", type=Path, default=None, help="evaluation output folder of the random init")
    ap.add_argument("--out", type=Path, required=True, help="folder for real_video.png / .json")
    args = ap.parse_args(argv)
    lines = read_metrics(args.run_dir)
    evals = {"trained": read_eval(args.trained), "random init": read_eval(args.random)}
    train = training_figures(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(lines, evals, args.out / "real_video.png")
    (args.out / "real_video.json").write_text(json.dumps({"training": train, "evaluation": evals,
                                                          "metrics": lines}, indent=1))
    print(markdown(train, evals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
