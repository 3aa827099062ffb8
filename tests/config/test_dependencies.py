"""Imports between neox's packages run one way: each package imports only the ones below it, and the
two entry points at the top, launch and train, never import each other (what both need is in config
or errors). Every import counts, including the ones inside functions."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Tuple

NEOX = Path(__file__).resolve().parents[2] / "neox"

# Bottom to top. Packages on one line are siblings: neither imports the other.
LAYERS = [
    ("__init__", "errors"),  # neox/__init__.py holds only the version
    ("kernels",),
    ("model",),
    ("data", "planner"),
    ("config",),
    ("parallel",),
    ("checkpoint",),
    ("convert",),
    ("generate",),
    ("evaluate",),
    ("launch", "train"),
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _package(path: Path, root: Path) -> str:
    """neox/launch/slurm/task.py -> launch; neox/errors.py -> errors."""
    return path.relative_to(root).parts[0].removesuffix(".py")


def _imported(tree: ast.AST, module: str) -> Iterator[Tuple[int, str]]:
    """(line, neox package) for every import of neox code in a module (relative imports resolved)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[:-node.level]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
            if names[0] == "neox":  # from neox import kernels
                names = [f"neox.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "neox" and len(parts) > 1:
                yield node.lineno, parts[1]


def violations(root: Path = NEOX) -> List[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        module = ".".join(rel.with_suffix("").parts)
        if path.name == "__init__.py":
            module += ".__init__"
        me = _package(path, root)
        if me not in RANK:
            found.append(f"{rel}: package {me!r} is not in LAYERS; place it there")
            continue
        for line, other in _imported(ast.parse(path.read_text()), module):
            if other == me or other not in RANK:
                continue
            if RANK[other] >= RANK[me]:
                found.append(f"{rel}:{line}: {me} imports {other}")
    return found


def test_imports_run_one_way():
    bad = violations()
    assert not bad, "imports against the layering (LAYERS, bottom to top):\n" + "\n".join(bad)


def test_the_check_catches_launch_and_train_importing_each_other(tmp_path):
    root = tmp_path / "neox"
    for pkg, text in (("launch", "def f():\n    from neox.train.worker import run\n"),
                      ("train", "from neox.launch import resources\n"),
                      ("config", "from ..launch import job\n"),
                      ("kernels", "from neox import model\n")):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "x.py").write_text(text)
    assert sorted(violations(root)) == ["neox/config/x.py:1: config imports launch",
                                        "neox/kernels/x.py:1: kernels imports model",
                                        "neox/launch/x.py:2: launch imports train",
                                        "neox/train/x.py:1: train imports launch"]
