"""The layout rule (neox.config.layout): each rule with a layout it accepts and one it refuses, in process.

The expected layouts and messages are worked out by hand from the rule's statement (tp x pp x dp
ranks; tp divides every sharded dimension; ranks fill nodes in order, tp peers adjacent), not read
back from the code.
"""
from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from neox.config.layout import Layout, check_split, fit, resolve_layout
from neox.config.resources import Resources
from neox.config.schema import ModelConfig, ParallelConfig
from neox.errors import ConfigError, LaunchError
from neox.model.gpt import GPTConfig

MODEL = GPTConfig(n_layers=4, d_model=64, n_heads=8, n_kv_heads=4, d_ff=256, seq_len=32, vocab_size=256)
GPUS8 = Resources("local", "cuda", 8, 8)
CPU2 = Resources("local", "cpu", 2, 2)
CPU3 = Resources("local", "cpu", 3, 3)
HOSTS = Resources("hostfile", "cuda", 16, 8, nodes=2)
UNEVEN_HOSTS = Resources("hostfile", "cuda", 12, 4, nodes=2)  # 8 + 4 slots: at most 4 per node
SIX_WIDE = Resources("hostfile", "cuda", 12, 6, nodes=2)
SLURM = Resources("slurm", "cuda", 16, 8, nodes=2)
WORKERS = Resources("worker", "cpu", 4, 4)

# (rule, parallelism overrides, model overrides, resources, dry_run, (world, tp, pp, dp) or (error, message))
CASES = [
    ("zero23 with pp", dict(zero_stage=1, pp=2), {}, GPUS8, False, (8, 1, 2, 4)),
    ("zero23 with pp", dict(zero_stage=2, pp=2), {}, GPUS8, False,
     (ConfigError, r"parallelism.zero_stage=2 with pp=2: DeepSpeed does not support ZeRO-2/3")),
    ("pipe partition", dict(pipe_partition="type:Block"), {}, GPUS8, False, (8, 1, 1, 8)),
    ("pipe partition", dict(pipe_partition="balanced"), {}, GPUS8, False,
     (ConfigError, r"parallelism.pipe_partition='balanced' must be compute, uniform, parameters or type:<Layer>")),
    ("tp divides heads", dict(tp=4), {}, GPUS8, False, (8, 4, 1, 2)),
    ("tp divides heads", dict(tp=4), dict(n_heads=6), GPUS8, False,
     (ConfigError, r"model.n_heads=6 is not divisible by parallelism.tp=4")),
    ("tp divides kv heads", dict(tp=2), dict(n_kv_heads=2), GPUS8, False, (8, 2, 1, 4)),
    ("tp divides kv heads", dict(tp=4), dict(n_kv_heads=2), GPUS8, False,
     (ConfigError, r"model.n_kv_heads=2 is not divisible by parallelism.tp=4")),
    ("tp divides d_model", dict(tp=2), dict(d_model=66), GPUS8, False, (8, 2, 1, 4)),
    ("tp divides d_model", dict(tp=4), dict(d_model=66), GPUS8, False,
     (ConfigError, r"model.d_model=66 is not divisible by parallelism.tp=4")),
    ("tp divides d_ff", dict(tp=2), dict(d_ff=130), GPUS8, False, (8, 2, 1, 4)),
    ("tp divides d_ff", dict(tp=4), dict(d_ff=130), GPUS8, False,
     (ConfigError, r"the FFN size 130 is not divisible by parallelism.tp=4; set model.d_ff")),
    ("tp divides the vocab", dict(tp=2), dict(vocab_size=258), GPUS8, False, (8, 2, 1, 4)),
    ("tp divides the vocab", dict(tp=4), dict(vocab_size=258), GPUS8, False,
     (ConfigError, r"the padded vocab 258 is not divisible by parallelism.tp=4; use a model.vocab_multiple")),
    ("a layer per stage", dict(pp=4, dp=2), {}, GPUS8, False, (8, 1, 4, 2)),
    ("a layer per stage", dict(pp=8), {}, GPUS8, False,
     (ConfigError, r"model.n_layers=4 is fewer than parallelism.pp=8 stages")),
    ("sequence parallel splits seq_len", dict(tp=4, sequence_parallel=True), {}, GPUS8, False, (8, 4, 1, 2)),
    ("sequence parallel splits seq_len", dict(tp=4, sequence_parallel=True), dict(seq_len=30), GPUS8, False,
     (ConfigError, r"parallelism.sequence_parallel needs model.seq_len=30 divisible by parallelism.tp=4")),
    ("tp overlap without sequence parallelism", dict(tp=2, tp_overlap=True), {}, GPUS8, False, (8, 2, 1, 4)),
    ("tp overlap without sequence parallelism", dict(tp=2, tp_overlap=True, sequence_parallel=True), {}, GPUS8,
     False, (ConfigError, r"parallelism.tp_overlap hides the all-reduces of tensor parallelism without sequence "
                          r"parallelism; set parallelism.sequence_parallel=false or parallelism.tp_overlap=false")),
    ("tp overlap without ZeRO-3", dict(tp=2, tp_overlap=True, zero_stage=2), {}, GPUS8, False, (8, 2, 1, 4)),
    ("tp overlap without ZeRO-3", dict(tp=2, tp_overlap=True, zero_stage=3), {}, GPUS8, False,
     (ConfigError, r"parallelism.tp_overlap does not work with ZeRO-3 .* use parallelism.zero_stage<=2 or "
                   r"tp_overlap=false")),
    ("slots split into groups", dict(pp=2), {}, GPUS8, False, (8, 1, 2, 4)),
    ("slots split into groups", dict(pp=3), {}, GPUS8, False,
     (LaunchError, r"8 GPUs cannot be split into tp=1 x pp=3 groups; set parallelism.dp or use a multiple of 3")),
    ("enough slots", dict(dp=2), {}, CPU2, False, (2, 1, 1, 2)),
    ("enough slots", dict(dp=4), {}, CPU2, False,
     (LaunchError, r"the layout tp=1 x pp=1 x dp=4 needs 4 processes, but 2 are available here")),
    ("a Slurm job's tasks are its ranks", dict(), {}, SLURM, False, (16, 1, 1, 16)),
    ("a Slurm job's tasks are its ranks", dict(tp=4, dp=8), {}, SLURM, False,
     (LaunchError, r"= 32 ranks needs 32 GPUs but cluster.nodes=2 x 8 tasks per node gives 16: set cluster.nodes=4")),
    ("a Slurm job's tasks are its ranks", dict(dp=8), {}, SLURM, False,
     (LaunchError, r"= 8 ranks does not match the job's cluster.nodes=2 x 8 tasks per node = 16 ranks")),
    ("a started world is the layout's", dict(tp=2), {}, WORKERS, False, (4, 2, 1, 2)),
    ("a started world is the layout's", dict(dp=2), {}, WORKERS, False,
     (LaunchError, r"the launcher started 4 workers but the layout tp=1 x pp=1 x dp=2 needs 2")),
    ("as many ranks on every node", dict(dp=4), {}, HOSTS, False, (4, 1, 1, 4)),
    ("as many ranks on every node", dict(dp=3), {}, HOSTS, False,
     (LaunchError, r"= 3 ranks cannot be spread evenly over 2 nodes of 8 GPUs; set parallelism.dp")),
    ("as many ranks on every node", dict(), {}, UNEVEN_HOSTS, False,
     (LaunchError, r"= 12 ranks cannot be spread evenly over 2 nodes of 4 GPUs")),
    ("tp inside a node", dict(tp=2), {}, SIX_WIDE, False, (12, 2, 1, 6)),
    ("tp inside a node", dict(tp=4), {}, SIX_WIDE, False,
     (LaunchError, r"parallelism.tp=4 does not fit inside one node of 6 GPUs.*"
                   r"set parallelism.tp_across_nodes_is_slow=true to force it")),
    ("tp inside a node", dict(tp=4, tp_across_nodes_is_slow=True), {}, SIX_WIDE, False, (12, 4, 1, 3)),
    ("tp inside a node", dict(tp=2, dp=1), {}, CPU3, False, (2, 2, 1, 1)),  # one node: nothing straddles
]


def _run(parallel: dict, model: dict, res: Resources, dry_run: bool) -> Layout:
    return resolve_layout(ParallelConfig(name="p", **parallel), dataclasses.replace(MODEL, **model), res, dry_run)


@pytest.mark.parametrize("rule,parallel,model,res,dry_run,expected", CASES,
                         ids=[f"{c[0]}-{'refused' if isinstance(c[-1][0], type) else 'accepted'}" for c in CASES])
def test_rule(rule, parallel, model, res, dry_run, expected):
    if isinstance(expected[0], type):
        error, message = expected
        with pytest.raises(error, match=message):
            _run(parallel, model, res, dry_run)
    else:
        layout = _run(parallel, model, res, dry_run)
        assert (layout.world, layout.tp, layout.pp, layout.dp) == expected and layout.warnings == ()


def test_every_rule_has_a_case_it_accepts_and_one_it_refuses():
    outcomes = {}
    for rule, *_, expected in CASES:
        outcomes.setdefault(rule, set()).add(isinstance(expected[0], type))
    assert all(seen == {True, False} for seen in outcomes.values()), outcomes


def test_a_dry_run_warns_where_a_launch_would_be_refused():
    layout = _run(dict(tp=4, dp=2), {}, CPU2, dry_run=True)
    assert (layout.world, layout.dp) == (8, 2)
    assert layout.warnings == ("the layout tp=4 x pp=1 x dp=2 needs 8 GPUs, but 2 are available here; use a smaller "
                               "layout or a cluster with more GPUs (dry run: launching would fail)",)
    # planning for another machine, it assumes nodes of 8 GPUs: tp=4 groups fit them, a group of 16 does not
    assert _run(dict(tp=4, dp=4), {}, CPU2, dry_run=True).world == 16
    with pytest.raises(LaunchError, match="parallelism.tp=16 does not fit inside one node of 8 GPUs"):
        fit(16, 1, 1, CPU2, dry_run=True)


def test_the_vocab_is_padded_before_the_rule_sees_it():
    from neox.config.plan import gpt_config

    model = OmegaConf.structured(ModelConfig(name="m", n_layers=1, d_model=64, n_heads=8, d_ff=128,
                                             vocab_size=50257, vocab_multiple=128))
    check_split(gpt_config(model), 8)  # 50304 % 8 == 0
    model.vocab_multiple = 2  # 50258 % 8 != 0: never padded further for tp behind the user's back
    with pytest.raises(ConfigError, match="padded vocab 50258"):
        check_split(gpt_config(model), 8)


def test_the_planner_and_slurm_say_the_same(tmp_path):
    """One rule: the plan (before any launch) and the Slurm submission refuse a layout in the same words.
    The submission checks the plan it is handed against the job's allocation again: a real plan (tp=2,
    accepted) changed to the tp=4 layout the planner refused is refused there too."""
    from neox.config.plan import make_plan
    from neox.launch import slurm
    from neox.launch.compose import compose_config
    from neox.launch.resources import detect

    def planned_with(tp: int):
        cfg = compose_config(["cluster=slurm", "cluster.nodes=2", "cluster.gpus_per_node=6", f"parallelism.tp={tp}",
                              "model.n_heads=8", "model.d_model=512", f"run_dir={tmp_path}/r"])
        return make_plan(cfg, detect(cfg.cluster))

    with pytest.raises(LaunchError) as planned:
        planned_with(4)
    accepted = planned_with(2)
    assert (accepted.tp, accepted.dp, slurm.check(accepted)) == (2, 6, 6)
    with pytest.raises(LaunchError) as submitted:
        slurm.check(dataclasses.replace(accepted, tp=4, dp=3))
    assert str(planned.value) == str(submitted.value)
    assert "parallelism.tp=4 does not fit inside one node of 6 GPUs" in str(planned.value)
