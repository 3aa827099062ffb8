"""Generation: the KV cache changes nothing but speed, batching changes nothing per row, the sampling
settings are Hugging Face's, and the command line's inputs and bad inputs."""
from __future__ import annotations

import io
import json

import pytest
import torch

from hf_helpers import random_prompts, write_model_dir
from neox.generate import Generator, SamplingConfig
from neox.generate.__main__ import main as generate_main

POSITIONS = {
    "rotary-halves": {"rotary_pct": 0.5, "parallel_residual": True},
    "rotary-interleaved-gqa": {"norm": "rmsnorm", "mlp": "swiglu", "n_kv_heads": 2, "rotary_interleaved": True},
    "alibi": {"position": "alibi"},
    "learned": {"position": "learned", "tied_embeddings": True},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gen")
    return {name: write_model_dir(root / name, section, seed=i) for i, (name, section) in enumerate(POSITIONS.items())}


def reference_greedy(model, prompt: list, new: int) -> list:
    """Greedy decoding the plain way: the training forward over the whole sequence at every step."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            seq.append(int(model(torch.tensor([seq]))[0, -1, :257].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("name", sorted(POSITIONS))
def test_kv_cache_batched_and_plain_greedy_agree(models, name):
    gen = Generator.load(models[name])
    prompts = random_prompts(257, [12, 5, 20, 1], seed=3)
    cfg = SamplingConfig(max_new_tokens=24, stop_at_eod=False)
    cached = [t for t, _ in gen.generate_ids(prompts, cfg, use_cache=True)]
    assert cached == [t for t, _ in gen.generate_ids(prompts, cfg, use_cache=False)]
    assert cached == [gen.generate_ids([p], cfg)[0][0] for p in prompts]  # one row at a time, no padding
    assert cached == [reference_greedy(gen.model, p, 24) for p in prompts]


@pytest.mark.parametrize("name", ["rotary-halves", "alibi"])
def test_kv_cache_and_batching_agree_when_sampling(models, name):
    gen = Generator.load(models[name])
    prompts = random_prompts(257, [7, 15, 3], seed=4)
    cfg = SamplingConfig(max_new_tokens=20, temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.3,
                         stop_at_eod=False, seed=11)
    cached = gen.generate_ids(prompts, cfg, use_cache=True)
    assert cached == gen.generate_ids(prompts, cfg, use_cache=False)
    assert cached == gen.generate_ids(prompts, cfg)  # the seed makes it repeatable
    assert cached != gen.generate_ids(prompts, SamplingConfig(**{**cfg.__dict__, "seed": 12}))


def test_sampling_filters_match_transformers():
    from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    from neox.generate.sampling import filter_top_k, filter_top_p, penalize_repeats

    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    ids = torch.randint(0, 300, (4, 30))
    seen = torch.zeros(4, 300, dtype=torch.bool).scatter(1, ids, True)
    assert torch.equal(penalize_repeats(logits, seen, 1.7), RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone()))
    scaled = TemperatureLogitsWarper(0.7)(ids, logits.clone())
    assert torch.equal(logits / 0.7, scaled)
    assert torch.equal(filter_top_k(scaled, 17), TopKLogitsWarper(17)(ids, scaled.clone()))
    for p in (0.05, 0.5, 0.9, 0.999):
        ours, theirs = filter_top_p(scaled, p), TopPLogitsWarper(p)(ids, scaled.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), p


def test_stops_and_limits(models):
    gen = Generator.load(models["rotary-halves"])
    prompt = random_prompts(257, [6], seed=5)[0]
    free = gen.generate_ids([prompt], SamplingConfig(max_new_tokens=20, stop_at_eod=False))[0][0]
    (tokens, why), = gen.generate_ids([prompt], SamplingConfig(max_new_tokens=20, stop_tokens=[free[4]],
                                                               stop_at_eod=False))
    assert tokens == free[:free.index(free[4]) + 1] and why == "stop_token"
    (tokens, why), = gen.generate_ids([prompt], SamplingConfig(max_new_tokens=7, stop_at_eod=False))
    assert tokens == free[:7] and why == "max_new_tokens"
    (tokens, why), = gen.generate_ids([prompt], SamplingConfig(max_new_tokens=500, stop_at_eod=False))
    assert len(tokens) == 64 - 6 and why == "context"  # the context ends the row, said as such
    prompt_text = "def f(x):"
    free = gen.generate_ids(gen.encode([prompt_text]), SamplingConfig(max_new_tokens=20, stop_at_eod=False))[0][0]
    text = gen.tok.decode(free)
    stop = next(text[i:i + 2] for i in range(2, len(text)) if text[i:i + 2].isascii() and len(text[i:i + 2]) == 2)
    done, = gen.generate([prompt_text], SamplingConfig(max_new_tokens=20, stop=[stop], stop_at_eod=False))
    assert done.stop_reason == "stop_string" and done.text == text[:text.find(stop)]
    assert gen.tok.decode(done.tokens).startswith(done.text + stop)  # generation ran up to the stop string


def test_eod_ends_a_row_and_is_not_in_the_text(models):
    gen = Generator.load(models["alibi"])
    free = gen.generate_ids(gen.encode(["import os"]), SamplingConfig(max_new_tokens=10, stop_at_eod=False))[0][0]
    i = next(i for i in range(1, 10) if free[i] not in free[:i])
    gen.tok.eod_id = free[i]  # make a later greedy token the end-of-document
    done, = gen.generate(["import os"], SamplingConfig(max_new_tokens=10))
    assert done.tokens == free[:i + 1] and done.stop_reason == "eod" and done.text == gen.tok.decode(free[:i])


# ------------------------------------------------------------------------------------ command line
def test_cli_prompts_file_output_and_speed(models, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["def f(x):", "import os", "class A:"]))
    out = tmp_path / "out.jsonl"
    rc = generate_main([str(models["rotary-halves"]), f"prompts_file={prompts}", "prompt=# hi", "max_new_tokens=5",
                        "batch_size=2", f"output={out}", "stop_at_eod=false"])
    assert rc == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["# hi", "def f(x):", "import os", "class A:"]
    assert all(len(r["tokens"]) == 5 and r["stop_reason"] == "max_new_tokens" for r in rows)
    assert captured.err.count("tokens/s") == 2  # one line per batch of 2
    assert rows[0]["prompt"] + rows[0]["completion"] in captured.out


def test_cli_interactive_reads_stdin_until_the_end(models, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("first line\n\n" + "x" * 70 + "\nsecond line\n"))
    assert generate_main([str(models["learned"]), "interactive=true", "max_new_tokens=3", "echo=false"]) == 0
    err = capsys.readouterr().err
    assert err.count("1 prompt(s), ") == 2  # the blank line is skipped
    assert "neox: error: prompt 1 is 70 tokens long" in err  # a line too long is refused, the session goes on


@pytest.mark.parametrize("args,message", [
    (["prompt=" + "x" * 64], "prompt 1 is 64 tokens long; the model's context is 64 tokens"),
    (["prompt=hi", "top_p=1.5"], "top_p=1.5 must be in (0, 1]"),
    (["prompt=hi", "top_p=0"], "top_p=0.0 must be in (0, 1]"),
    (["prompt=hi", "temperature=-1"], "temperature=-1.0 must be >= 0"),
    (["prompt=hi", "top_k=many"], "top_k='many' is not a valid int"),
    (["prompt=hi", "max_tokens=5"], "unknown setting 'max_tokens=5'"),
    ([], "no prompt: give prompt=..., prompts_file=... or interactive=true"),
], ids=["too-long", "top_p-high", "top_p-zero", "temperature", "not-int", "unknown-key", "no-prompt"])
def test_cli_bad_input_is_one_line_and_writes_nothing(models, tmp_path, capsys, args, message):
    out = tmp_path / "out.jsonl"
    assert generate_main([str(models["alibi"]), *args, f"output={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neox: error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_cli_generates_from_an_hf_directory(models, tmp_path, capsys):
    from neox.convert.__main__ import main as convert_main

    assert convert_main(["to-hf", str(models["rotary-halves"]), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    common = ["prompt=def f(x):", "max_new_tokens=8", "stop_at_eod=false", "echo=false"]
    assert generate_main([str(models["rotary-halves"]), *common]) == 0
    ours = capsys.readouterr().out
    assert generate_main([str(tmp_path / "hf"), *common]) == 0
    assert capsys.readouterr().out == ours
