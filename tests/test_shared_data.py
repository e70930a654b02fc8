"""The rule for ../shared: a test that needs it skips without it, except under CI, where it fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDS_SHARED = "tests/test_loss.py::test_golden_cases"  # reads ../shared/golden
# CI unset / CI=false: skipped with the reason (pytest exits 0); CI=true: an error (exit 1).
CASES = {None: ("1 skipped", 0), "false": ("1 skipped", 0), "true": ("1 error", 1)}


def test_missing_shared_skips_outside_ci_and_fails_in_ci(tmp_path: Path) -> None:
    procs = {}
    for ci in CASES:  # one pytest run per case, concurrently (each imports torch)
        env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
        env["DULEARN_SHARED"] = str(tmp_path)  # an empty folder: no data, no golden files
        if ci is not None:
            env["CI"] = ci
        procs[ci] = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", NEEDS_SHARED],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for ci, (summary, code) in CASES.items():
        text = procs[ci].communicate(timeout=300)[0]
        assert procs[ci].returncode == code and summary in text, (ci, text)
        assert f"{tmp_path / 'golden'} is absent" in text  # the reason is shown either way
        assert ("CI=true requires it" in text) == (ci == "true"), (ci, text)
