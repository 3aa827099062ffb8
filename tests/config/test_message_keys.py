"""Every config key that neox's messages tell a user to set exists in the composed config.

The reference is Hydra's composition of conf/ (every cluster kind), not the schema module, so a
message naming a key Hydra would reject (`parallel.tp_across_nodes_is_slow=true`) fails here.
"""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest
from omegaconf import DictConfig

from neox.launch.compose import compose_config

NEOX = Path(__file__).resolve().parents[2] / "neox"
DOTTED = re.compile(r"(?<![\w.{/\[-])([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)")
FILE_SUFFIXES = {"safetensors", "json", "jsonl", "yaml", "bin", "idx", "pt", "py", "gz", "txt"}  # model.safetensors
NOT_OURS = ("hydra.",)  # Hydra's own settings (hydra.launcher.*): documented by Hydra, not composed here


def _keys(node: DictConfig, prefix: str = "") -> set:
    out = set()
    for k, v in node.items():
        out.add(prefix + k)
        if isinstance(v, DictConfig):
            out |= _keys(v, f"{prefix}{k}.")
    return out


@functools.lru_cache(maxsize=1)
def config_keys() -> tuple[frozenset, frozenset]:
    """(every dotted key of the composed config for each cluster kind, every leaf name)."""
    keys = set()
    for cluster in ("local", "hostfile", "slurm"):
        keys |= _keys(compose_config([f"cluster={cluster}"]))
    return frozenset(keys), frozenset(k.rsplit(".", 1)[-1] for k in keys)


def _strings(node: ast.AST) -> list:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def named_keys(root: Path = NEOX) -> list:
    """(file:line, key) for each key a message names: `a.b=` in any string, and in the message of a
    `raise`, any `a.b` whose `a` is a config section or whose `b` is a config field (e.g. `parallel.tp`)."""
    keys, leaves = config_keys()
    sections = {k for k in keys if "." not in k}
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        where = lambda node: f"{path.relative_to(root.parent)}:{node.lineno}"  # noqa: E731
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for m in DOTTED.finditer(node.value):
                    rest = node.value[m.end():]
                    if rest.startswith("=") and not rest.startswith("=="):
                        found.append((where(node), m.group(1)))
            if isinstance(node, ast.Raise) and node.exc is not None:
                for text in _strings(node.exc):
                    for m in DOTTED.finditer(text):
                        first, last = m.group(1).split(".")[0], m.group(1).rsplit(".", 1)[-1]
                        if (first in sections or last in leaves - sections) and last not in FILE_SUFFIXES:
                            found.append((where(node), m.group(1)))
    return sorted({(where, key) for where, key in found if not key.startswith(NOT_OURS)})


def test_the_scan_finds_keys_and_catches_a_wrong_section():
    found = named_keys()
    assert len(found) > 50  # the scan sees the messages (plan.py alone names dozens)
    keys, leaves = config_keys()
    assert "parallelism.tp_across_nodes_is_slow" in keys and "parallel.tp_across_nodes_is_slow" not in keys
    assert "tp" in leaves


def test_every_key_a_message_names_exists():
    keys, _ = config_keys()
    unknown = sorted({f"{where}: {key}" for where, key in named_keys() if key not in keys})
    assert not unknown, "messages name config keys Hydra would reject:\n" + "\n".join(unknown)


@pytest.mark.parametrize("message,key", [
    ("set parallel.tp_across_nodes_is_slow=true to force it", "parallel.tp_across_nodes_is_slow"),
    ("fix parallel.tp/pp/dp or the number of processes", "parallel.tp"),
])
def test_the_scan_flags_the_wrong_section(tmp_path, message, key):
    """The checker itself: a message naming a key under a section that does not exist is caught."""
    (tmp_path / "bad.py").write_text(f"def f():\n    raise ValueError({message!r})\n")
    keys, _ = config_keys()
    assert [k for _, k in named_keys(tmp_path) if k not in keys] == [key]


def test_the_tp_across_nodes_hint_is_an_override_hydra_accepts(tmp_path):
    """The message a too-wide tp group gets names a key that, set as it says, composes and then plans."""
    from neox.config.layout import fit
    from neox.config.plan import Resources, make_plan
    from neox.errors import LaunchError

    with pytest.raises(LaunchError) as err:
        fit(8, 1, 1, Resources("hostfile", "cuda", 24, 6, nodes=4))
    hint = re.search(r"set (\S+=true)", str(err.value)).group(1)
    assert hint == "parallelism.tp_across_nodes_is_slow=true"
    cfg = compose_config(["parallelism.tp=8", "model.n_heads=8", "model.d_model=512", hint, f"run_dir={tmp_path}/r"])
    plan = make_plan(cfg, Resources("hostfile", "cuda", 24, 6, nodes=4))
    assert plan.tp == 8
