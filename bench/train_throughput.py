"""One-GPU training throughput: neox's real path against the peers, same shape, batch and accumulation.

    python bench/train_throughput.py --model 1.4B --micro 4 --accum 8            # neox + every peer
    python bench/train_throughput.py --model 1.4B --neox "train.compile=true" --neox "model.kernels=reference"
    python bench/train_throughput.py --model 1.4B --fp8 --peers ''          # each neox row in bf16 and in fp8
    python bench/train_throughput.py --model 1.4B --compare-loss 300        # bf16 vs fp8 loss curves, one PNG

Contenders, each in its own process so allocator state and compile caches never leak between them:
  * neox: `launch.py` itself (DeepSpeed engine, bf16 weights, fused AdamW, clip 1.0, real data), steady-state
    median of its metrics.jsonl; one row per `--neox` variant (extra overrides);
  * HF `GPTNeoXForCausalLM` (SDPA) eager and torch.compile; a minimal GPT (pre-LN, SDPA, GeLU) compiled —
    bf16 autocast, fused AdamW, clip 1.0, `accum` micro-batches per optimizer step, as neox.
Every row uses the one FLOP count of the neox model shape: 6 * (non-embedding params + vocab * d) plus
attention 12 * L * d * s (full) or 6 * L * d * s (causal mask halved); MFU over the card's dense bf16 peak.
Prints one markdown table (also written to --out/throughput.md) with ratios against the first neox row;
with --fp8 each neox variant also runs with train.precision=fp8 and the table ends with fp8/bf16 ratios.

--compare-loss N: neox in bf16 and in fp8 for N steps each, same seed and data (micro 4 x accum 2 unless
given: a 1.4B pair fits in ~3 minutes each on an H100/H200), both train-loss curves in --out/loss_compare.png,
the final losses (mean of the last 20 steps; validation loss at step N) and their gap in loss_compare.json/md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import runs  # noqa: E402  (bench/runs.py: start and stop a launch.py run)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def model_shape(preset: str) -> dict:
    sys.path.insert(0, str(REPO))
    from neox.config.plan import gpt_config
    from neox.launch.compose import compose_config
    from neox.model.gpt import count_params

    m = gpt_config(compose_config([f"model={preset}"]).model)
    params = count_params(m)
    return {"L": m.n_layers, "d": m.d_model, "h": m.n_heads, "s": m.seq_len, "V": m.vocab_size, "d_ff": m.d_ff,
            "rotary_pct": m.rotary_dims / m.head_dim if m.rotary_dims else 0.0,
            "parallel_residual": m.parallel_residual, "tied": m.tied_embeddings,
            "non_embedding": params["non_embedding"]}


def flops_per_token(shape: dict, causal_half: bool) -> float:
    attn = (6 if causal_half else 12) * shape["L"] * shape["d"] * shape["s"]
    return 6 * (shape["non_embedding"] + shape["V"] * shape["d"]) + attn


# ---------------------------------------------------------------------------------------------- peers
def peer(kind: str, shape: dict, micro: int, accum: int, steps: int) -> dict:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    V, d, L, h, s = shape["V"], shape["d"], shape["L"], shape["h"], shape["s"]

    class MiniBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc, self.out = nn.Linear(d, shape["d_ff"]), nn.Linear(shape["d_ff"], d)

        def forward(self, x):
            B, T, D = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, h, D // h).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
            return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class MiniGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.pos = nn.Embedding(V, d), nn.Embedding(s, d)
            self.blocks = nn.ModuleList(MiniBlock() for _ in range(L))
            self.lnf, self.head = nn.LayerNorm(d), nn.Linear(d, V, bias=False)

        def forward(self, idx):
            x = self.emb(idx) + self.pos.weight[: idx.shape[1]]
            for b in self.blocks:
                x = b(x)
            return self.head(self.lnf(x))

    if kind.startswith("hf"):
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        c = GPTNeoXConfig(vocab_size=V, hidden_size=d, num_hidden_layers=L, num_attention_heads=h,
                          intermediate_size=shape["d_ff"], max_position_embeddings=s,
                          rotary_pct=shape["rotary_pct"] or 1.0, use_parallel_residual=shape["parallel_residual"],
                          tie_word_embeddings=shape["tied"])
        c._attn_implementation = "sdpa"
        model = GPTNeoXForCausalLM(c)
    else:
        model = MiniGPT()
    torch.manual_seed(0)
    model = model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model) if kind.endswith("compile") else model
    x = torch.randint(0, V, (micro, s + 1), device="cuda")

    def step():
        for _ in range(accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fwd(x[:, :-1])
                logits = out.logits if kind.startswith("hf") else out
                loss = F.cross_entropy(logits.float().view(-1, V), x[:, 1:].reshape(-1)) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return {"name": kind, "oom": True}
    dt = (time.perf_counter() - t0) / steps
    return {"name": kind, "tokens_per_s": micro * s * accum / dt,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30}


# ---------------------------------------------------------------------------------------------- neox
def neox(preset: str, extra: list, micro: int, accum: int, steps: int, out: Path, tag: str,
         until_valid: bool = False, timeout_s: float = 1800.0) -> dict:
    """launch.py for `steps` logged steps (and, with until_valid, the validation at step `steps`), then
    stopped: train.steps lies beyond them, so the run never writes its final checkpoint (1.4B ~18 GB,
    6.7B ~94 GB: more than some GPU machines' disks, and a minute of device time each). A run that logs
    a later step without what was waited for, or outlives `timeout_s`, is stopped and reported failed."""
    run = out / f"neox-{preset}-{tag}"
    batch = [f"train.micro_batch={micro}", f"train.grad_accum={accum}"] if micro else []  # 0: the launcher's
    cmd = [sys.executable, str(REPO / "launch.py"), f"model={preset}", *batch, f"train.steps={steps + 1000}",
           "train.log_every=1",
           "train.eval_every=100000", "train.save_every=100000", "train.eval_batches=1", "logging.wandb=false",
           "cluster.gpus=1", f"run_dir={run}", *extra]
    log = out / f"neox-{preset}-{tag}.log"

    def records() -> list:
        path = run / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []

    def done(recs: list) -> bool:
        return any(r.get("step") == steps and ("valid/loss" if until_valid else "train/tokens_per_s") in r
                   for r in recs)

    def past(recs: list) -> bool:
        return any(r.get("step", 0) > steps for r in recs)

    with open(log, "w") as sink, runs.running(cmd, sink) as proc:  # stopped without a checkpoint, however this ends
        stopped = runs.wait_for(proc, lambda: done(recs := records()) or past(recs), timeout_s)
    recs = records()
    train = [r for r in recs if "train/tokens_per_s" in r and r["step"] <= steps][2:]  # warm-up/compile dropped
    name = f"neox {' '.join(extra) or 'default'}"
    if not micro and (run / "config.yaml").exists():  # the batch the launcher sized (config.yaml records it)
        from omegaconf import OmegaConf

        t = OmegaConf.load(run / "config.yaml").train
        name += f" (sized: micro {t.micro_batch} x accum {t.grad_accum or 1})"
    if not (stopped or proc.returncode == 0) or not train or not done(recs):
        return {"name": name, "failed": log.read_text().strip().splitlines()[-1:]}
    return {"name": name, "tokens_per_s": statistics.median(r["train/tokens_per_s"] for r in train),
            "peak_gb": max(r["train/memory_gb"] for r in train),
            "losses": [r["train/loss"] for r in recs if "train/loss" in r and r["step"] <= steps],
            "loss_steps": [r["step"] for r in recs if "train/loss" in r and r["step"] <= steps],
            "valid_loss": next((r["valid/loss"] for r in reversed(recs) if "valid/loss" in r), None)}


FP8 = "train.precision=fp8"


def compare_loss(args, steps: int) -> None:
    """bf16 and fp8 neox runs of `steps` steps on the same data: one PNG of both curves, the final-loss gap."""
    base = (args.neox or [""])[0].split()
    # log every step; validate once, at step `steps` (the run is stopped after it)
    extra = base + [f"train.eval_every={steps}", "train.eval_batches=8"]
    results = {}
    for name, overrides in (("bf16", extra + ["train.precision=bf16"]), ("fp8", extra + [FP8])):
        results[name] = neox(args.model, overrides, args.micro, args.accum, steps, args.out, f"loss-{name}",
                          until_valid=True)
        print(json.dumps({k: v for k, v in results[name].items() if k not in ("losses", "loss_steps")}), flush=True)
    failed = [f"{n}: {' '.join(r['failed'])}" for n, r in results.items() if "losses" not in r]
    if failed:
        raise SystemExit(f"loss comparison: a run failed ({'; '.join(failed)}); logs in {args.out}")
    tail = 20
    final = {n: statistics.fmean(r["losses"][-tail:]) for n, r in results.items()}
    gap = final["fp8"] - final["bf16"]
    valid = {n: r["valid_loss"] for n, r in results.items()}
    vgap = valid["fp8"] - valid["bf16"] if None not in valid.values() else None
    summary = {"model": args.model, "steps": steps, "micro": args.micro, "accum": args.accum, "overrides": base,
               "final_train_loss_mean_last": tail, "final_train_loss": final,
               "gap": gap, "gap_pct": 100 * gap / final["bf16"],
               "valid_loss": valid, "valid_gap_pct": 100 * vgap / valid["bf16"] if vgap is not None else None,
               "tokens_per_s": {n: r["tokens_per_s"] for n, r in results.items()},
               "curves": {n: {"step": r["loss_steps"], "loss": r["losses"]} for n, r in results.items()}}
    (args.out / "loss_compare.json").write_text(json.dumps(summary) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for n, r in results.items():
        ax.plot(r["loss_steps"], r["losses"], label=f"{n} (final {final[n]:.4f})", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(f"neox {args.model}, micro {args.micro} x accum {args.accum}: fp8 - bf16 = {gap:+.4f} "
                 f"({100 * gap / final['bf16']:+.2f}%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "loss_compare.png", dpi=120)
    lines = [f"{args.model}, {steps} steps, micro {args.micro} x accum {args.accum}, same seed and data"
             f"{' (' + ' '.join(base) + ')' if base else ''}", "",
             f"| precision | train loss (mean of last {tail} steps) | validation loss at step {steps} | tokens/s |",
             "|---|---|---|---|"]
    for n, r in results.items():
        v = f"{valid[n]:.4f}" if valid[n] is not None else "-"
        lines.append(f"| {n} | {final[n]:.4f} | {v} | {r['tokens_per_s']:,.0f} |")
    lines += ["", f"fp8 - bf16: train {gap:+.4f} ({summary['gap_pct']:+.2f}%)"
              + (f", validation {vgap:+.4f} ({summary['valid_gap_pct']:+.2f}%)" if vgap is not None else "")
              + f"; curves: {args.out / 'loss_compare.png'}"]
    table = "\n".join(lines)
    print(table)
    (args.out / "loss_compare.md").write_text(table + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1.4B")
    ap.add_argument("--micro", type=int, default=4, help="0: neox with no batch set (the launcher sizes it)")
    ap.add_argument("--accum", type=int, default=None, help="default 8 (2 with --compare-loss)")
    ap.add_argument("--steps", type=int, default=8, help="neox steps (2 warm-up steps are dropped)")
    ap.add_argument("--peer-steps", type=int, default=3)
    ap.add_argument("--neox", action="append", default=None,
                    help="a neox variant: space-separated overrides (repeatable; '' is the default config)")
    ap.add_argument("--peers", default="hf,hf_compile,mini_compile", help="comma list, or '' for none")
    ap.add_argument("--fp8", action="store_true", help="run each neox variant in bf16 and with " + FP8)
    ap.add_argument("--compare-loss", type=int, metavar="STEPS", default=None,
                    help="only neox, bf16 vs fp8 for STEPS steps: loss curves (PNG) and the final-loss gap")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/bench")))
    ap.add_argument("--peer", help=argparse.SUPPRESS)  # internal: run one peer in this process
    args = ap.parse_args()
    if args.accum is None:
        args.accum = 2 if args.compare_loss else 8
    shape = model_shape(args.model)
    if args.peer:
        print(json.dumps(peer(args.peer, shape, args.micro, args.accum, args.peer_steps)))
        return
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in card), None)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.compare_loss:
        compare_loss(args, args.compare_loss)
        return
    rows = []
    variants = args.neox if args.neox is not None else [""]
    if args.fp8:
        variants = [v for base in variants for v in (base, f"{base} {FP8}".strip())]
    for i, variant in enumerate(variants):
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", variant.strip()) or "default"  # a path component and a name
        rows.append(neox(args.model, variant.split(), args.micro, args.accum, args.steps, args.out, tag))
        print(json.dumps(rows[-1]), flush=True)
    for kind in filter(None, args.peers.split(",")):
        proc = subprocess.run([sys.executable, __file__, "--peer", kind, "--model", args.model, "--micro",
                               str(args.micro), "--accum", str(args.accum), "--peer-steps", str(args.peer_steps)],
                              capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        rows.append(json.loads(lines[-1]) if lines else {"name": kind, "failed": proc.stderr.strip().splitlines()[-1:]})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0].get("tokens_per_s")
    full, half = flops_per_token(shape, False), flops_per_token(shape, True)
    lines = [f"{args.model} on {card}, micro {args.micro} x accum {args.accum}, seq {shape['s']}; "
             f"MFU over {peak or 'unknown'} TFLOP/s (full attention / causal-halved)", "",
             "| contender | tokens/s | TFLOP/s | MFU full | MFU causal | peak GB | neox default / this |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['name']} | {'OOM' if r.get('oom') else 'failed: ' + ' '.join(r.get('failed', []))} "
                         "| | | | | |")
            continue
        tok = r["tokens_per_s"]
        tf = tok * full / 1e12
        mfu = (f"{tf / peak:.1%}", f"{tok * half / 1e12 / peak:.1%}") if peak else ("unknown", "unknown")
        ratio = f"{base / tok:.2f}x" if base else "-"
        lines.append(f"| {r['name']} | {tok:,.0f} | {tf:.0f} | {mfu[0]} | {mfu[1]} | {r['peak_gb']:.1f} | {ratio} |")
    if args.fp8:  # each variant's fp8 row right after its bf16 row
        lines.append("")
        for bf16, fp8 in zip(rows[0:len(variants):2], rows[1:len(variants):2]):
            if "tokens_per_s" in bf16 and "tokens_per_s" in fp8:
                lines.append(f"fp8 / bf16 tokens/s: {fp8['tokens_per_s'] / bf16['tokens_per_s']:.2f}x ({fp8['name']})")
    table = "\n".join(lines)
    print(table)
    (args.out / "throughput.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
