"""train.compile=true: regional torch.compile of each block, in place, with an eager fallback."""
from __future__ import annotations

import pytest
import torch

from neox.model.gpt import GPT, Block, GPTConfig, cross_entropy_loss
from neox.train.compile import compile_blocks

pytestmark = pytest.mark.slow  # Inductor's CPU backend compiles C++ (~10-20 s on 2 cores)


def tiny(kernels: str) -> GPTConfig:
    return GPTConfig(n_layers=2, d_model=64, n_heads=2, n_kv_heads=2, d_ff=256, seq_len=32, vocab_size=256,
                     rotary_dims=16, kernels=kernels)


def loss_and_grads(model: torch.nn.Module, tokens: torch.Tensor):
    model.zero_grad(set_to_none=True)
    loss = cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kernels", ["reference", "fused"])
def test_compiled_blocks_match_eager_and_keep_parameter_names(kernels):
    torch.manual_seed(0)
    eager = GPT(tiny(kernels))
    compiled = GPT(tiny(kernels))
    compiled.load_state_dict(eager.state_dict())
    said = []
    assert compile_blocks(compiled, Block, said.append) == 2
    assert "2 Block modules compiled" in said[0]
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints are unchanged
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = loss_and_grads(eager, tokens)
    loss, grads = loss_and_grads(compiled, tokens)
    # Inductor fuses and reorders the fp32 elementwise work: rounding-level differences only.
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    for name, g in ref_grads.items():
        assert (grads[name] - g).norm() <= 1e-4 * g.norm() + 1e-9, name


def test_a_block_that_cannot_compile_runs_eager_with_one_warning():
    def failing_backend(gm, example_inputs):
        raise RuntimeError("this backend cannot compile anything")

    torch.manual_seed(0)
    eager = GPT(tiny("reference"))
    model = GPT(tiny("reference"))
    model.load_state_dict(eager.state_dict())
    said = []
    compile_blocks(model, Block, said.append, backend=failing_backend)
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        out = model(tokens[:, :-1])
    warnings = [s for s in said if s.startswith("warning")]
    assert len(warnings) == 1, said  # once for the model, not once per block or call
    assert "Block could not be compiled" in warnings[0] and "cannot compile anything" in warnings[0]
    assert torch.equal(out, eager(tokens[:, :-1]))  # the eager path, exactly
