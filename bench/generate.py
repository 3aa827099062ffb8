"""Generation speed: neox with and without its KV cache against transformers' `generate` on the exported model.

    python bench/generate.py --model 1.4B --batch 1,16                 # on the GPU machine (bf16)
    python bench/generate.py --model tiny --batch 1,4 --new 32         # a quick CPU check (fp32)

One random model of the preset's shape (seeded) is built once; transformers' copy is the `to-hf` export of
the same weights (built in memory by `neox.convert.export.hf_model`), so both compute the same function.
Each contender gets the same random prompts (`--prompt` tokens each) and generates exactly `--new` tokens
greedily (no stop token); one warm-up call, then the median of `--repeats` timed calls, the clock read after
a device synchronize. tokens/s counts new tokens over every row (prefill included in the time). The last
column is the share of new tokens equal to transformers' (in bf16 the two may part ways after a near tie).
Prints a markdown table (also written to --out/generate.md when --out is given).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class StubTokenizer:
    """What the generator and the export need from a tokenizer when only speed is measured."""

    vocab_size: int
    eod_id: int = 0

    def decode(self, ids: List[int]) -> str:
        return " ".join(map(str, ids))


def build(preset: str, device: torch.device, dtype: torch.dtype):
    """(neox GPT, transformers model, tokenizer stub) with the same random weights."""
    from neox.config.plan import gpt_config
    from neox.convert.export import hf_model
    from neox.convert.source import NeoxModel
    from neox.generate.engine import build_model
    from neox.launch.compose import compose_config

    section = compose_config([f"model={preset}"]).model
    cfg = gpt_config(section)
    torch.manual_seed(0)
    with torch.device(device):
        from neox.model.gpt import GPT

        weights = {k: v.detach() for k, v in GPT(cfg).state_dict().items()}
    tok = StubTokenizer(int(section.vocab_size))
    neox = build_model(cfg, weights, device, dtype)
    hf = hf_model(NeoxModel(dict(section), cfg, {k: v.cpu() for k, v in weights.items()}, None, "bench"), tok, dtype)
    del weights
    return neox, hf.to(device), tok


def timed(fn: Callable[[], List[List[int]]], device: torch.device, repeats: int) -> tuple[float, List[List[int]]]:
    fn()  # warm-up: allocator, kernels, caches
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1.4B", help="a conf/model preset")
    ap.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=128, help="new tokens per row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-cache-max-batch", type=int, default=16, help="skip neox without cache above this batch")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from neox.generate.engine import Generator, resolve_dtype
    from neox.generate.sampling import SamplingConfig

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    neox, hf, tok = build(args.model, device, dtype)
    gen = Generator(neox, tok, device)
    greedy = SamplingConfig(max_new_tokens=args.new, stop_at_eod=False)
    hf_cfg = hf.generation_config
    hf_cfg.eos_token_id, hf_cfg.do_sample = None, False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for b in [int(x) for x in args.batch.split(",")]:
        g = torch.Generator().manual_seed(b)
        prompts = torch.randint(0, tok.vocab_size, (b, args.prompt), generator=g)

        def run_hf() -> List[List[int]]:
            with torch.no_grad():
                out = hf.generate(prompts.to(device), attention_mask=torch.ones_like(prompts, device=device),
                                  generation_config=hf_cfg, max_new_tokens=args.new, min_new_tokens=args.new)
            return out[:, args.prompt:].tolist()

        def run_neox(cache: bool) -> Callable[[], List[List[int]]]:
            return lambda: [t for t, _ in gen.generate_ids(prompts.tolist(), greedy, use_cache=cache)]

        t_hf, ref = timed(run_hf, device, args.repeats)
        contenders = [("transformers generate (exported model)", t_hf, ref)]
        contenders.append(("neox, KV cache", *timed(run_neox(True), device, args.repeats)))
        if b <= args.no_cache_max_batch:
            contenders.append(("neox, no cache (recompute every step)", *timed(run_neox(False), device, args.repeats)))
        for label, t, out in contenders:
            same = sum(x == y for r, s in zip(out, ref) for x, y in zip(r, s)) / (b * args.new)
            rows.append(f"| {label} | {b} | {b * args.new / t:,.1f} | {1000 * t / args.new:.2f} | "
                        f"{t_hf / t:.2f}x | {same:.1%} |")
            print(rows[-1], flush=True)
    header = (f"{args.model} on {name}, {str(dtype).replace('torch.', '')}, prompt {args.prompt} + {args.new} new tokens "
              f"per row, greedy, median of {args.repeats}\n\n"
              "| contender | batch | new tokens/s | ms per step | speed vs transformers | same tokens as transformers |\n"
              "|---|---|---|---|---|---|")
    table = "\n".join([header, *rows])
    print("\n" + table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "generate.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
