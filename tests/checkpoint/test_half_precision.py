"""Checkpoints of DeepSpeed's fp16/bf16 optimizer without ZeRO (the default on a GPU: bf16, ZeRO-0) are
read like any other: consolidation, export, generation and resharding into ZeRO-1/2 take their fp32
master weights and Adam moments. Before, every weights-only reader refused them ("saved by DeepSpeed's
fp16/bf16 optimizer without ZeRO"), so a default GPU run could not be exported or sampled."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from neox.checkpoint.files import atomic_write_text
from neox.checkpoint.reshard import full_state, restore
from neox.checkpoint.safe_load import safe_load
from neox.errors import CheckpointError
from support.runs import REPO, launch, tiny, train_losses

pytestmark = pytest.mark.slow  # two real 1-process runs

BF16 = ["train.precision=bf16", "cluster.cpu_procs=1", "train.save_every=2", "train.keep_checkpoints=3",
        "train.log_every=1"]


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("bf16") / "run"
    launch(tiny(*BF16, "train.steps=3", f"run_dir={run}"))
    return run


def test_fp32_masters_are_read_and_consolidated(bf16_run, tmp_path):
    root = bf16_run / "checkpoints" / "step_00000002"
    full, step = full_state(root)
    module = safe_load(root / "mp_rank_00_model_states.pt")["module"]
    assert step >= 2 and set(full) == set(module)
    beyond_bf16 = 0
    for name, state in full.items():
        master = state["param"]
        assert master.dtype == torch.float32 and module[name].dtype == torch.bfloat16
        assert torch.equal(master.to(torch.bfloat16), module[name]), name  # the module is the masters, rounded
        beyond_bf16 += int(not torch.equal(master, module[name].float()))
        assert state["exp_avg"].abs().sum() > 0, name  # Adam's moments came along
    assert beyond_bf16 > 0  # fp32 masters, not the 16-bit weights upcast
    out = tmp_path / "model.safetensors"
    cons = subprocess.run([sys.executable, "-m", "neox.checkpoint.consolidate", str(root), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert cons.returncode == 0, cons.stderr[-2000:]
    weights = load_file(str(out))
    assert all(torch.equal(weights[n], full[n]["param"]) for n in full)


def test_resharding_into_zero1_continues_exactly(bf16_run, tmp_path):
    """Step 3's loss is computed from the weights after step 2: resumed from the bf16 ZeRO-0 checkpoint at
    ZeRO-1 (DeepSpeed's other optimizer, fed the fp32 masters) it is the uninterrupted run's, bitwise."""
    run = tmp_path / "zero1"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(bf16_run / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000002")
    atomic_write_text(run / "checkpoints" / "latest", "step_00000002")
    shutil.copy(bf16_run / "config.yaml", run / "config.yaml")
    out = launch(tiny(*BF16, "train.steps=3", "parallelism.zero_stage=1", f"run_dir={run}"))
    assert "resharding step_00000002: saved with tp=1 pp=1 dp=1 zero=0" in out.stdout + out.stderr
    assert train_losses(run)[3] == train_losses(bf16_run)[3]


def test_resharding_into_the_half_precision_optimizer_is_one_line():
    """Writing a full state into DeepSpeed's fp16/bf16 optimizer without ZeRO is not done yet: one line."""
    class HalfPrecisionEngine:  # what restore() sees of such an engine: ZeRO-0, not torch's optimizer
        module = torch.nn.Linear(2, 2)
        optimizer = object()

        @staticmethod
        def zero_optimization_stage():
            return 0

    state = {n: {"param": p.detach().float(), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
             for n, p in HalfPrecisionEngine.module.named_parameters()}
    with pytest.raises(CheckpointError, match=r"\(fp16/bf16 without ZeRO\) is not supported yet; resume with "
                                              r"parallelism.zero_stage=1"):
        restore(HalfPrecisionEngine(), state, 2.0)
