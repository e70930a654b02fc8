"""The dulearn logger: a [rank r/w] prefix on every line; ranks above 0 only warn unless all ranks log."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from runs import ROOT

SCRIPT = """
import logging, sys
from dulearn.logger import setup_logging
setup_logging(all_ranks=sys.argv[1] == "all")
log = logging.getLogger("dulearn.probe")
log.info("step 1")
log.warning("slow")
"""


@pytest.mark.parametrize("rank,mode,expect", [
    ("0", "main", ["[rank 0/2] INFO dulearn.probe: step 1", "[rank 0/2] WARNING dulearn.probe: slow"]),
    ("1", "main", ["[rank 1/2] WARNING dulearn.probe: slow"]),
    ("1", "all", ["[rank 1/2] INFO dulearn.probe: step 1", "[rank 1/2] WARNING dulearn.probe: slow"]),
])
def test_lines_carry_the_rank_and_other_ranks_only_warn(rank: str, mode: str, expect: list[str]):
    env = {**os.environ, "RANK": rank, "WORLD_SIZE": "2", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == expect, lines  # after the date and time
