"""Golden losses: a fixed tiny run whose first 20 training losses (and lrs, and final validation
loss) are pinned here, so any unintended numeric change (model, init, data order, optimizer, lr
schedule, loss) fails loudly.

The run: `python -m neox.train config.yaml` alone (one process, no launcher: this also covers a
worker started without RANK/WORLD_SIZE), fp32 on CPU, a 2-layer GPT on a corpus generated here from
a fixed integer recurrence (neither the machine's Python stdlib nor numpy's random streams enter
it), read as bytes.

Tolerance: each loss within RTOL = 1e-5 relative of its pin. How a CPU's kernels sum depends on its
vector width (AVX-512, AVX2, none), so the last bits of a step's loss can differ between x86-64
machines, and 20 steps of Adam carry that forward. Measured on an AVX-512 AMD EPYC against the same
run emulating older CPUs (ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
ONEDNN_MAX_CPU_ISA=AVX2; and =default / SSE4_2 / SSE41): at most 1.1e-7 relative over the 20 losses
(1 float32 ulp, at 2 of the 20 steps), the validation loss the same. RTOL is ~100x that, and still
far below what a small real change does to the 20 losses (largest relative change, measured):

    seed 1234 -> 1235             4.8e-2      init wang_init -> small_init   7.6e-2
    warmup_steps 4 -> 5           1.6e-2      init normal, std 0.02 -> 0.0202 8.2e-4
    lr +1%                        1.9e-3      weight_decay 0.1 -> 0.2         2.9e-4
    grad_clip 1.0 -> 0.99         2.7e-4      min_lr +1%                      1.5e-4
    beta2 0.95 -> 0.951           5.2e-5

Changes that move the 20 losses less than RTOL (not caught here; they are unit-tested where they
matter): weight_decay +1% (3.0e-6), norm_eps 1e-5 -> 1.1e-5 (3.5e-6), Adam eps x2 (1.7e-6),
rotary_base 10000 -> 10001 (2.2e-7).

To re-pin after an intended change: run the test, copy the losses it prints, and say why in the commit.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest

from support.runs import REPO, read_metrics

RTOL = 1e-5
STEPS = 20

OVERRIDES = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.seq_len=64",
             "model.vocab_size=257", "train.micro_batch=4", "train.grad_accum=1", f"train.steps={STEPS}",
             "train.log_every=1", "train.eval_every=1000", "train.eval_batches=2", f"train.save_every={STEPS}",
             "train.precision=fp32", "train.seed=1234", "optim.lr=3e-3", "optim.min_lr=3e-4",
             "optim.warmup_steps=4", "optim.decay=cosine", "cluster.cpu_procs=1", "logging.wandb=false",
             "logging.tensorboard=false", "data=files", "data.tokenizer=bytes"]

# Pinned 2026-11-30 (torch 2.14.1, numpy 2.4.6, AVX-512 AMD EPYC).
GOLDEN_LOSSES = [
    6.279818058013916, 6.073429107666016, 5.843062877655029, 5.708641529083252, 5.427743911743164,
    5.2265777587890625, 5.02371072769165, 4.858284950256348, 4.856020450592041, 4.776529312133789,
    4.504168510437012, 4.659863471984863, 4.491403102874756, 4.498218536376953, 4.454389572143555,
    4.4098711013793945, 4.402522087097168, 4.307276725769043, 4.3134002685546875, 4.311181545257568,
]
# The lr each record reports: the one the next step will use (warmup 4, cosine to min_lr at step 20).
GOLDEN_LRS = [
    0.0015, 0.00225, 0.003, 0.003, 0.002974060128544361, 0.0028972373688902374, 0.002772483976608436,
    0.002604594154601839, 0.0024000198145764633, 0.002166622633692871, 0.0019133719347217734, 0.00165,
    0.001386628065278227, 0.0011333773663071288, 0.0008999801854235374, 0.0006954058453981608,
    0.0005275160233915638, 0.0004027626311097629, 0.0003259398714556389, 0.0003,
]
GOLDEN_VALID = 4.35223388671875


def corpus(n_docs: int = 400) -> List[np.ndarray]:
    """Documents drawn from a sparse byte-level Markov chain (3 successors per byte), from a 31-bit
    linear congruential generator: the same tokens on every machine and library version."""
    state = 20261130

    def rand() -> int:
        nonlocal state
        state = (1103515245 * state + 12345) % 2**31
        return state >> 8

    successors = [[32 + rand() % 95 for _ in range(3)] for _ in range(256)]
    docs = []
    for _ in range(n_docs):
        token, doc = 32 + rand() % 95, []
        for _ in range(64 + rand() % 192):
            doc.append(token)
            token = successors[token][rand() % 3]
        docs.append(np.array(doc, dtype=np.uint16))
    return docs


def golden_run(root: Path, *extra: str, env: Optional[Dict[str, str]] = None) -> Tuple[List[float], List[float], float]:
    """(train losses, lrs, final validation loss) of the golden run with `extra` overrides and `env`
    (how the drifts in this module's docstring were measured)."""
    from neox.data.indexed import IndexedDatasetWriter
    from neox.launch.compose import compose_config
    from neox.launch.job import save_config

    prefix = root / "corpus"
    if not prefix.with_suffix(".idx").exists():
        with IndexedDatasetWriter(str(prefix), np.uint16) as w:
            for doc in corpus():
                w.add_document(doc)
    run = root / f"run{len(list(root.glob('run*')))}"
    cfg = compose_config([*OVERRIDES, f"data.prefixes=[{prefix}]", f"run_dir={run}", *extra])
    config = save_config(cfg, run)
    child = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    child.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "neox.train", str(config)], cwd=REPO, env=child,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = read_metrics(run)
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    valid = [r["valid/loss"] for r in records if "valid/loss" in r]
    return [r["train/loss"] for r in train], [r["train/lr"] for r in train], valid[-1]


def test_first_20_losses_match_the_pinned_ones(tmp_path):
    losses, lrs, valid = golden_run(tmp_path)
    assert lrs == pytest.approx(GOLDEN_LRS, rel=1e-12)
    for step, (got, want) in enumerate(zip(losses, GOLDEN_LOSSES), 1):
        assert abs(got - want) <= RTOL * abs(want), (
            f"step {step}: loss {got!r}, pinned {want!r} (relative {abs(got - want) / want:.1e} > {RTOL:g}); "
            f"all losses now: {losses}")
    assert len(losses) == len(GOLDEN_LOSSES) == STEPS
    assert abs(valid - GOLDEN_VALID) <= RTOL * GOLDEN_VALID, (valid, GOLDEN_VALID)
