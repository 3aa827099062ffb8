"""ModelLayout against the real modules: GPT's parameters, the tensor-parallel model that
`apply_tensor_parallel` builds (in-process: building it needs no collective), and DeepSpeed's
pipeline module (2 processes: its stages are built by rank; in conftest.py's shared spawn)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from neox.errors import ConfigError
from neox.model.gpt import GPT, GPTConfig
from neox.parallel.model_layout import TIED_PREFIX, ModelLayout, Parallelism
from neox.parallel.topology import Topology

BASE = GPTConfig(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, seq_len=16, vocab_size=128,
                 position="rotary", rotary_dims=8)
MODELS = {
    "gelu": BASE,
    "swiglu-nobias-rmsnorm": dataclasses.replace(BASE, mlp="swiglu", bias=False, norm="rmsnorm"),
    "tied-learned": dataclasses.replace(BASE, tied_embeddings=True, position="learned", rotary_dims=0),
}
SEED = 1234


@pytest.mark.parametrize("name", list(MODELS))
def test_every_gpt_parameter_in_gpt_order_with_its_shape(name):
    cfg = MODELS[name]
    gpt = GPT(cfg)
    layout = ModelLayout(cfg)
    assert [(n, p.shape) for n, p in layout.params.items()] == [(n, tuple(p.shape)) for n, p in gpt.named_parameters()]
    assert [local for local, _ in layout.stage_params(0)] == [n for n, _ in gpt.named_parameters()]
    for n, p in layout.params.items():
        assert layout.gpt_name(n) == n and p.stage == 0
        assert dict(gpt.get_submodule(layout.layer_names[p.layer]).named_parameters())[p.leaf] is \
            gpt.get_parameter(n)  # layer + leaf is where the parameter lives
    with pytest.raises(ConfigError, match="blocks.9.attn.qkv.weight is no parameter of this model"):
        layout.gpt_name("blocks.9.attn.qkv.weight")


def _tp_topology(rank: int, size: int) -> Topology:
    """Coordinates only: building the tensor-parallel modules reads them, and no process group."""
    return Topology(tp_size=size, pp_size=1, dp_size=1, tp_rank=rank, pp_rank=0, dp_rank=0,
                    tp_group=None, pp_group=None, dp_group=None, mp_group=None)


@pytest.mark.parametrize("name", list(MODELS))
def test_split_dims_and_shards_match_the_tensor_parallel_model(name):
    """Each rank's shard and shape as `apply_tensor_parallel` cuts them from the same weights, and the
    split dimension it marks on each sharded parameter (`partition_dim`); unmarked ones are replicated."""
    from neox.parallel.tensor import apply_tensor_parallel

    cfg = MODELS[name]
    torch.manual_seed(SEED)
    full = GPT(cfg).state_dict()
    layout = ModelLayout(cfg, Parallelism(tp=2))
    shards = []
    for rank in range(2):
        torch.manual_seed(SEED)
        tp_model = apply_tensor_parallel(GPT(cfg), _tp_topology(rank, 2))
        got = dict(tp_model.named_parameters())
        assert list(got) == list(layout.params)
        for n, p in got.items():
            want_dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
            assert layout.params[n].split_dim == want_dim, n
            assert layout.local_shape(n) == tuple(p.shape), n
            assert torch.equal(layout.shard(n, full[n], rank), p.detach()), n
        shards.append(got)
    for n in layout.params:
        assert torch.equal(layout.merge(n, [s[n].detach() for s in shards]), full[n]), n
    assert sum(p.split_dim is not None for p in layout.params.values()) >= 4 * cfg.n_layers + 1


def test_a_recorded_layout_is_read_back_and_bounds_must_cover_the_layers():
    cfg = dataclasses.replace(BASE, kernel_ops=(("rmsnorm", "reference"),))
    layout = ModelLayout(cfg, Parallelism(tp=2, pp=2, dp=2, zero_stage=1, partition="uniform"))
    rec = layout.record()
    assert rec["layout"] == {"tp": 2, "pp": 2, "dp": 2, "zero_stage": 1, "partition": "uniform", "parts": [0, 3, 6]}
    import json

    back = ModelLayout.from_record(**json.loads(json.dumps(rec)))  # through JSON, as in a manifest
    assert back.cfg == cfg and back.parallel == layout.parallel and back.parts == layout.parts
    with pytest.raises(ConfigError, match=r"stage bounds \[0, 2\] do not cover 6 layers in pp=1"):
        ModelLayout(cfg, Parallelism(), parts=[0, 2])


# ------------------------------------------------------------------------------------ the pipeline
PIPELINES = [("gelu", "parameters"), ("gelu", "uniform"), ("tied-learned", "type:block"),
             ("swiglu-nobias-rmsnorm", "type:block")]


def _check_pipeline_stages(rank: int, world: int) -> None:
    from neox.model.gpt import cross_entropy_loss
    from neox.parallel.pipeline import build_pipeline_module, describe_partition

    topo = Topology.build(tp=1, pp=2)
    for name, partition in PIPELINES:
        cfg = MODELS[name]
        module = build_pipeline_module(cfg, topo, partition, "none", cross_entropy_loss, seed=SEED)
        layout = ModelLayout(cfg, Parallelism(pp=2, partition=partition))
        where = f"{name} {partition} stage {topo.pp_rank}"
        assert layout.parts == tuple(module.parts), where  # the module's own partition
        local = layout.stage_params(topo.pp_rank)
        assert [(n, p.shape) for n, p in local] == [(n, tuple(p.shape)) for n, p in module.named_parameters()], where
        assert describe_partition(module._layer_specs, module.parts, partition) == \
            ModelLayout(cfg, Parallelism(pp=2, partition=partition)).describe_stages()
        torch.manual_seed(SEED)
        ref = dict(GPT(cfg).named_parameters())  # init_like_gpt: each stage holds GPT(cfg)'s weights
        for n, p in module.named_parameters():
            param = layout.params[layout.gpt_name(n)]
            assert torch.equal(p.detach(), ref[param.name].detach()), (where, n)
            assert (param.stage == topo.pp_rank) or n.startswith(TIED_PREFIX), (where, n)
            assert layout.parts[param.stage] <= param.layer < layout.parts[param.stage + 1]


def test_pipeline_stage_names_bounds_and_weights_match_the_pipeline_module(two_ranks):
    two_ranks.outcome("model_layout_pipeline")  # _check_pipeline_stages, in the folder's shared 2-rank spawn


class _Stage(torch.nn.Module):
    """What `init_like_gpt` reads of a DeepSpeed PipelineModule: the specs, the stage's bounds, its layers."""

    def __init__(self, cfg: GPTConfig, start: int, stop: int):
        from neox.parallel.pipeline import deepspeed_layer_specs

        super().__init__()
        self._layer_specs = deepspeed_layer_specs(cfg)
        self._local_start, self._local_stop = start, stop
        self.tied_modules = torch.nn.ModuleDict()
        for i in range(start, stop):
            self.add_module(str(i), self._layer_specs[i].build())


def _last_stage_weights_are_gpts(device: str) -> None:
    from neox.parallel.pipeline import init_like_gpt

    cfg = MODELS["gelu"]
    with torch.device(device):
        torch.manual_seed(SEED)
        ref = GPT(cfg).state_dict()
        n = cfg.n_layers + 3  # embedding, blocks, final norm, head
        stage = _Stage(cfg, n // 2, n)
        init_like_gpt(stage, cfg, SEED)
    names = ["embed"] + [f"blocks.{i}" for i in range(cfg.n_layers)] + ["norm_f", "head"]
    for i in range(n // 2, n):
        for key, value in getattr(stage, str(i)).state_dict().items():
            assert torch.equal(value, ref[f"{names[i]}.{key}"]), (device, i, key)


def test_a_later_stage_holds_gpts_weights_on_the_device_it_is_built_on():
    """The other stages' layers are re-materialized where they were built, so the later stages draw from
    the same generator GPT(cfg) does (on a GPU: the CUDA generator, not the CPU's)."""
    _last_stage_weights_are_gpts("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_later_stage_holds_gpts_weights_when_built_on_the_gpu():
    _last_stage_weights_are_gpts("cuda")
