"""Async saves allocate their host memory ahead of the first save (CheckpointManager.prepare, called by the
trainer after its first step): the first save then only copies. The size comes from the engine
(`state_bytes`), checked against what DeepSpeed's own save of real engines writes."""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from fake_engine import FakeEngine, client
from neox.checkpoint import CheckpointManager
from neox.checkpoint.snapshot import HostMemory
from support.workers import run_workers


class EngineWithModule(FakeEngine):
    """The stand-in engine with the two things `state_bytes` reads: the module and the optimizer."""

    def __init__(self, value: float):
        super().__init__(value)
        self.module = torch.nn.Module()
        self.module.w = torch.nn.Parameter(self.w, requires_grad=False)  # the saved tensor's storage
        self.optimizer = torch.optim.SGD([self.module.w], lr=0.1)


def test_the_first_async_save_uses_memory_allocated_ahead(tmp_path):
    msgs = []
    memory = HostMemory(pinned=False)
    m = CheckpointManager(tmp_path / "checkpoints", 3, True, log=msgs.append, async_save=True, host_memory=memory)
    engine = EngineWithModule(1.0)
    m.prepare(engine)
    assert m._async.preparing.name == "neox-checkpoint-memory"
    m._async.preparing.join()
    assert memory.allocated > 0  # before any save

    def no_growth(nbytes: int) -> None:
        raise AssertionError(f"the save allocated {nbytes} bytes of its own")

    memory._grow = no_growth
    m.save(engine, 1, client(1))
    m.wait()
    assert m.latest_tag() == "step_00000001" and not [x for x in msgs if "warning" in x], msgs
    loaded = FakeEngine()
    assert m.load(loaded)["step"] == 1 and torch.equal(loaded.w, torch.full((4,), 1.0))


def test_a_host_short_of_memory_ahead_saves_as_before(tmp_path):
    """The ahead-of-time allocation fails quietly; the save meets the shortage and says so once."""
    msgs = []
    memory = HostMemory(pinned=False, available=lambda: 1 << 20)
    m = CheckpointManager(tmp_path / "checkpoints", 3, True, log=msgs.append, async_save=True, host_memory=memory)
    engine = EngineWithModule(2.0)
    m.prepare(engine)
    m._async.preparing.join()
    assert memory.allocated == 0 and msgs == []
    m.save(engine, 1, client(1))
    m.wait()
    assert [x for x in msgs if "warning" in x and "written synchronously" in x], msgs
    assert m.latest_tag() == "step_00000001"


def _estimate_against_deepspeed(rank: int, world: int, out: str) -> None:
    from neox.checkpoint.background import state_bytes
    from neox.model.gpt import GPT, cross_entropy_loss
    from neox.train import engine as engine_lib
    from support.plans import cpu, plan_of

    for precision, zero in (("bf16", 0), ("fp32", 0), ("bf16", 1)):
        where = Path(out) / f"{precision}_z{zero}"
        _, plan = plan_of(["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.seq_len=16",
                           "train.micro_batch=2", "train.grad_accum=1", "data.embedded_vocab=257",
                           f"train.precision={precision}", f"parallelism.zero_stage={zero}", f"run_dir={where}"], cpu(1))
        engine, _, _ = engine_lib.initialize(GPT(plan.model), plan, torch.device("cpu"))
        tokens = torch.randint(0, plan.model.vocab_size, (2, plan.model.seq_len + 1))
        engine.backward(cross_entropy_loss(engine(tokens[:, :-1]), tokens[:, 1:]))
        engine.step()  # the optimizer's state exists from here
        estimate = state_bytes(engine)
        engine.save_checkpoint(str(where), tag="t")
        written = sum(f.stat().st_size for f in (where / "t").rglob("*.pt"))
        # the files hold the same tensors plus pickled names and metadata (a few kB here)
        assert 0.9 * written <= estimate <= written, f"{precision} ZeRO-{zero}: estimate {estimate}, written {written}"


def test_the_estimate_matches_what_deepspeed_saves(tmp_path):
    run_workers(_estimate_against_deepspeed, 1, str(tmp_path), timeout=240, init="neox")


def test_a_save_waits_for_the_memory_still_being_allocated(tmp_path):
    """The arena is one thread's at a time: a save that comes while the allocation runs waits for it, and
    then takes nothing of its own; closing the manager waits for it too."""
    memory = HostMemory(pinned=False)
    gate, real = threading.Event(), memory.reserve

    def slow_reserve(nbytes: int) -> None:
        assert gate.wait(30), "the test never opened the gate"
        real(nbytes)

    memory.reserve = slow_reserve
    m = CheckpointManager(tmp_path / "checkpoints", 3, True, log=lambda _: None, async_save=True, host_memory=memory)
    engine = EngineWithModule(3.0)
    m.prepare(engine)
    saving = threading.Thread(target=lambda: (m.save(engine, 1, client(1)), m.wait()))
    saving.start()
    saving.join(0.5)
    assert saving.is_alive() and memory.allocated == 0  # waiting for the allocation, not allocating itself
    gate.set()
    saving.join(30)
    assert not saving.is_alive() and m.latest_tag() == "step_00000001" and len(memory.chunks) == 1
    m.close()
    assert not m._async.preparing.is_alive()


def test_the_estimate_counts_adams_moments_before_they_exist():
    """An optimizer whose first step was skipped (an fp16 overflow) has no state yet: its two moments count."""
    from neox.checkpoint.background import state_bytes

    engine = EngineWithModule(1.0)
    engine.module.w.requires_grad_(True)
    engine.optimizer = torch.optim.AdamW([engine.module.w], lr=0.1)
    before = state_bytes(engine)
    assert before == 16 + 2 * 16  # the weights (4 fp32, also the stepped parameters) and two moments to come
    engine.module.w.grad = torch.ones(4)
    engine.optimizer.step()
    assert state_bytes(engine) == 16 + 2 * 16 + 4  # the moments, and AdamW's step counter (one fp32 scalar)
