"""The run plan carries the validated config typed once (neox.config.plan.typed_config): the schema's
dataclasses, the cluster section as the dataclass its kind names, whether the config was composed by
Hydra (launch.py) or read back from the run dir's config.yaml (the workers). Everything after the
entry points reads the plan; `config_dict` is what checkpoints and W&B record."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from support.plans import cpu, plan_of

from neox.config.plan import config_dict, make_plan
from neox.config.resources import Resources
from neox.config.schema import (DataConfig, HostfileCluster, LocalCluster, LoggingConfig, ModelConfig, OptimConfig,
                                ParallelConfig, RunConfig, SlurmCluster, TrainConfig)
from neox.train.config_files import load_config

REPO = Path(__file__).resolve().parents[2]
# Each cluster kind, with resources make_plan accepts for the tiny default run (a hostfile needs no file here).
KINDS = [
    (["cluster=local"], cpu(1), LocalCluster),
    (["cluster=hostfile", "cluster.launcher=openmpi"], Resources("hostfile", "cuda", 1, 1), HostfileCluster),
    (["cluster=slurm", "cluster.gpus_per_node=0", "cluster.tasks_per_node=1", "+cluster.sbatch_extra.hold=true",
      "cluster.setup=[module load x]"], Resources("slurm", "cpu", 1, 1), SlurmCluster),
]


@pytest.mark.parametrize("overrides, resources, cluster_type", KINDS)
def test_the_plan_carries_the_config_as_the_schemas_dataclasses(tmp_path, overrides, resources, cluster_type):
    cfg, plan = plan_of([*overrides, "model.kernel_ops.cross_entropy=reference", f"run_dir={tmp_path}"], resources)
    c = plan.config
    sections = (c, c.model, c.parallelism, c.data, c.optim, c.train, c.logging, c.cluster)
    assert [type(s) for s in sections] == [RunConfig, ModelConfig, ParallelConfig, DataConfig, OptimConfig,
                                           TrainConfig, LoggingConfig, cluster_type]
    assert c.model.kernel_ops.cross_entropy == "reference" and dict(plan.model.kernel_ops) == {
        "cross_entropy": "reference"}
    # What a checkpoint records (and the resume check compares) is the composed config, to the value.
    assert config_dict(c) == OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("overrides, resources, cluster_type", KINDS)
def test_a_config_read_back_by_a_worker_is_typed_alike(tmp_path, overrides, resources, cluster_type):
    """config.yaml holds the cluster under the schema's `Any` field: read back it is a plain dict until
    typed_config gives it its kind's dataclass."""
    cfg, plan = plan_of([*overrides, f"run_dir={tmp_path}"], resources)
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    loaded = load_config(str(path))
    assert isinstance(OmegaConf.to_object(loaded).cluster, dict)  # what typed_config has to fix
    again = make_plan(loaded, resources)
    assert type(again.config.cluster) is cluster_type
    assert again.config == plan.config and again == plan


def test_sbatch_extra_and_setup_come_back_as_plain_data(tmp_path):
    _, plan = plan_of([*KINDS[2][0], f"run_dir={tmp_path}"], KINDS[2][1])
    assert plan.config.cluster.sbatch_extra == {"hold": True} and type(plan.config.cluster.sbatch_extra) is dict
    assert plan.config.cluster.setup == ["module load x"] and type(plan.config.cluster.setup) is list


# The consumers of the plan: they read typed sections, never the raw config.
PLAN_READERS = ["neox/train/engine.py", "neox/train/metrics.py", "neox/launch/summary.py", "neox/launch/local.py",
                *sorted(str(p.relative_to(REPO)) for p in (REPO / "neox/launch/slurm").glob("*.py"))]


@pytest.mark.parametrize("module", PLAN_READERS)
def test_plan_readers_do_not_touch_omegaconf(module):
    tree = ast.parse((REPO / module).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert "omegaconf" not in imported, f"{module} imports omegaconf: it should read the typed plan"
