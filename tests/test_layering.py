"""dulearn is the library and shards/ the builder that uses it: no dulearn module imports shards."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = "shards"


def _is_forbidden(module: str) -> bool:
    return module == FORBIDDEN or module.startswith(FORBIDDEN + ".")


def forbidden_imports(source: str) -> list[str]:
    """The ``shards`` modules a Python source imports: import statements at any depth and
    ``importlib.import_module`` / ``__import__`` calls with a literal name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _is_forbidden(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_forbidden(node.module):
            found.append(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            arg = node.args[0].value
            if name in ("import_module", "__import__") and isinstance(arg, str) and _is_forbidden(arg):
                found.append(arg)
    return found


def test_the_check_finds_every_form_of_import():
    source = """
import os, shards.build
from shards.sources import VideoInput
def f():
    from shards import verify
    import importlib
    importlib.import_module("shards.writer")
    __import__("shards")
from .shards import x
import shardsy
from dulearn import shard_format
"""
    assert forbidden_imports(source) == ["shards.build", "shards.sources", "shards", "shards.writer", "shards"]


def test_no_dulearn_module_imports_shards():
    files = sorted((ROOT / "dulearn").rglob("*.py"))
    assert len(files) > 10
    offenders = {str(p.relative_to(ROOT)): found for p in files if (found := forbidden_imports(p.read_text()))}
    assert offenders == {}, f"dulearn must not import shards (the builder depends on dulearn): {offenders}"
