"""An unset train.micro_batch on GPUs (neox.launch.planning.size_micro_batch): the largest micro-batch the
planner fits on the card in the run's layout, checked against the planner's own estimates of that size and of
the next one up; CPU runs, a micro-batch given on the command line, an unknown card and a rerun of a run dir
keep theirs; the launch records the size it chose."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from neox.config.plan import DEFAULT_MICRO_BATCH, make_plan
from neox.config.resources import Resources
from neox.launch import planning
from neox.launch.compose import compose_config

H200 = Resources("slurm", "cuda", 1, 1)  # a one-GPU Slurm job on an H200 (cluster.gpu names the card)
ONE_H200 = ["cluster=slurm", "cluster.gpus_per_node=1", "cluster.gpu=H200"]


def _h200(overrides: list, tmp_path) -> tuple:
    cfg = compose_config([f"run_dir={tmp_path}/run", *ONE_H200, *overrides])
    return cfg, planning.size_micro_batch(cfg, H200)


def _fits(cfg, micro: int, accum: int = 1) -> bool:
    setup = planning.setup_from(cfg, H200)
    return planning.evaluate(setup, planning.candidate_from(cfg, 1, micro, accum)).fits


@pytest.mark.parametrize("model", ["125M", "1.4B"])
def test_the_largest_micro_batch_that_fits(model, tmp_path, capsys):
    cfg, sized = _h200([f"model={model}"], tmp_path)
    micro = sized.train.micro_batch
    assert cfg.train.micro_batch is None and micro in planning.MICRO_BATCH_CHOICES
    assert _fits(sized, micro) and (micro == max(planning.MICRO_BATCH_CHOICES) or not _fits(sized, 2 * micro))
    assert micro > DEFAULT_MICRO_BATCH or model == "1.4B"  # what 125M got before: 8
    assert f"train.micro_batch={micro}: the largest the planner fits on 1 x H200" in capsys.readouterr().out
    plan = make_plan(sized, H200)
    assert (plan.micro_batch, plan.grad_accum, plan.global_batch) == (micro, 1, micro)


def test_a_global_batch_is_kept_and_divided(tmp_path):
    _, sized = _h200(["model=1.4B", "train.global_batch=24"], tmp_path)
    plan = make_plan(sized, H200)
    assert plan.global_batch == 24 and 24 % plan.micro_batch == 0 and plan.micro_batch > 1
    assert not _fits(sized, 2 * plan.micro_batch) or 24 % (2 * plan.micro_batch)


def test_what_is_not_sized(tmp_path, capsys):
    given = compose_config([f"run_dir={tmp_path}/a", "model=125M", "train.micro_batch=4", *ONE_H200])
    assert planning.size_micro_batch(given, H200).train.micro_batch == 4
    both = compose_config([f"run_dir={tmp_path}/b", "model=125M", "train.grad_accum=2", "train.global_batch=16",
                           *ONE_H200])
    assert planning.size_micro_batch(both, H200).train.micro_batch is None  # the two given fix it
    accum = compose_config([f"run_dir={tmp_path}/e", "model=125M", "train.grad_accum=4", *ONE_H200])
    assert planning.size_micro_batch(accum, H200).train.micro_batch is None  # the user steers the batch: 8 x 4
    cpu = compose_config([f"run_dir={tmp_path}/c", "model=125M"])
    assert planning.size_micro_batch(cpu, Resources("local", "cpu", 2, 2)).train.micro_batch is None
    unknown = compose_config([f"run_dir={tmp_path}/d", "model=125M", "cluster=slurm", "cluster.gpus_per_node=8"])
    slurm = Resources("slurm", "cuda", 8, 8)
    assert planning.size_micro_batch(unknown, slurm).train.micro_batch is None  # no card named: nothing to size
    assert make_plan(cpu, Resources("local", "cpu", 2, 2)).micro_batch == DEFAULT_MICRO_BATCH
    assert "train.micro_batch=" not in capsys.readouterr().out


def test_a_rerun_keeps_the_size_chosen_before(tmp_path, capsys):
    cfg, first = _h200(["model=125M"], tmp_path)
    (tmp_path / "run").mkdir()
    saved = first.copy()
    saved.train.micro_batch = 2  # an earlier launch's choice (another card, older constants)
    (tmp_path / "run" / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    assert planning.size_micro_batch(cfg, H200).train.micro_batch == 2
    assert "train.micro_batch=2: as this run sized it before" in capsys.readouterr().out
    longer = compose_config([f"run_dir={tmp_path}/run", *ONE_H200, "model=125M", "model.seq_len=1024"])
    assert planning.size_micro_batch(longer, H200).train.micro_batch != 2  # sized for another shape: afresh


def test_a_pipeline_is_not_sized(tmp_path):
    """The largest micro-batch is the fewest in flight: under pp the bubble (parallelism=auto weighs both)."""
    _, sized = _h200(["model=1.4B", "parallelism=pp2", "train.global_batch=64"], tmp_path)
    assert sized.train.micro_batch is None


def test_the_launch_records_the_batch_it_trains_with(tmp_path):
    """prepare writes the defaults out where no global batch is set: config.yaml and checkpoints say 8 x 1."""
    cpu = compose_config([f"run_dir={tmp_path}/c", "model=125M"])
    ready = planning.prepare(cpu, Resources("local", "cpu", 2, 2))
    assert (ready.train.micro_batch, ready.train.grad_accum) == (DEFAULT_MICRO_BATCH, 1)
    given = compose_config([f"run_dir={tmp_path}/g", "model=125M", "train.global_batch=32"])
    ready = planning.prepare(given, Resources("local", "cpu", 2, 2))
    assert (ready.train.micro_batch, ready.train.grad_accum) == (None, None)  # batch_triad derives them
    assert make_plan(ready, Resources("local", "cpu", 2, 2)).global_batch == 32


def test_parallelism_auto_refuses_a_batch_below_one(tmp_path):
    """auto reads micro_batch x grad_accum as the batch per GPU: 0 is refused in one line, not searched with."""
    from neox.errors import ConfigError

    cfg = compose_config([f"run_dir={tmp_path}/run", *ONE_H200, "parallelism=auto", "train.micro_batch=0"])
    with pytest.raises(ConfigError, match=r"^train\.micro_batch=0 must be at least 1$"):
        planning.resolve_auto(cfg, H200)
