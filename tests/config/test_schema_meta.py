"""Every schema field declares its resume class and, when it is a number, its domain: a new field
cannot be added without deciding both (the resume check and the launcher's validation read them)."""
from __future__ import annotations

import re
from dataclasses import fields

import pytest

from neox.config.domains import RESUME_CLASSES, Choices, leaf_fields
from neox.config.schema import CLUSTER_SCHEMAS, KernelOps, RunConfig

CLUSTERS = list(CLUSTER_SCHEMAS.values())  # `cluster` is one of these, picked by its kind


def _leaves():
    yield from leaf_fields(RunConfig)
    for schema in CLUSTERS:
        yield from leaf_fields(schema, "cluster.")


def _numeric(annotation: str) -> bool:
    """int or float, also inside Optional[...] and List[...] (the schema's annotations are strings)."""
    return re.search(r"\b(int|float)\b", annotation) is not None


def test_every_field_has_a_resume_class():
    missing = [key for key, f in _leaves() if f.metadata.get("resume") not in RESUME_CLASSES]
    assert not missing, f"schema fields without metadata resume=error|warn|ignore: {missing}"
    assert len(list(leaf_fields(RunConfig))) > 60  # the walk reaches every section


def test_every_numeric_field_has_a_domain():
    numeric = [key for key, f in _leaves() if _numeric(str(f.type))]
    assert {"optim.lr", "train.seed", "cluster.master_port", "data.weights", "model.n_heads"} <= set(numeric)
    missing = [key for key, f in _leaves() if key in numeric and f.metadata.get("domain") is None]
    assert not missing, f"numeric schema fields without a domain: {missing}"


@pytest.mark.parametrize("key,cls", [
    ("model.rotary_base", "error"), ("model.norm_eps", "error"), ("model.n_layers", "error"),
    ("optim.lr", "warn"), ("parallelism.tp", "warn"), ("train.save_every", "ignore"), ("cluster", "ignore"),
])
def test_resume_classes_of_some_fields(key, cls):
    assert dict(leaf_fields(RunConfig))[key].metadata["resume"] == cls


def test_kernel_ops_match_the_kernel_registry():
    """The per-op switches and their choices are the kernels' own list."""
    from neox.kernels._backend import IMPLS, OPS

    assert tuple(f.name for f in fields(KernelOps)) == OPS
    assert all(f.metadata["domain"] == Choices(IMPLS) for f in fields(KernelOps))


def test_structured_config_ignores_the_metadata():
    """OmegaConf builds the typed config from the dataclasses as before: metadata adds no keys."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(RunConfig)
    assert set(cfg.optim.keys()) == {f.name for f in fields(type(RunConfig().optim))}
    assert cfg.optim.lr == 6e-4 and OmegaConf.is_missing(cfg, "model")
