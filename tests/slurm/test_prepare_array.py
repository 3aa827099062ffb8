"""`prepare --shards N --slurm` on the real local Slurm (.ci/slurm.sh): one array task per piece.

The reference is the single-process prepare over the same inputs: the merged output must equal
it byte for byte, first run or resumed.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from neox.data.prepare import prepare
from neox.data.shards import SlurmOptions
from neox.errors import DataError

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]


def corpus(folder: Path) -> list[str]:
    folder.mkdir()
    for name, n in (("a.jsonl", 300), ("b.jsonl", 120)):
        with open(folder / name, "w") as f:
            f.writelines(json.dumps({"text": f"doc {i} of {name}: " + "héllo wörld " * (i % 40)})
                         + "\n" for i in range(n))
    return [str(folder)]


def same(a: Path, b: Path) -> bool:
    return all(Path(f"{a}{e}").read_bytes() == Path(f"{b}{e}").read_bytes() for e in (".bin", ".idx"))


def test_array_prepares_merges_and_resumes(slurm, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    inputs = corpus(tmp_path / "c")
    opts = SlurmOptions(time_min=5, cpus_per_shard=1)
    prepare(inputs, str(tmp_path / "single"), "bpe:300", progress=False)
    tok = str(tmp_path / "single.tokenizer.json")

    r = prepare(inputs, str(tmp_path / "out"), tok, shards=3, slurm=opts)
    err = capsys.readouterr().err
    assert "submitted Slurm array" in err and "3 pieces" in err
    assert same(tmp_path / "single", tmp_path / "out") and r.documents == 420
    assert json.loads((tmp_path / "out.meta.json").read_text())["shards"] == 3
    assert not (tmp_path / "out.shards").exists()

    # A bad line in the last piece: that task fails with the file and line, the others are
    # kept; once fixed, the same command submits the missing piece only.
    b = tmp_path / "c" / "b.jsonl"
    good = b.read_text()
    b.write_text(good.replace('{"text": "doc 100 of', '{"text": doc 100 of', 1))
    with pytest.raises(DataError, match=rf"1 of 3 pieces failed \(piece 2: {b}:101 is not "
                                        r"valid JSON \(Expecting value\); fix or remove the line\)"):
        prepare(inputs, str(tmp_path / "again"), tok, shards=3, slurm=opts, progress=False)
    b.write_text(good)
    prepare(inputs, str(tmp_path / "again"), tok, shards=3, slurm=opts)
    err = capsys.readouterr().err
    assert "resuming: 2 of 3 pieces are already prepared" in err
    assert "submitted Slurm array" in err and ": 1 pieces;" in err
    assert same(tmp_path / "single", tmp_path / "again")


def test_interrupted_submitter_waits_for_its_array(slurm, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """The submitting command is interrupted while its array is queued: the same command again
    waits for those tasks instead of submitting the pieces a second time."""
    inputs = corpus(tmp_path / "c")
    prepare(inputs, str(tmp_path / "single"), "bpe:300", progress=False)
    tok = str(tmp_path / "single.tokenizer.json")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "neox.data.prepare", *inputs, "-o", str(tmp_path / "out"),
           "-t", tok, "--shards", "3", "--slurm", "--cpus-per-shard", "1", "--time-min", "5"]
    first = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    line = ""
    while "submitted Slurm array" not in line:
        line = first.stderr.readline()
        assert line or first.poll() is None, "the first run ended before submitting"
    array = re.search(r"submitted Slurm array (\d+):", line).group(1)
    subprocess.run(["scontrol", "hold", array], check=True, capture_output=True)
    release = threading.Timer(2.0, subprocess.run, (["scontrol", "release", array],),
                              {"capture_output": True})
    try:
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=60) == 130
        assert "interrupted: the Slurm tasks keep running" in first.stderr.read()
        # An input changed under a queued task: refused, nothing submitted twice.
        b = tmp_path / "c" / "b.jsonl"
        stat = b.stat()
        os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        with pytest.raises(DataError, match=rf"^piece 2's earlier Slurm task {array}_2 still runs,"
                                            " on inputs that changed since; wait for it to end "
                                            "or scancel it, then run the same command again$"):
            prepare(inputs, str(tmp_path / "out"), tok, shards=3,
                    slurm=SlurmOptions(time_min=5, cpus_per_shard=1), progress=False)
        os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        release.start()
        prepare(inputs, str(tmp_path / "out"), tok, shards=3,
                slurm=SlurmOptions(time_min=5, cpus_per_shard=1))
    finally:
        release.cancel()
        subprocess.run(["scancel", array] if first.returncode != 130 else
                       ["scontrol", "release", array], capture_output=True)
    err = capsys.readouterr().err
    assert "waiting for 3 pieces still running from an earlier submission" in err
    assert "submitted Slurm array" not in err
    assert same(tmp_path / "single", tmp_path / "out")
