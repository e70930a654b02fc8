"""The `dulearn` logger: configured once per process, every line prefixed with `[rank r/w]`.

Lines go to stdout (where the progress and result lines of a run always went; SLURM keeps
them in each task's `_log.out`). By default only rank 0 logs below WARNING, since the ranks
of one machine share a terminal; a launcher whose tasks each have their own log file asks
for every rank.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from dulearn import distributed

FORMAT = "%(asctime)s [rank %(rank)d/%(world)d] %(levelname)s %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    """Adds the rank and world size to each record; drops rank>0 records below WARNING unless all_ranks."""

    def __init__(self, all_ranks: bool):
        super().__init__()
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank, record.world = distributed.rank(), distributed.world_size()
        return self.all_ranks or record.rank == 0 or record.levelno >= logging.WARNING


class _Stdout(logging.StreamHandler):
    """A handler that writes to whatever sys.stdout is at the time (pytest and submitit replace it)."""

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def setup_logging(*, all_ranks: bool = False, level: int = logging.INFO) -> logging.Logger:
    """Give the `dulearn` logger its stdout handler; later calls in the process change nothing."""
    logger = logging.getLogger("dulearn")
    if not any(isinstance(h, _Stdout) for h in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        handler.addFilter(_RankFilter(all_ranks))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False  # a host's root handlers would print every line twice
    return logger
