"""``shards/build.py verify DIR``: read every shard and check it against index.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dulearn.data import iter_samples
from shards.decode import BadInput, decode_image_bytes


def check_shard(path: Path, expected: dict, decode: bool) -> list[str]:
    """Problems found in one shard (empty if it matches its index entry)."""
    if not path.exists():
        return [f"{path.name}: missing"]
    problems, clips, frames = [], 0, 0
    for key, sample in iter_samples(str(path)):
        clips += 1
        jpgs = sorted(k for k in sample if k.endswith(".jpg"))
        try:
            meta = json.loads(sample["json"])
            n = meta["num_frames"]
        except (KeyError, ValueError) as e:
            problems.append(f"{path.name}: {key}: bad or missing json ({type(e).__name__})")
            continue
        if n != len(jpgs):
            problems.append(f"{path.name}: {key}: json says {n} frames, found {len(jpgs)}")
        frames += len(jpgs)
        for k in jpgs if decode else []:
            try:
                decode_image_bytes(sample[k], f"{key}.{k}")
            except BadInput as e:
                problems.append(f"{path.name}: {e}")
    if clips != expected["clips"] or frames != expected["frames"]:
        problems.append(f"{path.name}: {clips} clips / {frames} frames, index.json says "
                        f"{expected['clips']} / {expected['frames']} (truncated or corrupt shard)")
    return problems


def verify(out: Path, decode: bool = False) -> list[str]:
    """All problems of a shard folder; an empty list means every shard is complete and sound."""
    index_path = out / "index.json"
    if not index_path.exists():
        return [f"{index_path}: missing (build not finished?)"]
    index = json.loads(index_path.read_text())
    problems = []
    for entry in index["shards"]:
        problems += check_shard(out / entry["name"], entry, decode)
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shards/build.py verify", description=__doc__)
    p.add_argument("out", type=Path, help="folder with the shards and index.json")
    p.add_argument("--decode", action="store_true", help="also decode every JPEG")
    args = p.parse_args(argv)
    problems = verify(args.out, args.decode)
    for line in problems:
        print(line)
    index = args.out / "index.json"
    n = len(json.loads(index.read_text())["shards"]) if index.exists() else 0
    print(f"verify {args.out}: {n} shards, {len(problems)} problems" + ("" if problems else ": OK"))
    return 1 if problems else 0
