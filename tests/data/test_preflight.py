"""preflight(): everything a worker would reject at start, found before any worker starts, and
the launcher's dry run failing on it (issue 13 #11)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from neox.config.schema import DataConfig
from neox.data.indexed import IndexedDatasetWriter
from neox.data.preflight import preflight
from neox.data.tokenizer import BytesTokenizer
from neox.errors import DataError
from neox.launch.cli import main

SAMPLES = {"train": 100, "valid": 10, "test": 10}


def cfg(**kw) -> DataConfig:
    kw.setdefault("name", "files")
    return OmegaConf.structured(DataConfig(kind="prepared", **kw))


def check(data_cfg, model_vocab: int = 512, **kw) -> list[str]:
    return preflight(data_cfg, seq_len=16, model_vocab=model_vocab, num_samples=SAMPLES, **kw)


def write(prefix: Path, docs, dtype=np.uint16, sidecar: bool = True) -> str:
    with IndexedDatasetWriter(str(prefix), dtype) as w:
        for d in docs:
            w.add_document(np.asarray(d))
    if sidecar:
        BytesTokenizer().save(f"{prefix}.tokenizer.json")
    return str(prefix)


@pytest.fixture
def corpus(tmp_path: Path) -> str:
    rng = np.random.default_rng(0)
    return write(tmp_path / "c", [rng.integers(0, 257, 60) for _ in range(100)])


def test_good_data_passes_and_caches_what_workers_reuse(corpus: str, tmp_path: Path) -> None:
    assert check(cfg(prefixes=[corpus])) == []
    # the largest token id is now cached beside the data, so no worker reads the .bin again
    assert len(list(tmp_path.glob("c_*_tokens.json"))) == 1
    assert check(cfg(prefixes=[corpus], tokenizer="bytes")) == []


def corrupt_magic(prefix: str) -> None:
    raw = bytearray(Path(prefix + ".idx").read_bytes())
    raw[:4] = b"XXXX"
    Path(prefix + ".idx").write_bytes(bytes(raw))


def wrong_dtype_code(prefix: str) -> None:
    raw = bytearray(Path(prefix + ".idx").read_bytes())
    raw[17] = 4  # int32, for uint16 tokens
    Path(prefix + ".idx").write_bytes(bytes(raw))


def too_large_ids(prefix: str) -> None:
    write(Path(prefix), [np.arange(700)] * 3)


@pytest.mark.parametrize("damage,settings,match", [
    (corrupt_magic, {}, "does not start with the MMIDIDX magic"),
    (wrong_dtype_code, {}, "says dtype code 4 \\(int32, 4 bytes/token\\) but its pointers "
     "advance 2 bytes/token"),
    (lambda p: Path(p + ".tokenizer.json").unlink(), {}, "no tokenizer for .*c \\(no "
     ".*c.tokenizer.json\\): set data.tokenizer"),
    (lambda p: None, {"model_vocab": 200}, "tokenizer .*c.tokenizer.json has 257 tokens but "
     "the model's vocab is 200"),
    (too_large_ids, {"model_vocab": 640}, "c.bin holds token ids up to 699 but the model's "
     "vocab is 640; set model.vocab_size to at least 700"),
    (lambda p: Path(p + ".bin").write_bytes(Path(p + ".bin").read_bytes()[:-10]), {},
     "c.bin has .* bytes; the .bin is truncated"),
    (lambda p: None, {"split": "1,x"}, "malformed split '1,x'"),
    (lambda p: None, {"allow_repeats": False, "samples": 10_000},
     "gives .* samples of 16\\+1 tokens without repeats but 10000 were requested"),
])
def test_every_start_failure_is_found(corpus: str, damage, settings, match) -> None:
    damage(corpus)
    vocab = settings.pop("model_vocab", 512)
    samples = settings.pop("samples", None)
    data_cfg = cfg(prefixes=[corpus], **settings)
    with pytest.raises(DataError, match=match):
        preflight(data_cfg, seq_len=16, model_vocab=vocab,
                  num_samples={**SAMPLES, "train": samples or SAMPLES["train"]})


def test_blend_checks(corpus: str, tmp_path: Path) -> None:
    other = write(tmp_path / "d", [np.arange(50)] * 30)
    with pytest.raises(DataError, match="data=blend needs data.weights"):
        check(cfg(name="blend", prefixes=[corpus, other]))
    assert check(cfg(name="blend", prefixes=[corpus, other], weights=[1, 2])) == []
    from neox.data.tokenizer import train_bpe

    train_bpe([" ".join(f"w{i}" for i in range(3000))], 300).save(other + ".tokenizer.json")
    with pytest.raises(DataError, match="data.prefixes mix tokenizers"):
        check(cfg(name="blend", prefixes=[corpus, other], weights=[1, 2]))


def test_sidecarless_prefix_is_a_warning_under_an_explicit_tokenizer(corpus, tmp_path) -> None:
    upstream = write(tmp_path / "up", [np.arange(50)] * 30, sidecar=False)
    warnings = check(cfg(prefixes=[corpus, upstream], tokenizer="bytes"))
    assert warnings == [f"{upstream} has no .tokenizer.json beside it: trusting "
                        "data.tokenizer=bytes for it (its token ids are still checked)"]


def test_cache_folder_problems(corpus: str, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="cannot create the cache folder .*afile/idx: .*afile is "
                       "a file; set data.cache_dir to a folder"):
        check(cfg(prefixes=[corpus], cache_dir=str(tmp_path / "afile" / "idx")))


def test_embedded_is_checked_cheaply(tmp_path: Path, monkeypatch) -> None:
    """The embedded corpus is built by the workers: preflight never builds or even looks for it."""
    from neox.data import embedded

    monkeypatch.setenv("NEOX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "stdlib_files", lambda: pytest.fail("walked the stdlib"))
    emb = OmegaConf.structured(DataConfig(name="embedded", kind="embedded"))
    assert preflight(emb, seq_len=16, model_vocab=8192) == []
    assert not (tmp_path / "cache").exists()
    with pytest.raises(DataError, match="has 8192 tokens but the model's vocab is 4096"):
        preflight(emb, seq_len=16, model_vocab=4096)
    (tmp_path / "cache").write_text("x")
    with pytest.raises(DataError, match="cache is a file; set NEOX_CACHE"):
        preflight(emb, seq_len=16, model_vocab=8192)


def dry_run(capsys, tmp_path: Path, *args: str) -> tuple[int, str]:
    code = main([*args, "dry_run=true", f"run_dir={tmp_path}/run", "model.vocab_size=512"])
    return code, capsys.readouterr().err.strip()


def test_dry_run_fails_on_what_a_worker_would_reject(corpus, tmp_path, capsys) -> None:
    """Before, these surfaced only after the workers started (40-60 s)."""
    code, err = dry_run(capsys, tmp_path, "data=files", f"data.prefixes=[{corpus}]",
                        "data.tokenizer=bytes")  # issue 13 #10: the advised value is accepted
    assert code == 0, err
    wrong_dtype_code(corpus)
    code, err = dry_run(capsys, tmp_path, "data=files", f"data.prefixes=[{corpus}]")
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"neox: error: {corpus}.idx says dtype code 4")


def test_dry_run_expands_home(corpus, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(corpus + ".tokenizer.json", tmp_path / "tok.json")
    code, err = dry_run(capsys, tmp_path, "data=files", "data.prefixes=['~/c']",
                        "data.tokenizer='~/tok.json'")
    assert code == 0, err
