"""Tensor-parallel generation on 2 CPU processes gives the tokens of one process (that one run in this
process, through the same CLI entry point: a third interpreter would only add its start-up)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_helpers import write_model_dir

REPO = Path(__file__).resolve().parents[2]


def generate(model: Path, out: Path, *settings: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neox.generate", str(model), f"output={out}", *settings], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.slow
@pytest.mark.parametrize("section,settings", [
    # ALiBi: each rank's heads take their own slopes; greedy, batched prompts of different lengths
    ({"position": "alibi"}, ["max_new_tokens=12", "stop_at_eod=false"]),
    # GQA (2 kv heads, one per rank), tied head (vocab-sharded embedding), interleaved rotary; sampling
    ({"norm": "rmsnorm", "mlp": "swiglu", "n_kv_heads": 2, "tied_embeddings": True, "rotary_interleaved": True},
     ["max_new_tokens=12", "stop_at_eod=false", "temperature=0.9", "top_k=50", "top_p=0.9", "seed=5"]),
], ids=["alibi-greedy", "gqa-tied-sampled"])
def test_tp2_generates_the_tokens_of_one_process(tmp_path, capsys, section, settings):
    from neox.generate.__main__ import main

    model = write_model_dir(tmp_path / "m", section)
    prompts = ["prompt=def f(x):", "prompt=import os, sys", "prompt=#"]
    assert main([str(model), f"output={tmp_path / 'tp1.jsonl'}", *prompts, *settings]) == 0
    one_out, one_err = capsys.readouterr()
    two = generate(model, tmp_path / "tp2.jsonl", *prompts, *settings, "tp=2")
    assert two.returncode == 0, two.stderr[-2000:]
    rows1, rows2 = ([json.loads(x) for x in (tmp_path / f).read_text().splitlines()] for f in ("tp1.jsonl", "tp2.jsonl"))
    assert [r["tokens"] for r in rows2] == [r["tokens"] for r in rows1] and len(rows1) == 3
    assert two.stdout == one_out  # rank 0 alone prints
    assert two.stderr.count("tokens/s") == 1 and one_err.count("tokens/s") == 1


def test_tp_refuses_interactive_mode(tmp_path, capsys):
    from neox.generate.__main__ import main

    model = write_model_dir(tmp_path / "m", {})
    assert main([str(model), "interactive=true", "tp=2"]) == 2
    assert capsys.readouterr().err.strip() == "neox: error: interactive=true runs with tp=1 (one process reads the terminal)"
