"""MFU: the two FLOP conventions and the peak it is measured against (issue 16, item 5)."""
from __future__ import annotations

from neox.config.plan import flops_per_token
from neox.model.gpt import GPTConfig, count_params
from neox.train import mfu


def test_flop_conventions_by_hand():
    """Pythia-1.4B's shape: 6 * (N + V d) + 12 L d s in full, 6 L d s for the causal half."""
    m = GPTConfig(n_layers=24, d_model=2048, n_heads=16, n_kv_heads=16, d_ff=8192, seq_len=2048, vocab_size=50304,
                  rotary_dims=32, parallel_residual=True)
    params = count_params(m)
    dense = 6 * (params["non_embedding"] + 50304 * 2048)
    assert flops_per_token(m, params) == dense + 12 * 24 * 2048 * 2048
    assert flops_per_token(m, params, causal=True) == dense + 6 * 24 * 2048 * 2048
    assert round(flops_per_token(m, params) / 1e9, 3) == 9.078  # bench/RESULTS.md's 1.4B figure


def test_peak_is_the_cards_own_or_the_override_never_a_guess():
    assert mfu.peak_tflops("NVIDIA H200") == 989.0
    assert mfu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert mfu.peak_tflops("NVIDIA H100 PCIe") == 756.0  # not the SXM part's 989
    assert mfu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert mfu.peak_tflops("NVIDIA L40S") is None  # unknown: no MFU rather than a wrong one
    assert mfu.peak_tflops(None) is None  # CPU
    assert mfu.peak_tflops("NVIDIA L40S", override=362.0) == 362.0
    assert "train.peak_tflops=" in mfu.unknown_peak_note("NVIDIA L40S")


def test_peak_tflops_must_be_positive():
    from neox.errors import ConfigError
    from neox.launch.compose import compose_config
    from neox.config.domains import check_domains
    from neox.config.schema import RunConfig
    import pytest

    with pytest.raises(ConfigError, match=r"train.peak_tflops=-1"):
        check_domains(compose_config(["train.peak_tflops=-1"]), RunConfig)
