"""The benchmark's cache: what a result is keyed on, and where it is kept.

A key hashes what changes a result and nothing else: the inputs (adapter contents, model file
identities), the method and its options, crosslora's ``__version__`` and ``behaviour_digest``,
a hash of what crosslora's code *does*. That digest reads each module's syntax tree without
its docstrings (comments are not in the tree), so editing a comment, a docstring or the layout
of the code reuses hours of cached transfers, and any change to the code itself does not.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path

# The two files of a PEFT adapter: its identity, whatever notes lie beside them.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def digest(obj: object) -> str:
    """A short hash of a JSON-able key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def _without_docstrings(tree: ast.AST) -> ast.AST:
    """``tree`` with the docstring of its module, classes and functions removed."""
    scopes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if not isinstance(node, scopes) or not node.body:
            continue
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            if isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def behaviour_digest(root: str | os.PathLike[str] | None = None) -> str:
    """A hash of what the code under ``root`` (default: the installed crosslora package) does.

    Each ``.py`` file counts by its syntax tree without docstrings, each ``.json`` data file
    (the model families) by its parsed content, both with their paths. Comments, docstrings and
    formatting do not change it; a changed constant, name or statement does. The tree's dump
    also depends on the Python version, so a new Python recomputes once.
    """
    folder = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")) + sorted(folder.rglob("*.json")):
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".py":
            shape = ast.dump(_without_docstrings(ast.parse(text, str(path))))
        else:
            shape = json.dumps(json.loads(text), sort_keys=True)
        h.update(path.relative_to(folder).as_posix().encode() + b"\0" + shape.encode() + b"\0")
    return h.hexdigest()[:20]


def folder_identity(folder: Path, content: bool, names: tuple[str, ...] | None = None) -> dict:
    """Files of a folder (all, or ``names``) with their content hash (``content``) or size and
    mtime. Adapters are identified by their two PEFT files only, so notes beside them (README,
    evaluation logs) do not invalidate cached results."""
    out = {}
    files = [folder / n for n in names] if names else folder.iterdir()
    for f in sorted(p for p in files if p.is_file() and not p.name.startswith(".")):
        if content:
            out[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
        else:
            st = f.stat()
            out[f.name] = [st.st_size, st.st_mtime_ns]
    return out


class Cache:
    """JSON results by key, one file each under ``root``, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def get(self, key: str) -> dict | None:
        path = self.root / f"{key}.json"
        if path.exists():
            self.hits += 1
            return json.loads(path.read_text())
        self.misses += 1
        return None

    def put(self, key: str, value: dict) -> None:
        tmp = self.root / f".{key}.tmp"
        tmp.write_text(json.dumps(value))
        os.replace(tmp, self.root / f"{key}.json")
