"""Evaluation: the `neox` lm-eval model scores exactly what lm_eval's own HF model scores on the export,
and perplexity equals transformers' own loss on the same windows."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_helpers import exported, runs_root, trained, write_model_dir
from neox.evaluate.__main__ import main as evaluate_main

MC_DOCS = [
    {"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None"], "answer": 0},
    {"question": "import", "choices": [" os", " sys", " 123"], "answer": 1},
    {"question": "for i in", "choices": [" range(10):", " True:", " x"], "answer": 0},
    {"question": "class Point:\n    def", "choices": [" __init__(self, x, y):", " run", "("], "answer": 0},
    {"question": "", "choices": ["print(1)", "}}}"], "answer": 0},  # an empty context: the EOD token
]


def write_task(folder: Path, docs: list = MC_DOCS) -> Path:
    """A local multiple-choice task: a YAML over a jsonl, no network."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (folder / "neox_mc.yaml").write_text(
        "task: neox_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


def hflm(path: Path):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(path), dtype="float32", device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """(a random neox model dir with a padded vocab, its HF export)."""
    from neox.convert.__main__ import main as convert_main

    root = tmp_path_factory.mktemp("eval")
    src = write_model_dir(root / "neox", {"rotary_pct": 0.25, "parallel_residual": True, "tied_embeddings": False})
    assert convert_main(["to-hf", str(src), str(root / "hf")]) == 0
    return src, root / "hf"


@pytest.mark.slow
def test_lm_eval_task_on_a_checkpoint_equals_its_hf_export(tmp_path, tmp_path_factory, embedded_ready):
    """A tp=2 checkpoint (padded vocab) through lm_eval as `neox`, its export through lm_eval as `hf`."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import neox.evaluate.lm_eval_adapter  # noqa: F401

    root = runs_root(tmp_path_factory)
    run = trained("neox_tp2", root)
    hf_dir = exported(run, root)
    tm = TaskManager(include_path=str(write_task(tmp_path / "task")))
    ours = lm_eval.simple_evaluate(model="neox", model_args=f"checkpoint={run}", tasks=["neox_mc"], task_manager=tm,
                                   log_samples=True, batch_size=2)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=["neox_mc"],
                                     task_manager=tm, log_samples=True, batch_size=2, device="cpu")
    a, b = ours["samples"]["neox_mc"], theirs["samples"]["neox_mc"]
    assert len(a) == len(b) == len(MC_DOCS)
    for x, y in zip(sorted(a, key=lambda s: s["doc_id"]), sorted(b, key=lambda s: s["doc_id"])):
        lls_a, lls_b = [r[0][0] for r in x["resps"]], [r[0][0] for r in y["resps"]]
        assert np.allclose(lls_a, lls_b, atol=1e-4, rtol=0), (lls_a, lls_b)
        assert [r[0][1] for r in x["resps"]] == [r[0][1] for r in y["resps"]]
    assert ours["results"]["neox_mc"]["acc,none"] == theirs["results"]["neox_mc"]["acc,none"]


def test_rolling_loglikelihood_and_generation_equal_lm_evals_hf_model(small):
    from lm_eval.api.instance import Instance

    from neox.evaluate.lm_eval_adapter import NeoxLM

    src, hf_dir = small
    ours, theirs = NeoxLM(checkpoint=str(src), batch_size=2), hflm(hf_dir)
    texts = ["def f(x):\n    return x * 2\n" * 5, "short", "import os\nimport sys\n" * 3]  # 150 bytes: 3 windows
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    assert np.allclose(ours.loglikelihood_rolling(rolling), theirs.loglikelihood_rolling(rolling), atol=1e-4, rtol=0)
    gen = [Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}), i)
           for i, c in enumerate(["def f(x):", "class A:\n"])]
    assert ours.generate_until(gen) == theirs.generate_until(gen)


def test_lm_eval_cli_runs_the_neox_model_and_refuses_an_unknown_task(small, tmp_path, capsys):
    src, _ = small
    task = write_task(tmp_path / "task")
    out = tmp_path / "results"
    common = ["--model", "neox", "--model_args", f"checkpoint={src}", "--include_path", str(task),
              "--output_path", str(out)]
    assert evaluate_main(["lm-eval", *common, "--tasks", "neox_mc_typo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("neox: error: unknown lm-eval task 'neox_mc_typo'; `lm-eval ls tasks` lists them (local YAML "
                   "tasks need --include_path DIR)")
    assert not out.exists()
    assert evaluate_main(["lm-eval", *common, "--tasks", "neox_mc"]) == 0
    results = json.loads(next(out.rglob("results*.json")).read_text())
    assert 0.0 <= results["results"]["neox_mc"]["acc,none"] <= 1.0


# ------------------------------------------------------------------------------------ perplexity
def write_data(prefix: Path, n_docs: int = 40, vocab: int = 256, seed: int = 0) -> str:
    from neox.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(str(prefix), np.uint16) as w:
        for _ in range(n_docs):
            doc = rng.integers(0, vocab, size=int(rng.integers(5, 80)))
            w.add_document(np.append(doc, 256))  # each prepared document ends with its EOD
    return str(prefix)


def test_perplexity_equals_transformers_loss_on_the_same_windows(small, tmp_path, capsys):
    from neox.data.indexed import IndexedDataset
    from neox.data.sampling import split_ranges
    from hf_helpers import hf_causal_lm

    src, hf_dir = small
    prefix = write_data(tmp_path / "corpus")
    assert evaluate_main(["perplexity", str(src), f"data.prefixes=[{prefix}]", "data.split=80,20,0",
                          "split=valid", "batch_size=3"]) == 0
    line = capsys.readouterr().out.strip()
    # the reference: the split's documents in windows of 65 tokens, scored by transformers' own loss
    data = IndexedDataset(prefix)
    lo, hi = split_ranges(len(data), "80,20,0")["valid"]
    tokens = torch.from_numpy(np.concatenate([data[i] for i in range(lo, hi)]).astype(np.int64))
    hf = hf_causal_lm(hf_dir)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, 64):
            w = tokens[start:start + 65][None]
            nll += hf(w, labels=w).loss.item() * (w.shape[1] - 1)
            count += w.shape[1] - 1
    loss = nll / count
    assert f"{count:,} tokens, loss {loss:.4f} nats/token, perplexity {math.exp(loss):.3f}" in line, line


@pytest.mark.parametrize("args,message", [
    ([], "give the data: data.prefixes=[path/to/prefix,...]"),
    (["data.prefixes=[/nonexistent/x]"], "/nonexistent/x.bin/.idx not found"),
    (["data.prefixes=[{prefix}]", "split=dev"], "split=dev is not one of train, valid, test"),
    (["data.prefixes=[{prefix}]", "batch_sz=3"], "bad setting: Key 'batch_sz' not in 'PerplexityConfig'"),
    (["data.prefixes=[{wide}]"], "beyond the tokenizer's 257: it was prepared with another tokenizer"),
], ids=["no-data", "missing", "bad-split", "unknown-key", "wrong-tokenizer"])
def test_perplexity_bad_input_is_one_line(small, tmp_path, capsys, args, message):
    src, _ = small
    prefix, wide = write_data(tmp_path / "ok"), write_data(tmp_path / "wide", vocab=301, seed=1)
    args = [a.format(prefix=prefix, wide=wide) for a in args]
    assert evaluate_main(["perplexity", str(src), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neox: error: ") and message in err and "\n" not in err, err
