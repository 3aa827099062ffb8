"""python -m neox.generate <run dir | checkpoint | model dir | HF dir> prompt="..." [key=value ...]

    prompt=TEXT              a prompt (repeat the key for a batch)
    prompts_file=PATH        one prompt per line, or a .jsonl of {"prompt": ...}
    interactive=true         read prompts from stdin, one per line, until end of input
    max_new_tokens=64  temperature=0 (greedy)  top_k=0  top_p=1.0  repetition_penalty=1.0  seed=1234
    stop=TEXT or stop=["a","b"]     stop strings     stop_tokens=[id,...]     stop_at_eod=true
    batch_size=8  use_cache=true  tokenizer=PATH  device=cpu|cuda  dtype=float32|bfloat16  tp=1
    output=PATH.jsonl        also write {"prompt", "completion", "tokens", "stop_reason"} per prompt
    echo=true                print the prompt before its completion

The completions go to stdout, the speed (new tokens/s) to stderr. tp>1 runs tensor-parallel over that
many processes (started through torchrun; CPU processes or GPUs).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from neox.errors import ConfigError, NeoxError
from neox.generate.sampling import SamplingConfig


@dataclasses.dataclass
class Options:
    prompt: List[str] = dataclasses.field(default_factory=list)
    prompts_file: Optional[str] = None
    interactive: bool = False
    batch_size: int = 8
    use_cache: bool = True
    tokenizer: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    tp: int = 1
    output: Optional[str] = None
    echo: bool = True


def _convert(key: str, raw: str, typ: Any) -> Any:
    typ = str(typ)
    try:
        if "List" in typ:
            items = json.loads(raw) if raw.startswith("[") else [raw]
            if not isinstance(items, list):
                raise ValueError
            return [int(x) for x in items] if "int" in typ else [str(x) for x in items]
        if "bool" in typ:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        if "int" in typ:
            return int(raw)
        if "float" in typ:
            return float(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not a valid {typ.replace('typing.', '')}") from None
    return raw


def parse(args: List[str]) -> tuple[Path, SamplingConfig, Options]:
    """The model path and key=value settings; ConfigError for an unknown key or a bad value."""
    if not args or "=" in args[0]:
        raise ConfigError("give the model first: python -m neox.generate <run dir | checkpoint | HF dir> prompt=...")
    fields: Dict[str, tuple] = {}
    for cls in (SamplingConfig, Options):
        for f in dataclasses.fields(cls):
            fields[f.name] = (cls, f.type)
    values: Dict[str, Dict[str, Any]] = {SamplingConfig.__name__: {}, Options.__name__: {}}
    for arg in args[1:]:
        key, eq, raw = arg.partition("=")
        if not eq or key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown setting {arg!r}; settings are key=value with key one of {known}")
        cls, typ = fields[key]
        value = _convert(key, raw, typ)
        slot = values[cls.__name__]
        if key == "prompt":
            slot.setdefault("prompt", []).extend(value)
        else:
            slot[key] = value
    return Path(args[0]), SamplingConfig(**values["SamplingConfig"]), Options(**values["Options"])


def read_prompts(path: str) -> List[str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompts_file={path} does not exist")
    lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
    if p.suffix != ".jsonl":
        return lines
    try:
        return [str(json.loads(ln)["prompt"]) for ln in lines]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{path}: every line of a .jsonl prompts file must be an object with a \"prompt\"") from None


def batches(items: List[str], size: int) -> Iterator[List[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def run(args: List[str]) -> int:
    path, sampling, opts = parse(args)
    sampling.check()  # bad settings fail before the model loads
    if opts.batch_size < 1:
        raise ConfigError(f"batch_size={opts.batch_size} must be at least 1")
    prompts = list(opts.prompt) + (read_prompts(opts.prompts_file) if opts.prompts_file else [])
    if not prompts and not opts.interactive:
        raise ConfigError("no prompt: give prompt=..., prompts_file=... or interactive=true")
    if opts.tp > 1:
        from neox.generate.tensor_parallel import launch

        return launch(args, opts.tp)
    from neox.generate.engine import Generator

    gen = Generator.load(path, opts.tokenizer, opts.device, opts.dtype)
    return serve(gen, prompts, sampling, opts)


def serve(gen, prompts: List[str], sampling: SamplingConfig, opts: Options, main: bool = True) -> int:
    """Generate for every prompt (in batches), then for each line of stdin in interactive mode."""
    gen.encode(prompts)  # a prompt that does not fit fails before anything is written
    out = open(opts.output, "w") if opts.output and main else None
    try:
        for batch in batches(prompts, opts.batch_size):
            _report(gen, gen.generate(batch, sampling, opts.use_cache), opts, out, main)
        if opts.interactive:
            interactive = sys.stdin.isatty()
            while True:
                if main and interactive:
                    print("> ", end="", file=sys.stderr, flush=True)
                line = sys.stdin.readline()
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    _report(gen, gen.generate([line.rstrip("\n")], sampling, opts.use_cache), opts, out, main)
                except ConfigError as exc:  # a prompt too long for the context: say so, keep reading
                    if main:
                        print(f"neox: error: {exc}", file=sys.stderr, flush=True)
    finally:
        if out is not None:
            out.close()
    return 0


def _report(gen, completions, opts: Options, out, main: bool) -> None:
    if not main:
        return
    for c in completions:
        print((c.prompt if opts.echo else "") + c.text, flush=True)
        if out is not None:
            out.write(json.dumps({"prompt": c.prompt, "completion": c.text, "tokens": c.tokens,
                                  "stop_reason": c.stop_reason}) + "\n")
            out.flush()
    s = gen.last_stats
    dtype = str(next(gen.model.parameters()).dtype).replace("torch.", "")
    print(f"neox: {s.rows} prompt(s), {s.new_tokens} new tokens in {s.seconds:.2f} s: {s.tokens_per_s:,.1f} tokens/s "
          f"({'kv cache' if opts.use_cache else 'no cache'}, {gen.device.type} {dtype})", file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except NeoxError as exc:
        print(f"neox: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
