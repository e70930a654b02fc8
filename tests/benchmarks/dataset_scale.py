"""The training stream at dataset scale, before vs after, in one run (2 gloo ranks x N workers).

    python tests/benchmarks/dataset_scale.py --out /tmp/scale [--videos 5000] [--steps 2000]
        [--baseline da3eae6] [--s3]

Builds (once) shards of synthetic videos, then streams them with this checkout's
dulearn.data and with the baseline commit's (git archive of --baseline), same shards,
same settings, and prints per variant: clips/s, bytes read per decoded JPEG byte (the
processes' rchar from /proc, so every backend is measured the same way), the fraction of
global batches holding a video twice, and the RSS of the ranks and their workers at the
first, middle and last step (flat = no growth). With --s3 it also streams this checkout
from a SeaweedFS S3 gateway on 127.0.0.1 (tests/servers.py) for --s3-steps steps.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]


# ----------------------------------------------------------------------------- one rank


def _proc_tree() -> list[int]:
    """This process and its children (the DataLoader workers)."""
    kids = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    return [os.getpid(), *map(int, kids)]


def _proc_field(pid: int, path: str, name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rank_main(a: argparse.Namespace) -> None:
    """One rank: stream --steps batches, all-gather the clip names, measure bytes, time and RSS."""
    import torch
    import torch.distributed as dist

    from dulearn.data import build_train_loader

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    kw = dict(batch_size=a.batch // world, clip_len=5, frame_gap=a.frame_gap, short_side=(a.crop, a.crop + 8), crop=a.crop,
              num_workers=a.workers, seed=0, rank=rank, world_size=world)
    if "shuffle_buffer" in inspect.signature(build_train_loader).parameters:
        kw["shuffle_buffer"] = 256  # the baseline's stream
    stream = iter(build_train_loader(a.source, **kw))
    names, rss, start, rchar0, counted = [], {}, None, 0, 0
    for step in range(a.steps):
        batch = next(stream)
        counted += batch.get("read_bytes", 0) if step else 0
        gathered = [None] * world
        dist.all_gather_object(gathered, batch["clips"])
        names.append([c for part in gathered for c in part])
        if step == 0:
            start = time.perf_counter()
            rchar0 = sum(_proc_field(p, "io", "rchar") for p in _proc_tree())
        if step in (100, a.steps // 2, a.steps - 1):
            rss[step] = {str(p): _proc_field(p, "status", "VmRSS") // 1024 for p in _proc_tree()}  # MB
    seconds = time.perf_counter() - start
    rchar = sum(_proc_field(p, "io", "rchar") for p in _proc_tree()) - rchar0
    dist.barrier()
    out = {"rank": rank, "seconds": seconds, "clips": (a.steps - 1) * a.batch // world, "rchar": rchar, "counted": counted, "rss": rss}
    if rank == 0:
        out["names"] = names[1:]
    Path(a.result).with_suffix(f".{rank}.json").write_text(json.dumps(out))
    os._exit(0)  # the DataLoader workers of an infinite stream: no orderly shutdown needed


# ----------------------------------------------------------------------------- driver


def _build(a: argparse.Namespace) -> Path:
    shards = a.out / "shards"
    if not (shards / "index.json").exists():
        spec = f"seed=0,videos={a.videos},frames={a.frames},size={a.size},objects=1-2"
        subprocess.run([sys.executable, "-m", "shards.build", "synthetic", spec, "--out", str(shards), "--clip-len",
                        str(a.clip_len), "--shard-size", "64MB", "--workers", "2"], cwd=ROOT, check=True)
    return shards


def _video_of(shards: Path) -> tuple[dict[str, int], float]:
    """(clip name -> video, for both namings (baseline: shard/key; this checkout: shard@offset);
    the mean JPEG size in bytes)."""
    out, jpeg_bytes, jpegs = {}, 0, 0
    for path in shards.glob("*.tar"):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    key = m.name.split(".")[0]
                    out[f"{path.name}/{key}"] = out[f"{path.name}@{m.offset}"] = int(key[1:9])
                else:
                    jpeg_bytes, jpegs = jpeg_bytes + m.size, jpegs + 1
    return out, jpeg_bytes / jpegs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(a: argparse.Namespace, code: Path, source: str, steps: int, env: dict[str, str] | None = None) -> dict:
    """Two rank processes with ``code`` on PYTHONPATH; their merged results."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result"
        base = {**os.environ, **(env or {}), "PYTHONPATH": str(code), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, str(HERE), "_rank", "--source", source, "--steps", str(steps), "--workers",
               str(a.workers), "--batch", str(a.batch), "--crop", str(a.crop), "--frame-gap", str(a.frame_gap), "--result", str(result)]
        procs = [subprocess.Popen(cmd, env={**base, "RANK": str(r)}, cwd=tmp) for r in range(2)]
        if any(p.wait() for p in procs):
            raise SystemExit(f"a rank failed ({[p.returncode for p in procs]})")
        parts = [json.loads(result.with_suffix(f".{r}.json").read_text()) for r in range(2)]
    return {"seconds": max(p["seconds"] for p in parts), "clips": sum(p["clips"] for p in parts),
            "rchar": sum(p["rchar"] for p in parts), "counted": sum(p["counted"] for p in parts), "rss": [p["rss"] for p in parts], "names": parts[0]["names"]}


def _report(label: str, r: dict, video: dict[str, int], frame_bytes: float) -> dict:
    decoded = r["clips"] * 5 * frame_bytes
    repeats = sum(len({video[c] for c in batch}) < len(batch) for batch in r["names"])
    rss = {f"rank{i}": {step: sorted(m.values()) for step, m in part.items()} for i, part in enumerate(r["rss"])}
    read = r["counted"] or r["rchar"]  # the stream's own count where it has one (sockets escape rchar)
    row = {"variant": label, "clips_per_s": r["clips"] / r["seconds"], "read_per_decoded_byte": read / decoded,
           "repeat_batch_frac": repeats / len(r["names"]), "rss_mb_by_step": rss}
    print(f"{label:>22}: {row['clips_per_s']:7.1f} clips/s, read/decoded bytes {row['read_per_decoded_byte']:5.2f}, "
          f"global batches with a repeated video {100 * row['repeat_batch_frac']:5.2f}%", flush=True)
    for rank, by_step in rss.items():
        print(f"{'':>24}{rank} RSS MB (process, workers) at steps " +
              "; ".join(f"{s}: {v}" for s, v in by_step.items()), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--videos", type=int, default=5000)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--size", default="64x64")
    p.add_argument("--clip-len", type=int, default=8, help="the builder's --clip-len (the presets use 50)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batch", type=int, default=16, help="global batch")
    p.add_argument("--crop", type=int, default=48, help="crop (short side drawn in [crop, crop + 8))")
    p.add_argument("--frame-gap", type=int, default=2, help="2: the ytvos/oxuva/trackingnet presets, 10: kinetics")
    p.add_argument("--baseline", default="da3eae6", help="git ref of the 'before' stream")
    p.add_argument("--s3", action="store_true")
    p.add_argument("--no-baseline", action="store_true", help="skip the before/after runs (e.g. only --s3)")
    p.add_argument("--s3-steps", type=int, default=300)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    shards = _build(a)
    index = json.loads((shards / "index.json").read_text())["totals"]
    video, frame_bytes = _video_of(shards)
    print(f"{index['videos']} videos, {index['clips']} clips of ~{index['frames'] / index['clips']:.0f} frames, "
          f"{index['shards']} shards; 2 ranks x {a.workers} workers, global batch {a.batch}, T=5 gap {a.frame_gap}, "
          f"{a.steps} steps", flush=True)
    baseline = a.out / f"baseline-{a.baseline}"
    if not baseline.exists():
        baseline.mkdir()
        archive = subprocess.run(["git", "archive", a.baseline], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
    rows = [] if a.no_baseline else [
        _report(f"before ({a.baseline})", _run(a, baseline, str(shards / "index.json"), a.steps), video, frame_bytes),
        _report("after (this checkout)", _run(a, ROOT, str(shards / "index.json"), a.steps), video, frame_bytes)]
    if a.s3:
        sys.path.insert(0, str(ROOT / "tests"))
        from servers import s3_env, seaweedfs, upload

        shutil.rmtree(a.out / "weed", ignore_errors=True)  # a fresh store each run
        with seaweedfs(a.out / "weed") as (endpoint, _):
            prefix = upload(endpoint, shards, "scale")
            local = _run(a, ROOT, str(shards / "index.json"), a.s3_steps)
            remote = _run(a, ROOT, f"{prefix}/index.json", a.s3_steps, s3_env(endpoint))
            rows += [_report(f"local, {a.s3_steps} steps", local, video, frame_bytes),
                     _report(f"SeaweedFS S3, {a.s3_steps}", remote, video, frame_bytes)]
    (a.out / "dataset_scale.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_rank"]:
        q = argparse.ArgumentParser()
        for flag in ("--source", "--result"):
            q.add_argument(flag)
        for flag in ("--steps", "--workers", "--batch", "--crop", "--frame-gap"):
            q.add_argument(flag, type=int)
        _rank_main(q.parse_args(sys.argv[2:]))
    sys.exit(main())
