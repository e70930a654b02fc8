"""Benchmark: shard builder frames/s per worker, and training-stream clips/s per CPU worker.

    python tests/benchmarks/stream.py [--videos 12] [--clips 160] [--rounds 3]

The stream (T=5, 256 crop, short side U[256, 320), from 320-short-side shards of the
DAVIS frames, one core) is measured against the original method's path in the same run,
rounds interleaved, medians reported: PIL decode of each frame from a folder of JPEGs,
PIL short-side resize and a random crop, (a) on the dataset's own frames (DAVIS 480p
JPEGs: what the original reads) and (b) on the same 320-short-side frames as the shards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dulearn.data import build_train_loader, sample_frame_ids  # noqa: E402
from dulearn.shard_format import iter_samples  # noqa: E402
from shards.build import main as build_main  # noqa: E402

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
T, CROP, SHORT = 5, 256, (256, 320)


def bench_build(videos: int, out: Path) -> float:
    """Frames/s of one builder worker on the shared mp4s, at the default settings."""
    names = sorted(p.name for p in (DATA / "train-videos").glob("*.mp4"))[:videos]
    (out.parent / "list.txt").write_text("\n".join(names) + "\n")
    start = time.perf_counter()
    assert build_main(["videos", str(DATA / "train-videos"), "--out", str(out), "--file-list",
                       str(out.parent / "list.txt"),
                       "--workers", "1", "--shard-clips", "8"]) == 0
    seconds = time.perf_counter() - start
    return json.loads((out / "index.json").read_text())["totals"]["frames"] / seconds


def to_folders(shards: Path, root: Path) -> list[list[Path]]:
    """The shards' clips as folders of JPEG files (the original method's input)."""
    clips = []
    for tar in sorted(shards.glob("*.tar")):
        for key, sample in iter_samples(str(tar)):
            folder = root / key
            folder.mkdir(parents=True)
            frames = sorted(k for k in sample if k.endswith(".jpg"))
            for k in frames:
                (folder / k).write_bytes(sample[k])
            clips.append([folder / k for k in frames])
    return clips


def baseline_clip(files: list[Path], rng: random.Random) -> torch.Tensor:
    """The original path: PIL open + convert per frame, PIL resize, crop, to a tensor."""
    ids = sample_frame_ids(len(files), T, 2, rng)
    images = [Image.open(files[i]).convert("RGB") for i in ids]
    short = SHORT[0] + int((SHORT[1] - SHORT[0]) * rng.random())
    w, h = images[0].size
    size = (int(short * w / h), short) if w >= h else (short, int(short * h / w))
    images = [im.resize(size, Image.BILINEAR) for im in images]
    y, x = rng.randint(0, size[1] - CROP), rng.randint(0, size[0] - CROP)
    arrays = [np.asarray(im.crop((x, y, x + CROP, y + CROP))) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [T,3,H,W]


def bench_baseline(clips: list[list[Path]], n: int) -> float:
    rng = random.Random(0)
    start = time.perf_counter()
    for i in range(n):
        baseline_clip(clips[i % len(clips)], rng)
    return n / (time.perf_counter() - start)


def bench_stream(shards: Path, n: int, workers: int, batch: int = 16) -> float:
    loader = build_train_loader(str(shards / "index.json"), batch_size=batch, clip_len=T, frame_gap=2,
                                short_side=SHORT, crop=CROP, num_workers=workers)
    it = iter(loader)
    next(it)  # start-up (worker start, buffer fill) is not throughput
    start = time.perf_counter()
    for _ in range(n // batch):
        next(it)
    return (n // batch) * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=12, help="shared mp4s to time the builder on")
    p.add_argument("--clips", type=int, default=160, help="clips to time per method and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    args = p.parse_args()
    torch.set_num_threads(1)
    davis = DATA / "davis-mini" / "JPEGImages" / "480p"
    with tempfile.TemporaryDirectory() as tmp:
        build_fps = bench_build(args.videos, Path(tmp) / "mp4-shards")
        shards = Path(tmp) / "shards"
        assert build_main(["frames", str(davis), "--out", str(shards), "--clip-len", "20", "--workers", "1"]) == 0
        native = [sorted(d.glob("*.jpg")) for d in sorted(davis.iterdir())]
        small = to_folders(shards, Path(tmp) / "folders")
        runs = {"native": [], "small": [], "stream": [], "worker": []}
        for _ in range(args.rounds):
            runs["native"].append(bench_baseline(native, args.clips))
            runs["small"].append(bench_baseline(small, args.clips))
            runs["stream"].append(bench_stream(shards, args.clips, workers=0))
            runs["worker"].append(bench_stream(shards, args.clips, workers=1))
    med = {k: float(np.median(v)) for k, v in runs.items()}
    print(f"machine: {os.cpu_count()} CPU cores (shared, load {os.getloadavg()[0]:.1f}); torch threads 1")
    print(f"builder: {build_fps:.0f} frames/s per worker (PyAV decode 854x480 + resize to 320 + JPEG q90)")
    print(f"baseline, PIL per frame from the dataset's 480p JPEG folders: {med['native']:.1f} clips/s per core")
    print(f"baseline, PIL per frame from 320-short-side JPEG folders: {med['small']:.1f} clips/s per core")
    print(f"stream, in process: {med['stream']:.1f} clips/s per core = {med['stream'] / med['native']:.2f}x "
          f"the original path ({med['stream'] / med['small']:.2f}x the same-size PIL path)")
    print(f"stream, 1 DataLoader worker process: {med['worker']:.1f} clips/s")
    print(f"16 workers at this rate: {16 * med['worker']:.0f} clips/s (target 320 = 16 clips x 20 steps/s)")


if __name__ == "__main__":
    main()
