"""Pack a video dataset into webdataset tar shards of clips, or verify built shards.

    python shards/build.py SOURCE ROOT --out DIR [options]     # build
    python shards/build.py verify DIR [--decode]                # check shards vs index.json

SOURCE is a registered layout (kinetics, trackingnet, ytvos, oxuva, videos, frames,
synthetic, and any added with ``shards.sources.register_source``). Output:
``DIR/<prefix>-%06d.tar``, ``DIR/samples.json`` and ``DIR/index.json`` (dulearn.shard_format);
videos are dealt to shards in a random order drawn from --shuffle-seed. Same inputs and
options give the same bytes for any --workers; a re-run after an interruption keeps
complete shards and redoes the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import multiprocessing as mp
import os
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, not the sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from tqdm import tqdm

from dulearn.fileio import atomic_write_json
from dulearn.shard_format import (INDEX_NAME, SAMPLE_COLUMNS, SAMPLES_NAME, ShardEntry, ShardIndex, ShardSamples,
                                  scan_samples, skipped_input, write_index, write_samples)
from shards import decode
from shards.plan import BuildParams, PlannedVideo, ShardPlan, assign_shards, too_short_reason
from shards.sources import VideoInput, filter_by_list, get_source, source_names
from shards.writer import PARTS_DIR, write_shard


def parse_size(text: str) -> int:
    """'1GB', '500MB', '64k' or a plain byte count -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 1GB, 500MB, 1000000)")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shards/build.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="layout of ROOT: " + ", ".join(source_names()) + " (or a plugin's)")
    p.add_argument("root", type=Path, help="dataset root folder")
    p.add_argument("--out", type=Path, required=True, help="output folder for shards and index.json")
    p.add_argument("--prefix", help="shard name prefix (default: the source name)")
    p.add_argument("--file-list", type=Path, help="only these videos: one path (relative to ROOT) or id per line")
    p.add_argument("--short-side", type=int, default=320, help="resize frames to this short side (no upscaling)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--clip-len", type=int, default=50,
                   help="cut videos into clips of clip-len..2*clip-len-1 frames (after --frame-stride)")
    p.add_argument("--min-clip-len", type=int, default=10, help="skip videos with fewer frames than this")
    p.add_argument("--frame-stride", type=int, default=1, help="keep every k-th frame of the source")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("1GB"), help="target shard size (estimated)")
    p.add_argument("--shard-clips", type=int, default=0, help="target clips per shard (overrides --shard-size)")
    p.add_argument("--shuffle-seed", type=int, default=0,
                   help="seed of the random order videos are dealt to shards in (-1: the source's order)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1), help="worker processes")
    p.add_argument("--decode-threads", type=int, default=1, help="decoder threads per worker process")
    p.add_argument("--plugin", action="append", default=[], help="module to import that registers sources")
    return p


def load_plugins(names: list[str]) -> None:
    """Import the modules that register extra sources (``--plugin``)."""
    for name in names:
        importlib.import_module(name)


def _probe(v: VideoInput) -> tuple[int, float | None] | str:
    """(frames, fps) of a video, or the reason it is unusable (runs in a worker)."""
    try:
        if v.num_frames is not None:
            return v.num_frames, v.fps
        if v.probe is not None:
            n, fps = v.probe()
            return n, v.fps or fps
        return sum(1 for _ in v.read()), v.fps
    except Exception as e:  # unreadable input: listed, never fatal
        return f"unreadable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(1)
    decode.DECODE_THREADS = threads


def plan_build(videos: list[VideoInput], params: BuildParams, pool) -> tuple[list[ShardPlan], list[dict]]:
    """Probe the videos in parallel (order kept) and assign them to shards."""
    planned, skipped = [], []
    results = pool.imap(_probe, videos, chunksize=8) if pool else map(_probe, videos)
    for v, r in zip(videos, tqdm(results, total=len(videos), desc="probe", unit="video", leave=False)):
        reason = r if isinstance(r, str) else too_short_reason(r[0], params)
        if reason:
            skipped.append(skipped_input(v.path or v.video_id, v.video_id, reason))
        else:
            planned.append(PlannedVideo(len(planned), v, r[0], r[1]))
    return assign_shards(planned, params), skipped


def plan_digest(shards: list[ShardPlan], params: BuildParams) -> str:
    """Fingerprint of a plan, to refuse resuming into a folder built with other inputs/options."""
    body = [params.as_dict(), [[s.name, [[v.video.video_id, v.num_frames] for v in s.videos]] for s in shards]]
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _check_resume(out: Path, digest: str) -> None:
    state = out / PARTS_DIR / "build.json"
    if state.exists():
        old = json.loads(state.read_text())["plan"]
        if old != digest:
            raise SystemExit(f"error: {out} holds shards of a different build (inputs or options changed); "
                             "use a new --out or delete it")
    atomic_write_json(state, {"plan": digest}, ".part")
    for stale in out.glob(".*.part"):
        stale.unlink()


def _done(out: Path, name: str) -> dict | None:
    part = out / PARTS_DIR / f"{name}.json"
    return json.loads(part.read_text()) if (out / name).exists() and part.exists() else None


def _write_task(task: tuple[ShardPlan, Path, BuildParams]) -> dict:
    return write_shard(*task)


def build(args: argparse.Namespace) -> ShardIndex:
    """Run a build from parsed CLI arguments; returns what it wrote to index.json."""
    source = get_source(args.source)
    root = args.root.resolve()
    params = BuildParams(dataset=args.source, prefix=args.prefix or args.source, short_side=args.short_side,
                         quality=args.quality, clip_len=args.clip_len, min_clip_len=args.min_clip_len,
                         frame_stride=args.frame_stride, shard_bytes=args.shard_size, shard_clips=args.shard_clips,
                         shuffle_seed=args.shuffle_seed)
    if min(params.clip_len, params.min_clip_len, params.frame_stride, params.short_side) < 1:
        raise SystemExit("error: --clip-len, --min-clip-len, --frame-stride and --short-side must be >= 1")
    videos = list(source(root))
    if args.file_list:
        videos = list(filter_by_list(videos, root, args.file_list))
    args.out.mkdir(parents=True, exist_ok=True)
    decode.DECODE_THREADS = args.decode_threads
    start = time.perf_counter()
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ctx.Pool(args.workers, _worker_init, (args.decode_threads,)) if args.workers > 1 else None
    try:
        shards, skipped = plan_build(videos, params, pool)
        _check_resume(args.out, plan_digest(shards, params))
        done = {s.name: _done(args.out, s.name) for s in shards}
        todo = [(s, args.out, params) for s in shards if done[s.name] is None]
        planned_frames = {s.name: sum(v.num_frames for v in s.videos) for s, _, _ in todo}
        bar = tqdm(total=sum(planned_frames.values()), desc="build", unit="frame")
        decoded = 0
        results = pool.imap_unordered(_write_task, todo) if pool else map(_write_task, todo)
        for r in results:
            done[r["name"]] = r
            decoded += r["decoded"]
            bar.update(planned_frames[r["name"]])
        bar.close()
    finally:
        if pool:
            pool.close()
            pool.join()
    index = make_index(root, params, [done[s.name] for s in shards], skipped)
    write_samples(args.out / SAMPLES_NAME, {s.name: _samples(args.out, done[s.name]) for s in shards})
    write_index(args.out / INDEX_NAME, index)  # last: an index.json means the build is complete
    print_summary(index, decoded, time.perf_counter() - start, args.workers, len(todo), len(shards))
    return index


def _samples(out: Path, summary: dict) -> ShardSamples:
    """A written shard's samples.json entry (scanned for shards a build before samples.json completed)."""
    if "samples" in summary:
        return ShardSamples(*(summary["samples"][c] for c in SAMPLE_COLUMNS))
    scanned = scan_samples(str(out / summary["name"]))
    scanned.frame_data = None
    return scanned


def make_index(root: Path, params: BuildParams, parts: list[dict], skipped: list[dict]) -> ShardIndex:
    """The index of a build from its shard summaries, in shard order, and the inputs skipped while planning."""
    return ShardIndex([ShardEntry.from_dict(p) for p in parts], params.dataset, str(root), params.as_dict(),
                      skipped + [s for p in parts for s in p["skipped"]])


def print_summary(index: ShardIndex, decoded: int, seconds: float, workers: int, written: int, planned: int) -> None:
    t = index.totals()
    rate = decoded / max(seconds, 1e-9)
    print(f"shards: {planned} ({written} written, {planned - written} already complete); videos: {t['videos']}; "
          f"clips: {t['clips']}; frames: {t['frames']}; bytes: {t['bytes'] / 1e6:.1f} MB; skipped inputs: "
          f"{t['skipped']}; {seconds:.1f} s, {rate:.0f} frames/s decoded ({rate / max(workers, 1):.0f} per worker)")
    for s in index.skipped:
        print(f"  skipped {s['input']}: {s['reason']}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["verify"]:
        from shards.verify import main as verify_main

        return verify_main(argv[1:])
    plugins = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--plugin"]
    load_plugins(plugins)
    args = build_parser().parse_args(argv)
    try:
        build(args)
    except (KeyError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
