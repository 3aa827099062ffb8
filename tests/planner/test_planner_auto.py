"""parallelism=auto: for every model preset on 1, 2, 8, 64 and 512 GPUs it returns a layout that the real
make_plan validates on matching resources and that fits, or says no layout fits with the GPUs that would
do; the layout it writes into the config is what the run then uses."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from neox.config.plan import make_plan
from neox.config.resources import Resources
from neox.errors import ConfigError
from neox.launch.compose import compose_config
from neox.launch import planning
from neox.planner.gpus import GPUS
from neox.launch.planning import setup_from

PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "model").glob("*.yaml"))
GPU_COUNTS = (1, 2, 8, 64, 512)


def slurm(gpus: int) -> tuple:
    per_node = min(gpus, 8)
    nodes = gpus // per_node
    return (["cluster=slurm", f"cluster.nodes={nodes}", f"cluster.gpus_per_node={per_node}", "cluster.gpu=H100"],
            Resources("slurm", "cuda", gpus, per_node, nodes=nodes))


@pytest.mark.parametrize("gpus", GPU_COUNTS)
@pytest.mark.parametrize("model", PRESETS)
def test_auto_returns_a_layout_that_validates(model, gpus, tmp_path, embedded_ready, capsys):
    overrides, res = slurm(gpus)
    cfg = compose_config([f"model={model}", "parallelism=auto", f"run_dir={tmp_path}/run", *overrides])
    try:
        chosen = planning.resolve_auto(cfg, res)
    except ConfigError as exc:  # nothing fits: only where the model cannot fit at all, with the advice
        text = str(exc)
        assert gpus < 512 and f"no layout of model={model}" in text and "\n" not in text, text
        assert "with " in text and "GPUs (cluster.nodes=" in text and "fits at" in text, text
        setup = setup_from(cfg, res)
        # the leanest layout really needs more than the card: ZeRO-3 over every GPU, checkpointed, micro 1
        assert setup.model.n_layers * setup.model.d_model ** 2 * 12 * 16 / gpus > 0.5 * GPUS["H100"].memory
        return
    out = capsys.readouterr().out
    assert "parallelism=auto:" in out and "->" in out
    plan = make_plan(chosen, res)  # the real validation: layout rule, batch triad, memory
    p = chosen.parallelism
    assert plan.world_size == gpus == p.tp * p.pp * p.dp
    assert plan.global_batch == chosen.train.global_batch
    assert chosen.parallelism.name == "auto"
    est, _ = planning.estimate_run(plan)
    assert est.fits, est.verdict()


def test_every_preset_fits_somewhere_at_512_gpus():
    """The big presets need many GPUs, but none is beyond 512 H100s: auto chooses (does not raise) for each,
    a layout of all 512."""
    for model in PRESETS:
        overrides, res = slurm(512)
        cfg = compose_config([f"model={model}", "parallelism=auto", *overrides])
        p = planning.resolve_auto(cfg, res).parallelism
        assert p.tp * p.pp * p.dp == 512, model


def test_a_rerun_resumes_with_the_layout_chosen_before(tmp_path, capsys):
    overrides, res = slurm(8)
    cfg = compose_config(["model=6.7B", "parallelism=auto", f"run_dir={tmp_path}/run", *overrides])
    first = planning.resolve_auto(cfg, res)
    (tmp_path / "run").mkdir()
    saved = first.copy()
    # an earlier launch's choice (say, with older constants), on the same 8 GPUs
    saved.parallelism.tp, saved.parallelism.pp, saved.parallelism.dp, saved.train.micro_batch = 4, 1, 2, 1
    saved.train.grad_accum = first.train.global_batch // 2
    (tmp_path / "run" / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    again = planning.resolve_auto(cfg, res)
    assert (again.parallelism.tp, again.train.micro_batch) == (4, 1)
    assert "resuming with the layout this run chose before" in capsys.readouterr().out


def test_the_global_batch_is_kept_when_given():
    overrides, res = slurm(8)
    cfg = compose_config(["model=1.4B", "parallelism=auto", "train.global_batch=256", "train.micro_batch=null",
                          "train.grad_accum=null", *overrides])
    chosen = planning.resolve_auto(cfg, res)
    t, p = chosen.train, chosen.parallelism
    assert t.global_batch == 256 == t.micro_batch * t.grad_accum * p.dp


def test_a_rerun_on_other_gpus_chooses_again(tmp_path, capsys):
    overrides, res = slurm(8)
    cfg = compose_config(["model=6.7B", "parallelism=auto", f"run_dir={tmp_path}/run", *overrides])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(OmegaConf.to_yaml(planning.resolve_auto(cfg, res)))
    overrides, res = slurm(64)
    cfg = compose_config(["model=6.7B", "parallelism=auto", f"run_dir={tmp_path}/run", *overrides])
    again = planning.resolve_auto(cfg, res)
    p = again.parallelism
    assert p.tp * p.pp * p.dp == 64 and "choosing again for 64" in capsys.readouterr().out


def test_a_rerun_says_which_of_its_own_settings_the_saved_layout_replaces(tmp_path, capsys):
    overrides, res = slurm(8)
    base = ["model=6.7B", "parallelism=auto", f"run_dir={tmp_path}/run", *overrides]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(OmegaConf.to_yaml(planning.resolve_auto(compose_config(base), res)))
    capsys.readouterr()
    planning.resolve_auto(compose_config([*base, "train.global_batch=4096"]), res)
    out = capsys.readouterr().out
    assert "resuming with the layout this run chose before" in out
    assert out.strip().endswith("it replaces this command's train.global_batch=4096 (a new run_dir chooses afresh)"), out
    again = planning.resolve_auto(compose_config([*base, "model.seq_len=1024"]), res)
    assert "choosing again for 1024" in capsys.readouterr().out and again.model.seq_len == 1024
