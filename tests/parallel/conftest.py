"""The folder's multi-process checks, run in two shared spawns instead of one per test.

Starting N processes costs each of them the torch + DeepSpeed imports (~5 s of CPU), which on 2 cores
is most of what a small check costs. `two_ranks` and `four_ranks` each start their processes once
per session (through the trainer's own distributed init) and run every check of that size in turn;
each test then asks for its own check's outcome (`Checks.outcome`) or reads what its run wrote. A
check that fails stops the ones after it in the same spawn (their ranks may be out of step): those
tests fail saying which check failed first. Selecting one test still runs its whole group.
"""
from __future__ import annotations

import pytest

from support.workers import Checks


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory) -> Checks:
    """tp=2 equivalence, fused kernels, dropout streams and the overlapped backward; DeepSpeed with tp=2;
    the pp=2 runs; the pipeline stages against ModelLayout."""
    import test_model_layout
    import test_pipeline as pipe
    import test_tp_deepspeed
    import test_tp_equivalence
    import test_tp_fused
    import test_tp_overlap
    import test_tp_random
    from pipeline_harness import train

    checks = Checks(2, tmp_path_factory.mktemp("two_ranks"))
    for i, names in enumerate(test_tp_equivalence.GROUPS):
        checks.add(f"tp_equivalence{i}", test_tp_equivalence._worker, names)
    checks.add("tp_fused", test_tp_fused._worker)
    checks.add("tp_random", test_tp_random._worker)
    checks.add("tp_overlap", test_tp_overlap._worker)
    checks.add("tp_deepspeed", test_tp_deepspeed._worker, 0, False)
    checks.add("pp2", train, pipe.PP2, str(checks.dir("pp2")))
    checks.add("pp2_resumed", train, pipe.resumed(checks.dir("pp2")), str(checks.dir("pp2_resumed")))
    checks.add("pp2_bf16", train, pipe.BF16, str(checks.dir("pp2_bf16")))
    checks.add("model_layout_pipeline", test_model_layout._check_pipeline_stages)
    return checks.run(timeout=800, init="neox")


@pytest.fixture(scope="session")
def four_ranks(tmp_path_factory) -> Checks:
    """The topology's groups; DeepSpeed with tp=2 x dp=2; the pp=2 x dp=2 and pp=2 x tp=2 runs."""
    import test_pipeline as pipe
    import test_tp_deepspeed
    import test_tp_topology
    from pipeline_harness import train

    checks = Checks(4, tmp_path_factory.mktemp("four_ranks"))
    checks.add("topology", test_tp_topology._worker)
    checks.add("tp_deepspeed", test_tp_deepspeed._worker, 1, True)
    checks.add("pp2_dp2", train, pipe.PP2_DP2, str(checks.dir("pp2_dp2")))
    for variant, run in sorted(pipe.PP2_TP2.items()):
        checks.add(f"pp2_tp2_{variant}", train, run, str(checks.dir(f"pp2_tp2_{variant}")))
    return checks.run(timeout=800, init="neox")
