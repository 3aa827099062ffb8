"""Data preparation throughput and memory: `python -m neox.data.prepare` against its peers.

    python bench/prepare.py [--repeat 5] [--vocab 50257] [--runs 3] [--memory-repeat 80]

Every contender tokenizes the same corpus (this machine's stdlib .py files, repeated, as one
JSON-lines file) with the same byte-level BPE, appends the same EOD token, and writes uint16
tokens; the script checks that all outputs hold the same tokens (the .bin files byte for byte).
Each contender runs as its own process, timed from start to exit, imports included, as a user
would run it; the runs are interleaved so a drifting load hits all alike. Memory is the peak of
the summed RSS of the contender's process tree (sampled every 50 ms).

Contenders:
  datasets.map      load_dataset("json") + .map(batched, num_proc=cores) + encode_batch
  bare tiktoken     the same merges in a tiktoken Encoding; read ~1 MB of lines, encode_batch
                    on every core, write each document's ids (what one writes in a few lines)
  neox (auto)       python -m neox.data.prepare: the tiktoken fast path (neox.data.fast_bpe)
  neox tokenizers   the same with --encoder tokenizers (the path before the fast path)
  neox --shards 2   two pieces in two processes, merged
  neox 20B-style    the same BPE with GPT-NeoX-20B's extras: NFC, <|padding|>, and runs of
                    2-24 spaces as added tokens (they overlap: neox finds them in Python),
                    against the same with --encoder tokenizers

`--memory-repeat N` also runs neox alone on the corpus repeated N times (80: about 1 GB) and
reports its peak RSS, to show memory does not grow with the input.
"""
from __future__ import annotations

import argparse
import json
import os
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
flat.tofile(out)
"""

# A bare tiktoken loop: the tokenizer.json's merges as tiktoken ranks (as tiktoken's own GPT-2
# loader builds them), GPT-2's split regex, encode_batch on every core, ids written per document.
BARE_TIKTOKEN = r"""
import json, sys, numpy as np, tiktoken
corpus, tok_path, out, threads = sys.argv[1:5]
spec = json.load(open(tok_path))
keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
chars = {b: chr(b) if b in keep else None for b in range(256)}
n = 0
for b in range(256):
    if chars[b] is None:
        chars[b], n = chr(256 + n), n + 1
to_byte = {c: b for b, c in chars.items()}
vocab = spec["model"]["vocab"]
ranks = {bytes([b]): vocab[c] for b, c in chars.items()}
for m in spec["model"]["merges"]:
    a, b = m.split(" ") if isinstance(m, str) else m
    ranks[bytes(to_byte[c] for c in a + b)] = vocab[a + b]
specials = {t["content"]: t["id"] for t in spec["added_tokens"]}
pat = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
enc = tiktoken.Encoding("bench", pat_str=pat, mergeable_ranks=ranks, special_tokens=specials)
eod = specials["<|endoftext|>"]
with open(corpus) as f, open(out, "wb") as w:
    while lines := f.readlines(1 << 20):
        texts = [json.loads(line)["text"] for line in lines]
        for ids in enc.encode_batch(texts, num_threads=int(threads), allowed_special="all"):
            ids.append(eod)
            w.write(np.array(ids, np.uint16).tobytes())
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
        tmp = corpus.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for _ in range(repeat):
                f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
        tmp.rename(corpus)
    tok_path = work / f"bpe-{vocab}.json"
    if not tok_path.exists():
        print(f"training the benchmark tokenizer (vocab {vocab}) once...", flush=True)
        train_bpe(texts, vocab).save(tok_path)
    return corpus, tok_path


def neox20b_style(tok_path: Path) -> Path:
    """The benchmark BPE with GPT-NeoX-20B's normalizer and added tokens."""
    from tokenizers import Tokenizer, normalizers

    path = tok_path.with_name(f"{tok_path.stem}-20b-style.json")
    tok = Tokenizer.from_file(str(tok_path))
    tok.normalizer = normalizers.NFC()
    tok.add_special_tokens(["<|padding|>"])
    tok.add_tokens([" " * n for n in range(24, 1, -1)])
    tok.save(str(path))
    return path


def timed(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """(wall s, CPU s of the process tree, peak summed RSS of the tree in MB)."""
    import resource

    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss
                                 for p in [root, *root.children(recursive=True)]))
        except psutil.Error:  # a process of the tree ended while we looked
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    _, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd[:5])}...\n{err.decode()[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # children are waited for: counted
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return seconds, cpu, peak / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="copies of the stdlib corpus")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--memory-repeat", type=int, default=0,
                    help="also run neox alone on the corpus repeated this many times")
    ap.add_argument("--workdir", default="/tmp/neox-bench-prepare")
    args = ap.parse_args()

    from neox.data.indexed import IndexedDataset

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    corpus, tok_path = build_inputs(work, args.repeat, args.vocab)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "OMP_NUM_THREADS": "1"}
    py, w = sys.executable, str(args.workers)

    tok_20b = neox20b_style(tok_path)

    def neox(name: str, *extra: str, tok: Path = tok_path):
        return lambda run: [py, "-m", "neox.data.prepare", str(corpus), "-o", str(work / name),
                            "-t", str(tok), "-q", *extra]

    contenders = {
        "datasets.map": lambda run: [py, "-c", BASELINE, str(corpus), str(tok_path),
                                     str(work / "datasets.bin"),
                                     str(work / f"hf-cache-{run}-{time.time_ns()}"), w],
        "bare tiktoken": lambda run: [py, "-c", BARE_TIKTOKEN, str(corpus), str(tok_path),
                                      str(work / "bare.bin"), w],
        "neox (auto: tiktoken)": neox("neox"),
        "neox --encoder tokenizers": neox("neox-tok", "--encoder", "tokenizers"),
        f"neox --shards {w}": neox("neox-shards", "--shards", w),
        "neox 20B-style (auto: tiktoken)": neox("neox-20b", tok=tok_20b),
        "neox 20B-style --encoder tokenizers": neox("neox-20b-tok", "--encoder", "tokenizers",
                                                    tok=tok_20b),
    }
    load0 = os.getloadavg()
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in contenders}
    for run in range(args.runs):
        for name, cmd in contenders.items():  # interleaved, so drifting load hits all alike
            results[name].append(timed(cmd(run), env))
            s, c, m = results[name][-1]
            print(f"run {run + 1}: {name}: {s:.2f} s wall, {c:.1f} s CPU, {m:.0f} MB peak RSS "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
    load1 = os.getloadavg()

    data = IndexedDataset(work / "neox")
    tokens = data.num_tokens
    ours = (work / "neox.bin").read_bytes()
    same = {name: (work / f"{f}.bin").read_bytes() == ours
            for name, f in (("datasets.map", "datasets"), ("bare tiktoken", "bare"),
                            ("neox --encoder tokenizers", "neox-tok"),
                            (f"neox --shards {w}", "neox-shards"))}
    same_idx = all((work / f"{f}.idx").read_bytes() == (work / "neox.idx").read_bytes()
                   for f in ("neox-tok", "neox-shards"))
    same_20b = all((work / f"neox-20b{e}").read_bytes() == (work / f"neox-20b-tok{e}").read_bytes()
                   for e in (".bin", ".idx"))
    encoders = {f: json.loads((work / f"{f}.meta.json").read_text())["encoder"]
                for f in ("neox", "neox-20b")}
    print(f"\ncorpus: {corpus.stat().st_size / 1e6:.1f} MB of JSON lines, {len(data)} docs, "
          f"{tokens / 1e6:.2f} M tokens; byte-level BPE vocab {args.vocab}; {os.cpu_count()} "
          f"cores; load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end")
    print("identical .bin to neox's: " + ", ".join(f"{k}: {'yes' if v else 'NO'}"
                                                   for k, v in same.items())
          + f"; identical .idx among neox runs: {'yes' if same_idx else 'NO'}; 20B-style "
          f"auto = tokenizers (.bin and .idx): {'yes' if same_20b else 'NO'}; encoders used by "
          f"auto: {encoders['neox']}, 20B-style {encoders['neox-20b']}")
    print(f"median of {args.runs} runs; wall time per process, imports included; CPU time summed "
          "over its processes; peak RSS summed over its processes\n")
    print("| contender | wall s | tokens/s | × datasets.map | × bare tiktoken | CPU s | "
          "peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    med = {name: [statistics.median(x[i] for x in rs) for i in range(3)]
           for name, rs in results.items()}
    for name, (s, c, m) in med.items():
        print(f"| {name} | {s:.2f} | {tokens / s / 1e6:.2f} M | "
              f"{med['datasets.map'][0] / s:.2f} | {med['bare tiktoken'][0] / s:.2f} | "
              f"{c:.1f} | {m:.0f} |")

    if args.memory_repeat:
        big, _ = build_inputs(work, args.memory_repeat, args.vocab)
        s, c, m = timed([py, "-m", "neox.data.prepare", str(big), "-o", str(work / "neox-big"),
                         "-t", str(tok_path), "-q"], env)
        n = IndexedDataset(work / "neox-big").num_tokens
        print(f"\nmemory: neox on {big.stat().st_size / 1e9:.2f} GB ({n / 1e6:.0f} M tokens): "
              f"{s:.1f} s wall, {n / s / 1e6:.2f} M tokens/s, {c:.0f} s CPU, peak RSS {m:.0f} MB "
              f"(load {os.getloadavg()[0]:.2f})")
        for suffix in (".bin", ".idx"):
            (work / f"neox-big{suffix}").unlink()


if __name__ == "__main__":
    main()
