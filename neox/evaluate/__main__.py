"""python -m neox.evaluate perplexity <checkpoint> data.prefixes=[a,b] [data.split=969,30,1] [split=valid]
                                                 [batch_size=8] [max_tokens=N] [seq_len=N] [device=..] [dtype=..]
python -m neox.evaluate lm-eval --model neox --model_args checkpoint=<path> --tasks T [lm_eval's other flags]

`perplexity` prints the per-token loss and perplexity of each prefix's split (and the total); `lm-eval`
is lm-evaluation-harness's own command line with the `neox` model registered, the task names checked first.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

from neox.errors import ConfigError, NeoxError


def perplexity_main(args: List[str]) -> int:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from neox.evaluate.perplexity import PerplexityConfig, perplexity
    from neox.generate.engine import load_for_inference

    if not args or "=" in args[0]:
        raise ConfigError("give the model first: python -m neox.evaluate perplexity <checkpoint> data.prefixes=[...]")
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PerplexityConfig),
                                                  OmegaConf.from_dotlist(args[1:])))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad setting: {str(exc).splitlines()[0]}") from None
    model, tok, device = load_for_inference(args[0], cfg.tokenizer, cfg.device, cfg.dtype)
    scores = perplexity(model, tok.vocab_size, cfg, device)
    for s in scores:
        print(f"{s.name} [{cfg.split}]: {s.tokens:,} tokens, loss {s.loss:.4f} nats/token, perplexity {s.perplexity:.3f}")
    return 0


def check_tasks(argv: List[str]) -> None:
    """ConfigError naming a task lm_eval does not know (with --include_path's local YAML tasks)."""
    def flag(name: str) -> Optional[str]:
        for i, a in enumerate(argv):
            if a == name and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(name + "="):
                return a.split("=", 1)[1]
        return None

    tasks = flag("--tasks")
    if not tasks:
        raise ConfigError("give --tasks (lm_eval's task names, comma-separated)")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=flag("--include_path"))
    known = set(manager.all_tasks)
    for name in tasks.split(","):
        if name and name not in known and not os.path.exists(name) and not manager.match_tasks([name]):
            raise ConfigError(f"unknown lm-eval task {name!r}; `lm-eval ls tasks` lists them (local YAML tasks need "
                              "--include_path DIR)")


def lm_eval_main(args: List[str]) -> int:
    import neox.evaluate.lm_eval_adapter  # noqa: F401 - registers the `neox` model
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    check_tasks(args)
    setup_logging()
    cli = HarnessCLI()
    parsed = cli._parser.parse_args(["run", *args] if args[:1] != ["run"] else args)
    cli.execute(parsed)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    commands = {"perplexity": perplexity_main, "lm-eval": lm_eval_main}
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        return commands[argv[0]](argv[1:])
    except NeoxError as exc:
        print(f"neox: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
