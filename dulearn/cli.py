"""The `dulearn` command: the entry points users need, one subcommand each.

    dulearn train --config configs/cpu.yaml data.train=[shards/index.json]
    dulearn evaluate --checkpoint runs/ytvos --davis /data/DAVIS --out results/ytvos
    dulearn metrics --davis /data/DAVIS --results results/ytvos/Annotations
    dulearn segment video.mp4 --mask first.png --checkpoint runs/ytvos --out out/video
    dulearn shards videos /my/videos --out /data/shards/mine
    dulearn demo

Each subcommand runs its module's own `main` with the remaining arguments (`dulearn <command>
--help` prints that command's options), so `python dulearn/train.py`, `python -m
dulearn.evaluate` and the others keep working as before. `python -m dulearn` is the same command.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any


def _train(argv: list[str]) -> Any:
    from dulearn import train

    return train.main(argv)


def _evaluate(argv: list[str]) -> Any:
    from dulearn import evaluate

    return evaluate.main(argv)


def _metrics(argv: list[str]) -> Any:
    from dulearn import metrics

    return metrics.main(argv)


def _segment(argv: list[str]) -> Any:
    from dulearn import segment

    return segment.main(argv)


def _shards(argv: list[str]) -> Any:
    # A process of its own: the shard builder depends on dulearn, and dulearn never imports it.
    return subprocess.run([sys.executable, "-m", "shards.build", *argv]).returncode


def _demo(argv: list[str]) -> Any:
    from dulearn import demo

    demo.main(argv)
    return 0


COMMANDS: dict[str, tuple[Callable[[list[str]], Any], str]] = {
    "train": (_train, "train a network on shards (the same as python dulearn/train.py)"),
    "evaluate": (_evaluate, "label propagation on DAVIS-2017 or YouTube-VOS: masks, J&F, overlay videos"),
    "metrics": (_metrics, "J&F of any results folder in the DAVIS layout"),
    "segment": (_segment, "segment your own video from first-frame masks: masks, overlay and side-by-side mp4"),
    "shards": (_shards, "build or verify webdataset shards of clips (the same as python shards/build.py)"),
    "demo": (_demo, "the main job: synthetic shards, minutes of training, J&F vs random init"),
}


def parser() -> argparse.ArgumentParser:
    table = "\n".join(f"  {name:<10}{text}" for name, (_, text) in COMMANDS.items())
    ap = argparse.ArgumentParser(prog="dulearn", description=__doc__.split("\n")[0],
                                 epilog=f"commands:\n{table}\n\n`dulearn <command> --help` prints the options of a command.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=COMMANDS, metavar="command", help=", ".join(COMMANDS))
    ap.add_argument("args", nargs=argparse.REMAINDER, help="the command's arguments")
    return ap


@contextlib.contextmanager
def _program_name(name: str) -> Iterator[None]:
    """Let the commands' parsers that take their name from sys.argv[0] call themselves `dulearn <command>`."""
    saved = sys.argv[0] if sys.argv else ""
    if sys.argv:
        sys.argv[0] = name
    try:
        yield
    finally:
        if sys.argv:
            sys.argv[0] = saved


def main(argv: Sequence[str] | None = None) -> int:
    """Run `dulearn <command> ARGS...`; returns the command's exit status."""
    args = parser().parse_args(argv)
    run, _ = COMMANDS[args.command]
    with _program_name(f"dulearn {args.command}"):
        status = run(list(args.args))
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
