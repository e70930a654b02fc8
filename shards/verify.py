"""``shards/build.py verify DIR``: read every shard and check it against index.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from dulearn.shard_format import (INDEX_NAME, ShardEntry, ShardFormatError, check_sample, frame_exts, iter_samples,
                                  read_index)
from shards.decode import BadInput, decode_image_bytes


def check_shard(path: Path, expected: ShardEntry, decode: bool) -> list[str]:
    """Problems found in one shard (empty if it matches its index entry)."""
    if not path.exists():
        return [f"{path.name}: missing"]
    problems, clips, frames = [], 0, 0
    for key, sample in iter_samples(str(path)):
        clips += 1
        try:
            check_sample(sample)
        except ShardFormatError as e:
            problems.append(f"{path.name}: {key}: {e}")
        jpgs = frame_exts(sample)
        frames += len(jpgs)
        for k in jpgs if decode else []:
            try:
                decode_image_bytes(sample[k], f"{key}.{k}")
            except BadInput as e:
                problems.append(f"{path.name}: {e}")
    if clips != expected.clips or expected.frames not in (None, frames):  # None: a hand-written index
        problems.append(f"{path.name}: {clips} clips / {frames} frames, index.json says "
                        f"{expected.clips} / {expected.frames} (truncated or corrupt shard)")
    return problems


def verify(out: Path, decode: bool = False) -> list[str]:
    """All problems of a shard folder; an empty list means every shard is complete and sound."""
    index_path = out / INDEX_NAME
    if not index_path.exists():
        return [f"{index_path}: missing (build not finished?)"]
    try:
        index = read_index(index_path)
    except ShardFormatError as e:
        return [str(e)]
    problems = []
    for entry in index.shards:
        problems += check_shard(out / entry.name, entry, decode)
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shards/build.py verify", description=__doc__)
    p.add_argument("out", type=Path, help="folder with the shards and index.json")
    p.add_argument("--decode", action="store_true", help="also decode every JPEG")
    args = p.parse_args(argv)
    problems = verify(args.out, args.decode)
    for line in problems:
        print(line)
    try:
        n = len(read_index(args.out / INDEX_NAME).shards)
    except (OSError, ShardFormatError):
        n = 0
    print(f"verify {args.out}: {n} shards, {len(problems)} problems" + ("" if problems else ": OK"))
    return 1 if problems else 0
