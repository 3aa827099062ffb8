"""The planner through `launch.py` itself (neox.launch.cli.main in-process): plan=true prints the report and
launches nothing, a layout above the card is refused with one line, parallelism=auto prints its choice."""
from __future__ import annotations

from neox.launch.cli import main

NEOX_20B = ["model=20B", "parallelism=pp2_tp2", "parallelism.pp=4", "train.micro_batch=4", "train.grad_accum=32",
            "model.activation_checkpointing=full", "cluster=slurm", "cluster.nodes=12", "cluster.gpu=A100-40GB"]
ONE_GPU_20B = ["model=20B", "train.micro_batch=1", "cluster=slurm", "cluster.nodes=1", "cluster.gpus_per_node=1",
               "cluster.gpu=A100-80GB"]


def test_plan_true_prints_the_report_and_launches_nothing(tmp_path, capsys, embedded_ready):
    assert main([*NEOX_20B, "plan=true", f"run_dir={tmp_path}/run"]) == 0
    out = capsys.readouterr().out
    assert "verdict   fits: 27.7 of 39.6 GiB per GPU (A100 40GB)" in out and "plan: nothing launched" in out, out
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_layout_above_the_card_is_refused_in_one_line(tmp_path, capsys, embedded_ready):
    assert main([*ONE_GPU_20B, f"run_dir={tmp_path}/run"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("neox: error: the layout does not fit: 339.0 of 79.3 GiB per GPU (A100 80GB); the "
                           "biggest term is optimizer states (229.7 GiB); e.g. cluster.nodes=8"), last
    assert last.endswith("set plan.force=true to launch anyway"), last
    assert "verdict   does not fit" in err  # the report above it


def test_auto_prints_its_choice_and_validates(tmp_path, capsys, embedded_ready):
    assert main(["model=6.7B", "parallelism=auto", "train.global_batch=64", "train.micro_batch=null",
                 "train.grad_accum=null", "cluster=slurm", "cluster.nodes=1", "cluster.gpus_per_node=2",
                 "cluster.gpu=H200", "dry_run=true", f"run_dir={tmp_path}/run"]) == 0
    out = capsys.readouterr().out
    assert "parallelism=auto: " in out and "->" in out and "dry run: config valid" in out, out


def test_unknown_gpu_memory_is_one_line(tmp_path, capsys, embedded_ready):
    assert main(["model=1.4B", "cluster=slurm", "plan=true", f"run_dir={tmp_path}/run"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "neox: error: the planner needs the GPU's memory and a Slurm request does not say which GPUs it gets: "
        "set cluster.gpu_memory_gb=<GiB per GPU> (or cluster.gpu=H100|H200|A100-40GB|A100-80GB)")


def test_plan_true_in_a_sweep_plans_every_job(tmp_path, capsys, embedded_ready):
    """Hydra reads the arguments again for -m: the plan=true shorthand must reach it rewritten too."""
    assert main(["-m", "model=tiny,19M", "plan=true", "cluster.gpu=H100", f"hydra.sweep.dir={tmp_path}/sweep"]) == 0
    out = capsys.readouterr().out
    assert out.count("verdict   fits: ") == 2 and out.count("plan: nothing launched") == 2, out


def test_plan_true_here_without_a_gpu_asks_for_its_memory_first(tmp_path, capsys, embedded_ready):
    """Not this CPU box's RAM check: the plan is for a GPU, and none is named."""
    assert main(["model=1.4B", "plan=true", f"run_dir={tmp_path}/run"]) == 2
    assert "set cluster.gpu_memory_gb=<GiB per GPU>" in capsys.readouterr().err.strip().splitlines()[-1]


def test_plan_true_here_for_a_named_gpu_plans_that_gpu(tmp_path, capsys, embedded_ready):
    assert main(["model=1.4B", "train.micro_batch=4", "plan=true", "cluster.gpu=H100", f"run_dir={tmp_path}/run"]) == 0
    assert "verdict   fits: " in capsys.readouterr().out


def test_more_gpus_is_asked_for_in_the_clusters_own_terms(tmp_path, capsys, embedded_ready):
    """A local run has no cluster.nodes: the advice names cluster.gpus (and the batch it changes to)."""
    assert main(["model=1.4B", "train.micro_batch=8", "plan=true", "cluster.gpu=A100-40GB",
                 f"run_dir={tmp_path}/run"]) == 0
    out = capsys.readouterr().out
    assert "cluster.nodes" not in out and "a machine with cluster.gpus=4 (dp=4, parallelism.zero_stage=3, " in out, out


def test_plan_true_here_plans_cluster_gpus_gpus_and_shows_one_memory_figure(tmp_path, capsys, embedded_ready):
    """On a machine without GPUs, cluster.gpus is the count to plan for (not refused as 'this machine has
    none'), and the run summary leaves its per-process memory line to the planner's report."""
    assert main(["model=1.4B", "plan=true", "cluster.gpu=A100-40GB", "cluster.gpus=8", "train.micro_batch=4",
                 f"run_dir={tmp_path}/run"]) == 0
    out = capsys.readouterr().out
    assert "on 8 x A100 40GB" in out and "  memory    ~" not in out and "per process" not in out, out


def test_plan_true_plans_the_micro_batch_the_launch_would_size(tmp_path, capsys, embedded_ready):
    """No batch given: the launch on an H200 sizes the micro-batch for the card, so plan=true (here, without
    one) must plan that size, not the CPU default of 8 (review 19, R3)."""
    from neox.config.plan import DEFAULT_MICRO_BATCH
    from neox.config.resources import Resources
    from neox.launch import planning
    from neox.launch.compose import compose_config

    args = ["model=125M", "cluster=slurm", "cluster.gpus_per_node=1", "cluster.gpu=H200", f"run_dir={tmp_path}/run"]
    launched = planning.size_micro_batch(compose_config(args), Resources("slurm", "cuda", 1, 1)).train.micro_batch
    capsys.readouterr()
    assert launched > DEFAULT_MICRO_BATCH
    assert main([*args, "plan=true"]) == 0
    out = capsys.readouterr().out
    assert f"train.micro_batch={launched}: the largest the planner fits on 1 x H200" in out, out
    assert f"micro {launched} x accum 1 no ckpt" in out, out  # the planner's layout line
