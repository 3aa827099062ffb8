"""The README's "Use your model" commands parse as written: every subcommand, flag and key=value setting
exists (the commands themselves run in the other tests of tests/convert, tests/generate, tests/evaluate)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def commands(module: str) -> list:
    section = README.read_text().split("## Use your model", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line)[3:] for line in block.splitlines() if line.startswith(f"python -m {module} ")]


def test_convert_commands_parse():
    from neox.convert.__main__ import _parser

    found = commands("neox.convert")
    assert {c[0] for c in found} == {"to-hf", "from-hf"}
    for args in found:
        _parser().parse_args(args)


def test_generate_commands_parse():
    from neox.generate.__main__ import parse

    found = commands("neox.generate")
    assert len(found) == 3
    for args in found:
        _, sampling, opts = parse(args)
        sampling.check()
    _, sampling, _ = parse(found[0])
    assert sampling.stop == ["\n\n"] and sampling.temperature == 0.8


def test_evaluate_commands_parse():
    from omegaconf import OmegaConf

    from neox.evaluate.perplexity import PerplexityConfig

    found = {c[0]: c[1:] for c in commands("neox.evaluate")}
    assert set(found) == {"perplexity", "lm-eval"}
    cfg = OmegaConf.merge(OmegaConf.structured(PerplexityConfig), OmegaConf.from_dotlist(found["perplexity"][1:]))
    assert cfg.data.prefixes == ["data/mycorpus"] and cfg.split == "test"
    lm = found["lm-eval"]
    assert lm[lm.index("--model") + 1] == "neox" and re.match(r"checkpoint=", lm[lm.index("--model_args") + 1])
