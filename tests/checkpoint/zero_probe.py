"""One process: for each source ZeRO stage S given, train a tiny engine 3 steps at S, save through
CheckpointManager, train 2 more; then for each stage T in 0, 1, 2 build a fresh engine at stage T,
load, train the same 2 steps. Prints one JSON line: {S: {"source": [...2 losses], "0": [...], "1": [...],
"2": [...], "moments_dropped": [...]}} (the last: a stage-0 resume with Adam's moments zeroed, which
the test expects to miss).

    python tests/checkpoint/zero_probe.py <run_dir with config.yaml> <S,S...> <scratch dir>
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the support package


def main(run_dir: str, source_stages: str, scratch: str) -> None:
    from ckpt_helpers import one_process_plan
    from support.plans import cpu

    from neox.checkpoint import CheckpointManager
    from neox.config.plan import config_dict, make_plan
    from neox.model.gpt import GPT, cross_entropy_loss
    from neox.train import distributed, engine as engine_lib
    from neox.train.worker import model_layout

    info = distributed.init(60)
    cfg, plan = one_process_plan(Path(run_dir) / "config.yaml")
    tokens = torch.randint(0, plan.model.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))

    def make(stage: int):
        nonlocal plan
        cfg.parallelism.zero_stage = stage
        plan = make_plan(cfg, cpu(1))
        torch.manual_seed(1234)
        return engine_lib.initialize(GPT(plan.model), plan, info.device)[0]

    def manager():  # as the trainer makes it: with the run's layout (the ZeRO stage just set)
        return CheckpointManager(ckpts, 3, True, layout=model_layout(plan))

    def steps(engine, first: int, n: int):
        losses = []
        for i in range(first, first + n):
            for m in range(2):  # two micro-batches per optimizer step
                t = tokens.roll(i * 2 + m, 1)
                loss = cross_entropy_loss(engine(t[:, :-1]), t[:, 1:])
                engine.backward(loss)
                engine.step()
            losses.append(loss.item())
        return losses

    results = {}
    for source_stage in source_stages.split(","):
        ckpts = Path(scratch) / source_stage
        shutil.rmtree(ckpts, ignore_errors=True)
        src = make(int(source_stage))
        steps(src, 0, 3)
        manager().save(src, 3, {"run_state": {"step": 3}, "config": config_dict(plan.config)})
        out = {"source": steps(src, 3, 2)}
        for stage in (0, 1, 2):
            engine = make(stage)
            manager().load(engine)
            out[str(stage)] = steps(engine, 3, 2)
        # The sensitivity check: a resume that loses Adam's moments must miss the curve by far.
        engine = make(0)
        manager().load(engine)
        for state in engine.optimizer.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                state[key].zero_()
        out["moments_dropped"] = steps(engine, 3, 2)
        results[source_stage] = out
    print(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
