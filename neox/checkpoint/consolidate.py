"""Consolidate a checkpoint into one safetensors file of full (tp=1, pp=1, unpartitioned) fp32 weights.

    python -m neox.checkpoint.consolidate runs/x/checkpoints/step_00000100 model.safetensors
    python -m neox.checkpoint.consolidate runs/x model.safetensors        # the run's `latest`
    python -m neox.checkpoint.consolidate runs/x model.safetensors --force  # replace an existing file

The keys are those of `neox.model.gpt.GPT.state_dict()`, so `GPT(cfg).load_state_dict(...)` takes
them as they are, at any later layout. The file's metadata holds the tag, the step and the resolved
config (JSON). The checkpoint is verified against its manifest first, and every file is opened with
`torch.load(weights_only=True)` (see `neox.checkpoint.safe_load`).

Sources, by layout (the checkpoint's recorded `ModelLayout`, read by `neox.checkpoint.saved`, names
the parameters and their split dimensions):
* ZeRO-0/1/2 without pipeline: `mp_rank_XX_model_states.pt`, one per tensor-parallel rank, merged
  along each parameter's split dimension;
* ZeRO-1/2/3 in bf16/fp16, or ZeRO-3: the fp32 master weights from DeepSpeed's ZeRO files
  (tp=1 only);
* ZeRO-0 in bf16/fp16: the fp32 master weights from the optimizer state (`neox.checkpoint.reshard`);
* pipeline: `layer_XX-model_YY-model_states.pt`, layer XX being GPT's layer_specs order
  (embedding, blocks..., final norm, head).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from neox.checkpoint import files as F
from neox.checkpoint.manager import CheckpointManager
from neox.checkpoint.tags import read_latest
from neox.checkpoint.safe_load import check_files_safe, safe_load
from neox.checkpoint.saved import saved_config, saved_layout
from neox.errors import CheckpointError, NeoxError
from neox.parallel.model_layout import ModelLayout

_MP = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_LAYER = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")


def resolve(path: Path, log: Optional[Callable[[str], None]] = None) -> Path:
    """A checkpoint directory from a tag directory, a checkpoints directory or a run directory: the
    one `latest` names, or without a usable `latest` the newest complete checkpoint (said through `log`)."""
    path = Path(path)
    for root in (path, path / "checkpoints"):
        tag, why = read_latest(root)
        if tag is not None:
            return root / tag
        tags = CheckpointManager(root, 1, True).complete_tags()
        if tags:
            if log is not None:
                log(f"{root / 'latest'} is {why}: using the newest checkpoint, {tags[-1]}")
            return root / tags[-1]
    if path.is_dir():
        return path
    raise CheckpointError(f"{path} is not a checkpoint, a checkpoints directory or a run directory")


def check_output(out: Path, force: bool) -> None:
    """Refuse, before any work, an output that is a directory, or an existing file without --force."""
    if os.path.isdir(out):
        raise CheckpointError(f"{out} is a directory; give the file to write, e.g. {Path(out) / 'model.safetensors'}")
    if os.path.lexists(out) and not force:
        raise CheckpointError(f"{out} exists; pass --force to replace it, or choose another name")
    parent = Path(out).parent
    while not os.path.exists(parent):
        parent = parent.parent
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {out}: {parent} is not a writable directory")


def write_safetensors(tensors: Dict[str, torch.Tensor], meta: Dict[str, str], out: Path) -> None:
    """Write through a temporary file beside `out`, renamed into place; nothing is left on failure."""
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=meta)
        F.fsync_file(tmp)
        os.replace(tmp, out)
    except OSError as exc:
        raise CheckpointError(f"writing {out} failed: {exc.strerror or exc}") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def verify_local(root: Path) -> Optional[dict]:
    """Single-process manifest check (sizes, then every hash); raises CheckpointError on a mismatch."""
    try:
        manifest = F.read_manifest(root)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if manifest is None:
        return None
    problems = F.check_sizes(root, manifest) or F.check_digests(root, manifest, sorted(manifest["files"]))
    if problems:
        raise CheckpointError(f"{root} does not match its manifest: {problems[0]}"
                              + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return manifest


def _module_shards(root: Path, names: List[str], model: Callable[[str], ModelLayout]) -> List[Dict[str, torch.Tensor]]:
    """One full-depth state dict per tensor-parallel rank. `model(purpose)`: the saved layout."""
    mp = sorted((int(m.group(1)), n) for n in names if (m := _MP.match(n)))
    layers = sorted((int(m.group(2)), int(m.group(1)), n) for n in names if (m := _LAYER.match(n)))
    if layers:
        layer_names = model("merging pipeline layer files").layer_names
        shards: Dict[int, Dict[str, torch.Tensor]] = {}
        for tp, lay, name in layers:  # in layer order: the embedding's copy of a tied weight wins
            prefix = layer_names[lay] if lay < len(layer_names) else f"layer_{lay}"
            shard = shards.setdefault(tp, {})
            for k, v in safe_load(root / name).items():
                shard.setdefault(f"{prefix}.{k}", v)
        return [shards[t] for t in sorted(shards)]
    if not mp:
        return []  # ZeRO-3: every rank's zero_pp_rank_* files hold the weights
    return [safe_load(root / name)["module"] for _, name in mp]


def consolidate(path: Path, log: Optional[Callable[[str], None]] = None) -> Tuple[Dict[str, torch.Tensor],
                                                                                Dict[str, str]]:
    """The full fp32 state dict of a checkpoint, and metadata for the output file."""
    root = resolve(path, log)
    if not root.is_dir():
        raise CheckpointError(f"{root} does not exist")
    manifest = verify_local(root)
    names = sorted(p.name for p in root.iterdir() if p.is_file())
    check_files_safe(root, [n for n in names if n.endswith(".pt")])
    config = saved_config(root)

    def model(purpose: str) -> ModelLayout:
        return saved_layout(root, manifest or {}, purpose)

    shards = _module_shards(root, names, model)
    zero_files = [n for n in names if n.startswith(("zero_", "bf16_zero_")) and n.endswith("optim_states.pt")]
    if not shards and not zero_files:
        raise CheckpointError(f"{root} holds no DeepSpeed model states file")
    half = any(v.is_floating_point() and v.dtype != torch.float32 for s in shards[:1] for v in s.values())
    empty = any(v.numel() == 0 for s in shards[:1] for v in s.values())  # ZeRO-3 placeholders
    if zero_files and (half or empty or not shards):
        if len(shards) > 1:
            raise CheckpointError("consolidating ZeRO master weights with tp > 1 is not supported yet")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full = dict(get_fp32_state_dict_from_zero_checkpoint(str(root.parent), tag=root.name))
    elif len(shards) > 1:
        layout = model("merging tensor-parallel shards")
        full = {k: layout.merge(k, [s[k] for s in shards]) if k in layout.params else shards[0][k]
                for k in shards[0]}
    else:
        full = shards[0]
    if half and not zero_files:
        # DeepSpeed's fp16/bf16 optimizer without ZeRO: the module holds 16-bit copies, the optimizer state
        # the fp32 masters; take those (the layout-free full state), not the copies upcast
        from neox.checkpoint.reshard import full_state

        masters, _ = full_state(root)
        full = {**full, **{k: s["param"] for k, s in masters.items()}}
    out = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in full.items()
           if isinstance(v, torch.Tensor)}
    meta = {"neox.tag": root.name, "neox.step": str((manifest or {}).get("step", "")),
            "neox.tp_shards": str(len(shards))}
    if config is not None:
        meta["neox.config"] = json.dumps(config, sort_keys=True)
    return out, meta


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neox.checkpoint.consolidate", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a step_XXXXXXXX directory, a checkpoints directory or a run dir")
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    parser.add_argument("--force", action="store_true", help="replace `out` if it exists")
    args = parser.parse_args(argv)
    try:
        check_output(args.out, args.force)
        tensors, meta = consolidate(args.checkpoint, log=lambda msg: print(f"neox: {msg}", file=sys.stderr))
        write_safetensors(tensors, meta, args.out)
    except NeoxError as exc:
        print(f"neox: error: {exc}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in tensors.values())
    print(f"wrote {args.out}: {len(tensors)} tensors, {n:,} parameters, from {meta['neox.tag']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
