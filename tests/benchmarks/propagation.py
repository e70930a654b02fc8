"""Evaluation speed: propagation, metrics and the whole `evaluate`, each against a baseline in the same run.

    python tests/benchmarks/propagation.py [--part prop|metrics|evaluate|all] [--device cpu|cuda]

- prop: frames/s of dulearn.propagate at DAVIS size (real 480p motocross-jump frames through a
  random-init network: 60x107 res4 grid, K=512, 2 objects) against the original per-frame
  algorithm re-implemented straightforwardly (tests/test_propagate.reference_propagate);
  outputs compared on the frames both computed. The reference's cost per frame is constant
  (it always scores 21 full frames), so it runs on the first --ref-frames frames only.
- metrics: J&F of OSVOS results on davis-mini sequences, vectorised vs a per-frame numpy path.
- evaluate: `evaluate_davis` on davis-mini end to end (frames/s, I/O and scoring included).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("DULEARN_SHARED", ROOT.parent / "shared")) / "data"
sys.path.insert(0, str(ROOT / "tests"))

from test_metrics import naive_f_measure  # noqa: E402
from test_propagate import reference_propagate  # noqa: E402

from dulearn import davis, evaluate, metrics  # noqa: E402
from dulearn.model import DenseNet  # noqa: E402
from dulearn.propagate import propagate  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_prop(device: str, frames: int, ref_frames: int) -> None:
    """Propagation frames/s, dulearn vs the per-frame original algorithm, identical masks."""
    video = evaluate.davis_videos(DATA / "davis-multi", ["motocross-jump"])[0]
    video.frames = video.frames[:frames]
    images = np.stack(list(evaluate.frame_source(video).frames()))
    torch.manual_seed(0)
    model = DenseNet().to(device).eval()
    feats = evaluate.extract_features(model, images, device=device)  # [N,512,60,107]
    first = torch.from_numpy(davis.load_mask(video.annotations[0])).to(device)
    print(f"features {tuple(feats.shape)} {feats.dtype} on {device}, objects {int(first.max())}")
    _sync(device)
    t = time.perf_counter()
    ours = propagate(feats, first)
    _sync(device)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = reference_propagate(feats[:ref_frames], first, rows=1024)
    _sync(device)
    t_ref = time.perf_counter() - t
    same = torch.equal(ours[:ref_frames].cpu(), ref.cpu())
    fps_ours, fps_ref = (frames - 1) / t_ours, (ref_frames - 1) / t_ref
    print(f"propagation  dulearn: {frames} frames in {t_ours:.1f} s = {fps_ours:.3f} frames/s")
    print(f"propagation  original algorithm (per frame): {ref_frames} frames in {t_ref:.1f} s = {fps_ref:.3f} frames/s")
    print(f"propagation  speed-up {fps_ours / fps_ref:.1f}x; identical masks on the {ref_frames} common frames: {same}")


def _naive_scores(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """J and F [O,T-2] frame by frame in numpy (the straightforward path)."""
    gt = np.where(gt == 255, 0, gt)
    n_obj = int(gt[0].max())
    j = np.zeros((n_obj, len(gt) - 2))
    f = np.zeros_like(j)
    for o in range(1, n_obj + 1):
        for i in range(1, len(gt) - 1):
            g, p = gt[i] == o, pred[i] == o
            union = (g | p).sum()
            j[o - 1, i - 1] = 1.0 if union == 0 else (g & p).sum() / union
            f[o - 1, i - 1] = naive_f_measure(g, p)
    return j, f


def bench_metrics(device: str, sequences: list[str]) -> None:
    """Metric throughput (frames/s), vectorised torch vs per-frame numpy, same figures."""
    root, res = DATA / "davis-mini", DATA / "davis-mini-osvos"
    data = []
    for seq in sequences:
        paths = davis.sequence_masks(root, seq)
        data.append((metrics.load_ids(paths), metrics.load_ids([res / seq / p.name for p in paths])))
    n = sum(len(g) - 2 for g, _ in data)
    t = time.perf_counter()
    fast = [metrics.score_sequence(g.to(device), p.to(device)) for g, p in data]
    _sync(device)
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    slow = [_naive_scores(g.numpy(), p.numpy()) for g, p in data]
    t_slow = time.perf_counter() - t
    same = all(np.allclose(a, b, atol=1e-12) for fs, ss in zip(fast, slow) for a, b in zip(fs, ss))
    print(f"metrics      dulearn: {n} frames in {t_fast:.2f} s = {n / t_fast:.1f} frames/s ({device})")
    print(f"metrics      naive per-frame numpy: {n} frames in {t_slow:.2f} s = {n / t_slow:.1f} frames/s")
    print(f"metrics      speed-up {t_slow / t_fast:.1f}x; identical J and F: {same}")


def bench_evaluate(device: str, input_size: int, sequences: list[str] | None) -> None:
    """`evaluate_davis` on davis-mini end to end (random-init model)."""
    torch.manual_seed(0)
    model = DenseNet().to(device)
    summary = evaluate.evaluate_davis(model, DATA / "davis-mini", sequences=sequences, device=device, input_size=input_size, progress=True)
    size = f"short side {input_size}" if input_size else "480p"
    print(
        f"evaluate     davis-mini ({size}, {device}): {summary['frames']} frames in {summary['seconds']:.1f} s = "
        f"{summary['frames/s']:.3f} frames/s end to end; J&F-Mean {summary['J&F-Mean']:.4f} (random init)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", choices=("prop", "metrics", "evaluate", "all"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--frames", type=int, default=30, help="frames propagated by dulearn")
    ap.add_argument("--ref-frames", type=int, default=6, help="frames propagated by the reference")
    ap.add_argument("--metric-sequences", default="blackswan,car-shadow")
    ap.add_argument("--input-size", type=int, default=0, help="evaluate: short side (0 = 480p as stored)")
    ap.add_argument("--sequences", default=None, help="evaluate: davis-mini sequences (default all)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    if args.part in ("prop", "all"):
        bench_prop(args.device, args.frames, args.ref_frames)
    if args.part in ("metrics", "all"):
        bench_metrics(args.device, args.metric_sequences.split(","))
    if args.part in ("evaluate", "all"):
        bench_evaluate(args.device, args.input_size, args.sequences.split(",") if args.sequences else None)


if __name__ == "__main__":
    main()
