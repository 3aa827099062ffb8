"""python -m neox.convert to-hf <run dir | checkpoint> <out_dir> [--tokenizer T] [--dtype D] [--force]
python -m neox.convert from-hf <hf_dir> <out_dir> [--tokenizer T] [--force]"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

from neox.errors import NeoxError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m neox.convert",
                                description="Convert neox models to and from Hugging Face transformers.")
    sub = p.add_subparsers(dest="command", required=True)
    to = sub.add_parser("to-hf", help="export a run, checkpoint or neox model directory")
    to.add_argument("source", type=Path, help="a run dir, a checkpoints dir, a step_XXXXXXXX dir or a model dir")
    to.add_argument("out", type=Path, help="the transformers directory to write")
    to.add_argument("--tokenizer", help="tokenizer.json to export (default: the one the run's data used)")
    to.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    to.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    fr = sub.add_parser("from-hf", help="import a local GPTNeoXForCausalLM or LlamaForCausalLM directory")
    fr.add_argument("source", type=Path, help="the Hugging Face model directory")
    fr.add_argument("out", type=Path, help="the neox model directory to write")
    fr.add_argument("--tokenizer", help="tokenizer.json to use (default: the directory's)")
    fr.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local conversion never needs the network
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        # transformers imports torchao when it is installed (neox's fp8 uses it), and that import makes torch log
        # a deprecation about torchao's enums that no user can act on
        logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
        if args.command == "to-hf":
            from neox.convert.export import export

            done = export(args.source, args.out, args.force, args.tokenizer, args.dtype)
            padding = (f", {done.padded_vocab - done.vocab} padding rows dropped" if done.padded_vocab > done.vocab
                       else "")
            print(f"wrote {args.out}: {done.arch}, {done.params:,} parameters, vocab {done.vocab}{padding}; "
                  f"from {done.origin}")
        else:
            from neox.convert.importer import import_hf

            model = import_hf(args.source, args.out, args.force, args.tokenizer)
            name = model.section["name"]
            print(f"wrote {args.out}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}, vocab "
                  f"{model.section['vocab_size']} (padded {model.cfg.vocab_size}); train from it with\n"
                  f"  python launch.py hydra.searchpath=[file://{Path(args.out).resolve()}] model={name} "
                  f"train.init_from={Path(args.out).resolve()}")
    except NeoxError as exc:
        print(f"neox: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
