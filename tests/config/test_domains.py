"""Every numeric field's domain is checked by the launcher (dry run included), in one line naming the fix.

The expected messages are written out by hand from what each value means (a learning rate is > 0, a
dropout probability is in [0, 1), numpy's seed is a uint32, a TCP port is 1..65535), not read from the
schema's metadata, so a domain declared wrong fails here.
"""
from __future__ import annotations

import pytest

from neox.launch.cli import main

BAD = [
    ("optim.lr=-1", "optim.lr=-1.0 must be > 0; set e.g. optim.lr="),
    ("optim.lr=0", "optim.lr=0.0 must be > 0"),
    ("optim.lr=nan", "optim.lr=nan must be a finite number > 0"),
    ("optim.lr=inf", "optim.lr=inf must be a finite number > 0"),
    ("optim.min_lr=-0.05", "optim.min_lr=-0.05 must be >= 0; set e.g. optim.min_lr="),
    ("optim.min_lr=0.01", "optim.min_lr=0.01 is above optim.lr=0.002: the cosine decay would raise the lr"),
    (["optim.decay=linear", "optim.min_lr=0.01"], "optim.min_lr=0.01 is above optim.lr=0.002: the linear decay"),
    ("optim.beta1=1.0", "optim.beta1=1.0 must be in [0, 1)"),
    ("optim.beta1=-0.1", "optim.beta1=-0.1 must be in [0, 1)"),
    ("optim.beta2=1.5", "optim.beta2=1.5 must be in [0, 1)"),
    ("optim.eps=0", "optim.eps=0.0 must be > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0 must be >= 0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps=-1 must be >= 0"),
    ("optim.decay_steps=0", "optim.decay_steps=0 must be >= 1"),
    ("model.dropout=2.0", "model.dropout=2.0 must be in [0, 1); set e.g. model.dropout=0.0"),
    ("model.dropout=1.0", "model.dropout=1.0 must be in [0, 1)"),
    ("model.attn_dropout=-0.1", "model.attn_dropout=-0.1 must be in [0, 1)"),
    ("train.seed=-1", "train.seed=-1 must be in [0, 4294967295]; set e.g. train.seed=1234"),
    ("train.seed=4294967296", "train.seed=4294967296 must be in [0, 4294967295]"),
    ("cluster.master_port=70000", "cluster.master_port=70000 must be in [1, 65535]; set e.g. cluster.master_port="),
    ("cluster.master_port=0", "cluster.master_port=0 must be in [1, 65535]"),
    (["cluster=hostfile", "cluster.master_port=70000"], "cluster.master_port=70000 must be in [1, 65535]"),
    ("data.split=x", "data.split='x' must be up to three comma-separated non-negative train,valid,test proportions"),
    ("data.split='0,0,0'", "data.split='0,0,0' must be up to three"),
    ("data.split='1,-1,0'", "data.split='1,-1,0' must be up to three"),
    ("data.split='1,2,3,4'", "data.split='1,2,3,4' must be up to three"),
    ("data.split='1,nan'", "data.split='1,nan' must be up to three"),
    ("data.weights=[1,-1]", "data.weights=[1.0, -1.0] has the entry -1.0, but every entry must be > 0"),
    ("data.weights=[1,0]", "data.weights=[1.0, 0.0] has the entry 0.0, but every entry must be > 0"),
    ("data.weights=[1,inf]", "data.weights=[1.0, inf] has the entry inf, but every entry must be a finite number"),
    ("data.embedded_vocab=100", "data.embedded_vocab=100 must be >= 257"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0 must be >= 1"),
    ("train.eval_batches=0", "train.eval_batches=0 must be >= 1"),
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps=0 must be >= 1"),
    ("train.steps=0", "train.steps=0 must be >= 1"),
    ("train.eval_every=0", "train.eval_every=0 must be >= 1"),
    ("train.save_every=-5", "train.save_every=-5 must be >= 1"),
    ("train.log_every=0", "train.log_every=0 must be >= 1"),
    ("train.collective_timeout_s=0", "train.collective_timeout_s=0 must be >= 1"),
    ("train.micro_batch=0", "train.micro_batch=0 must be >= 1"),
    ("train.grad_accum=0", "train.grad_accum=0 must be >= 1"),
    ("model.n_heads=0", "model.n_heads=0 must be >= 1; set e.g. model.n_heads="),
    ("model.n_heads=-4", "model.n_heads=-4 must be >= 1"),
    ("model.d_model=0", "model.d_model=0 must be >= 1"),
    ("model.n_layers=0", "model.n_layers=0 must be >= 1"),
    ("model.n_kv_heads=0", "model.n_kv_heads=0 must be >= 1"),
    ("model.d_ff=0", "model.d_ff=0 must be >= 1"),
    ("model.seq_len=0", "model.seq_len=0 must be >= 1"),
    ("model.vocab_size=0", "model.vocab_size=0 must be >= 1"),
    ("model.vocab_multiple=0", "model.vocab_multiple=0 must be >= 1"),
    ("model.init_std=0", "model.init_std=0.0 must be > 0"),
    ("model.norm_eps=0", "model.norm_eps=0.0 must be > 0"),
    ("model.norm_eps=-1e-5", "model.norm_eps=-1e-05 must be > 0"),
    ("model.rotary_base=0", "model.rotary_base=0.0 must be > 0"),
    ("model.rotary_pct=0", "model.rotary_pct=0.0 must be in (0, 1]"),
    ("model.rotary_pct=1.5", "model.rotary_pct=1.5 must be in (0, 1]"),
    ("cluster.cpu_procs=0", "cluster.cpu_procs=0 must be >= 1; set e.g. cluster.cpu_procs=2"),
    ("cluster.gpus=0", "cluster.gpus=0 must be >= 1; set e.g. cluster.gpus=1"),
    ("cluster.gpus=-1", "cluster.gpus=-1 must be >= 1"),
    ("parallelism.tp=0", "parallelism.tp=0 must be >= 1"),
    ("parallelism.pp=0", "parallelism.pp=0 must be >= 1"),
    ("parallelism.dp=0", "parallelism.dp=0 must be >= 1"),
    ("parallelism.zero_stage=4", "parallelism.zero_stage=4 is not one of 0, 1, 2, 3"),
    ("parallelism.zero_bucket_size=0", "parallelism.zero_bucket_size=0 must be >= 1"),
    # a misspelled card is refused when it is set, not only when a plan reads it
    ("cluster.gpu=B300", "cluster.gpu='B300' is not a GPU the planner knows (H200, H100, A100-80GB, A100-40GB; "
                         "another card: cluster.gpu_memory_gb); set e.g. cluster.gpu=H100"),
    (["cluster=slurm", "cluster.gpu=V100"], "cluster.gpu='V100' is not a GPU the planner knows"),
]


def _args(override) -> list:
    return (override if isinstance(override, list) else [override]) + ["dry_run=true"]


@pytest.mark.parametrize("override,message", BAD, ids=[str(o) for o, _ in BAD])
def test_a_value_outside_its_domain_is_one_line_naming_the_fix(capsys, tmp_path, override, message):
    code = main(_args(override) + [f"run_dir={tmp_path}/run"])
    err = capsys.readouterr().err.strip()
    assert code == 2, f"{override} was accepted"
    assert err.splitlines() == [err] and err.startswith("neox: error: "), err
    assert message in err, err


@pytest.mark.parametrize("override", [
    "optim.min_lr=0", "optim.beta1=0", "optim.beta2=0.999", "optim.grad_clip=0", "optim.weight_decay=0",
    "optim.warmup_steps=0", "optim.decay_steps=1", "model.dropout=0.99", "train.seed=0", "train.seed=4294967295",
    "cluster.master_port=1", "cluster.master_port=65535", "data.split='1'", "data.split='8/1/1'",
    "data.split='1,0,0'", "data.embedded_vocab=257", ["optim.decay=constant", "optim.min_lr=0.01"],
    "cluster.gpu=a100-40gb",
])
def test_a_value_at_the_edge_of_its_domain_is_accepted(capsys, tmp_path, override):
    code = main(_args(override) + [f"run_dir={tmp_path}/run"])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("override,warning", [
    ("train.steps=10", "optim.warmup_steps=30 exceeds train.steps=10: the lr never reaches optim.lr "
                       "(it ends at 33% of it); lower optim.warmup_steps"),
    ("optim.decay_steps=20", "optim.decay_steps=20 is not above optim.warmup_steps=30"),
])
def test_a_schedule_that_never_reaches_its_peak_is_a_warning(capsys, tmp_path, override, warning):
    """Warmup beyond the run is a warning, not an error: short trial runs of a preset keep its warmup."""
    code = main(_args(override) + [f"run_dir={tmp_path}/run"])
    out = capsys.readouterr().out
    assert code == 0 and f"warning   {warning}" in out, out


def test_the_launcher_rejects_before_the_worker(tmp_path):
    """The checks live in make_plan, which the dry run, the launcher and every worker call."""
    from neox.config.plan import Resources, make_plan
    from neox.errors import ConfigError
    from neox.launch.compose import compose_config

    cfg = compose_config(["optim.lr=-1", f"run_dir={tmp_path}/run"])
    with pytest.raises(ConfigError, match=r"optim\.lr=-1\.0 must be > 0"):
        make_plan(cfg, Resources("worker", "cpu", 2, 2))
