"""Data preparation throughput: `python -m neox.data.prepare` against a plain `datasets.map`.

    python bench/prepare.py [--repeat 5] [--vocab 50257] [--runs 3] [--workdir DIR]

Both contenders tokenize the same corpus (this machine's stdlib .py files, repeated, as one
JSON-lines file) with the same byte-level BPE and append the same EOD token. Each runs as its
own process and is timed from start to exit, imports included, as a user would run it.
The script checks that both produce the same tokens and prints a table of medians.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The baseline: what one writes with `datasets` in a few lines. Runs as `python -c`.
BASELINE = r"""
import sys, numpy as np, pyarrow.compute as pc, datasets
from tokenizers import Tokenizer
corpus, tok_path, out, cache, procs = sys.argv[1:6]
datasets.disable_caching()
tok = Tokenizer.from_file(tok_path)
eod = tok.token_to_id("<|endoftext|>")
ds = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=cache)
def encode(batch):
    return {"ids": [e.ids + [eod] for e in tok.encode_batch(batch["text"])]}
ds = ds.map(encode, batched=True, num_proc=int(procs), remove_columns=ds.column_names)
flat = pc.list_flatten(ds.data.column("ids")).to_numpy().astype(np.uint16)
np.save(out, flat)
print(len(flat))
"""


def build_inputs(work: Path, repeat: int, vocab: int) -> tuple[Path, Path]:
    from neox.data.embedded import stdlib_files
    from neox.data.tokenizer import train_bpe

    texts = []
    for p in stdlib_files():
        try:
            texts.append(p.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            pass
    corpus = work / f"corpus-x{repeat}.jsonl"
    if not corpus.exists():
        with open(corpus, "w") as f:
            for _ in range(repeat):
                f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    tok_path = work / f"bpe-{vocab}.json"
    if not tok_path.exists():
        print(f"training the benchmark tokenizer (vocab {vocab}) once...", flush=True)
        train_bpe(texts, vocab).save(tok_path)
    return corpus, tok_path


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and all its children)."""
    t0, cpu0 = time.perf_counter(), _children_cpu()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd[:4])}...\n{done.stderr[-2000:]}")
    return seconds, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="copies of the stdlib corpus")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workdir", default="/tmp/neox-bench-prepare")
    args = ap.parse_args()

    import numpy as np

    from neox.data.indexed import IndexedDataset

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    corpus, tok_path = build_inputs(work, args.repeat, args.vocab)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    def ours(workers: int):
        return lambda run: [sys.executable, "-m", "neox.data.prepare", str(corpus), "-o",
                            str(work / f"ours-w{workers}"), "-t", str(tok_path), "--workers",
                            str(workers), "-q"]

    baseline = f"datasets.map(batched, num_proc={args.workers}) + np.save"
    contenders = {
        baseline: lambda run: [
            sys.executable, "-c", BASELINE, str(corpus), str(tok_path), str(work / "base.npy"),
            str(work / f"hf-cache-{run}-{time.time_ns()}"), str(args.workers)],
        "neox.data.prepare --workers 1 (in-process, Rust threads)": ours(1),
        f"neox.data.prepare --workers {args.workers} (processes)": ours(args.workers),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    cpus: dict[str, list[float]] = {name: [] for name in contenders}
    for run in range(args.runs):
        for name, cmd in contenders.items():  # interleaved, so drifting load hits all alike
            seconds, cpu = timed(cmd(run), env)
            times[name].append(seconds)
            cpus[name].append(cpu)
            print(f"run {run + 1}: {name}: {seconds:.2f} s wall, {cpu:.1f} s CPU", flush=True)

    data = IndexedDataset(work / "ours-w1")
    tokens = data.num_tokens
    base = np.load(work / "base.npy")
    same = all(np.array_equal(np.fromfile(work / f"ours-w{w}.bin", dtype=data.dtype), base)
               for w in (1, args.workers))
    print(f"\ncorpus: {corpus.stat().st_size / 1e6:.1f} MB of JSON lines, {len(data)} docs, "
          f"{tokens / 1e6:.2f} M tokens; tokenizer: byte-level BPE vocab {args.vocab}; "
          f"{os.cpu_count()} cores; identical tokens: {'yes' if same else 'NO'}")
    print(f"median of {args.runs} runs; wall time per process, imports included; CPU time "
          "summed over its processes (steadier than wall time on a shared machine)\n")
    print("| contender | wall s | tokens/s | vs datasets.map | CPU s | tokens/CPU-s |")
    print("|---|---|---|---|---|---|")
    wall = {name: statistics.median(ts) for name, ts in times.items()}
    cpu = {name: statistics.median(cs) for name, cs in cpus.items()}
    for name in contenders:
        rate = tokens / wall[name]
        print(f"| {name} | {wall[name]:.2f} | {rate / 1e6:.2f} M | "
              f"{wall[baseline] / wall[name]:.2f}x | {cpu[name]:.1f} | "
              f"{tokens / cpu[name] / 1e6:.2f} M |")


if __name__ == "__main__":
    main()
