"""Pipeline parallelism follows the single-process model (CPU, gloo, fp32, same seed and data).

Every pipelined run trains 10 optimizer steps of a tiny GPT through the trainer's own engine
(`neox.train.engine.initialize`) with `train_batch`/`eval_batch`, and must match `GPT` trained with
plain torch (same AdamW groups, schedule and clipping) on the same global batches to 1e-5: the
loss each step, the gradient norm each step, and the final eval loss. The single-process run of
the global batch is what pp=1 and dp=2 compute (dp=2 averages the same gradients). Each stage also
checks that its initial weights are exactly GPT(cfg)'s under the seed (its shard under tp).
"""
from __future__ import annotations

import pytest

from neox.errors import ConfigError
from neox.parallel.pipeline import (check_deepspeed_config, deepspeed_layer_specs, describe_partition,
                                    partition_layers)

from pipeline_harness import collect, model_config, reference

TOL = 1e-5
BASE = dict(steps=10, accum=2, micro=2, eval_micro=2, tp=1)


def assert_follows(got: dict, want: dict, what: str, steps=None) -> None:
    steps = steps or sorted(want["losses"])
    for s in steps:
        assert abs(got["losses"][s] - want["losses"][s]) <= TOL, \
            f"{what}: step {s} loss {got['losses'][s]:.7f} vs reference {want['losses'][s]:.7f}"
        if got["norms"].get(s) is not None:
            assert abs(got["norms"][s] - want["norms"][s]) <= TOL * max(1.0, want["norms"][s]), \
                f"{what}: step {s} grad norm {got['norms'][s]:.7f} vs reference {want['norms'][s]:.7f}"


# ------------------------------------------------------------------------------------ partitioning
def test_partitions_and_plan() -> None:
    specs = deepspeed_layer_specs(model_config(n_layers=4))  # Embedding, Block x4, FinalNorm, Head
    assert partition_layers(specs, 2, "uniform") == [0, 4, 7]
    assert partition_layers(specs, 2, "type:Block") == [0, 3, 7]
    parts = partition_layers(specs, 2, "parameters")
    assert parts[0] == 0 and parts[-1] == 7 and 0 < parts[1] < 7
    plan = describe_partition(specs, parts, "parameters")
    assert plan.splitlines()[0] == "pipeline: 2 stages, partition 'parameters'"
    assert "stage 0: layers 0-" in plan and "stage 1:" in plan and "Head" in plan and "parameters" in plan


@pytest.mark.parametrize("n_layers, stages, method, match", [
    (3, 4, "type:Block", "without a 'block' layer"),  # 3 blocks for 4 stages
    (1, 5, "uniform", "empty"),  # 4 layers for 5 stages
    (1, 5, "parameters", "empty"),
    (2, 2, "type:Attention", "matches no layer"),
    (2, 2, "balanced", "unknown pipeline partition method"),
])
def test_bad_partition_is_a_config_error(n_layers: int, stages: int, method: str, match: str) -> None:
    specs = deepspeed_layer_specs(model_config(n_layers=n_layers))
    with pytest.raises(ConfigError, match=match):
        partition_layers(specs, stages, method)


@pytest.mark.parametrize("ds_config, match", [
    ({"zero_optimization": {"stage": 2}}, "ZeRO-2"),
    ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}, "zero_stage=1"),
    ({"activation_checkpointing": {"cpu_checkpointing": True}}, "cpu_checkpointing"),
])
def test_deepspeed_traps_are_config_errors(ds_config: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_deepspeed_config(ds_config)
    check_deepspeed_config({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}})


# ------------------------------------------------------------------------------------ equivalence
# The runs are trained by the folder's shared spawns (conftest.py: two_ranks, four_ranks).
PP2 = dict(BASE, pp=2, zero=1, partition="parameters", checkpointing="full", model=dict(tied_embeddings=True),
           save_at=5)  # tied embeddings, activation checkpointing, ZeRO-1; saves after step 5
PP2_DP2 = dict(BASE, pp=2, dp=2, zero=1, partition="uniform", checkpointing="none", model=dict(n_layers=2))
PP2_TP2 = {
    "tp": dict(BASE, pp=2, tp=2, model=dict(tied_embeddings=True), zero=0, partition="type:Block",
               checkpointing="none"),
    "tp-sequence-parallel": dict(BASE, pp=2, tp=2, model=dict(tied_embeddings=True), zero=1, partition="parameters",
                                 checkpointing="full", sequence_parallel=True),
}
# bf16 weights with ZeRO-1 (bf16 + ZeRO-0 cannot load a pipeline checkpoint in DeepSpeed); saves at step 2,
# then a fresh engine in the same processes loads it and repeats steps 3-4
BF16 = dict(BASE, steps=4, pp=2, zero=1, precision="bf16", partition="uniform", checkpointing="full", model=dict(),
            save_at=2, reload=True)


def resumed(pp2_dir) -> dict:
    """PP2 again, resuming from the checkpoint PP2 saved at step 5 in `pp2_dir`."""
    return dict(PP2, resume=True, save_at=None, checkpoints=str(pp2_dir / "checkpoints"))


def _result(checks, name: str, run: dict) -> dict:
    checks.outcome(name)
    return collect(run, checks.dir(name))


def test_pp2_follows_single_process(two_ranks) -> None:
    got, want = _result(two_ranks, "pp2", PP2), reference(PP2)
    assert_follows(got, want, "pp=2")
    assert abs(got["eval"] - want["eval"]) <= TOL


def test_pp2_checkpoint_resumes_at_the_same_loss(two_ranks) -> None:
    pp2 = _result(two_ranks, "pp2", PP2)
    got = _result(two_ranks, "pp2_resumed", resumed(two_ranks.dir("pp2")))
    assert sorted(got["losses"]) == list(range(6, 11)), "the run did not resume after step 5"
    assert_follows(got, pp2, "pp=2 resumed at step 5", steps=range(6, 11))
    assert abs(got["eval"] - pp2["eval"]) <= TOL


def test_pp2_dp2_follows_single_process(four_ranks) -> None:
    got, want = _result(four_ranks, "pp2_dp2", PP2_DP2), reference(PP2_DP2)
    assert_follows(got, want, "pp=2 x dp=2")
    assert abs(got["eval"] - want["eval"]) <= TOL


@pytest.mark.parametrize("variant", sorted(PP2_TP2))
def test_pp2_tp2_follows_single_process(four_ranks, variant: str) -> None:
    run = PP2_TP2[variant]
    got, want = _result(four_ranks, f"pp2_tp2_{variant}", run), reference(run)
    assert_follows(got, want, f"pp=2 x tp=2 {variant}")
    assert abs(got["eval"] - want["eval"]) <= TOL


def test_pp2_bf16_zero1_trains_and_resumes(two_ranks) -> None:
    """The loss stays near the fp32 reference, and the reloaded engine repeats steps 3-4 exactly."""
    got, want = _result(two_ranks, "pp2_bf16", BF16), reference(BF16)
    for s in range(1, 5):
        assert abs(got["losses"][s] - want["losses"][s]) < 0.05, \
            f"bf16 step {s}: loss {got['losses'][s]:.4f} vs fp32 {want['losses'][s]:.4f}"
    assert got["reloaded"] == {3: got["losses"][3], 4: got["losses"][4]}
