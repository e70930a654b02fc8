"""The `dulearn` command: its subcommands and their help, `python -m dulearn`, the console-script entry point."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dulearn import cli

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("command", ["train", "evaluate", "metrics", "segment", "demo"])
def test_every_command_prints_its_own_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ")
    expected = {"train": "--config", "evaluate": "--davis", "metrics": "--results", "segment": "--mask",
                "demo": "--steps"}[command]
    assert expected in out, out


def test_shards_command_runs_the_builder_in_its_own_process():
    """dulearn never imports the shard builder (it depends on dulearn): `dulearn shards` starts it."""
    done = subprocess.run([sys.executable, "-m", "dulearn", "shards", "--help"], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: ") and "--short-side" in done.stdout, done.stderr
    done = subprocess.run([sys.executable, "-m", "dulearn", "shards", "videos", "/no/such/folder", "--out",
                           "/tmp/never"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "/no/such/folder" in done.stderr, done.stderr


def test_python_m_dulearn_lists_the_commands_and_runs_them():
    done = subprocess.run([sys.executable, "-m", "dulearn", "--help"], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in cli.COMMANDS:
        assert f"\n  {command} " in done.stdout, done.stdout
    done = subprocess.run([sys.executable, "-m", "dulearn", "train", "--help"], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: dulearn train "), done.stdout[:200]
    done = subprocess.run([sys.executable, "-m", "dulearn", "nonsense"], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_console_script_points_at_the_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["dulearn"].partition(":")
    assert getattr(importlib.import_module(module), name) is cli.main


def test_documented_module_commands_keep_working():
    for argv in (["dulearn/train.py", "--help"], ["-m", "dulearn.evaluate", "--help"], ["-m", "dulearn.segment", "--help"],
                 ["shards/build.py", "--help"]):
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
        assert done.returncode == 0 and done.stdout.startswith("usage: "), (argv, done.stderr[-500:])
