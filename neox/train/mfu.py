"""Model FLOPs utilization: the FLOPs a step must do, over what the device could do in that time.

Training FLOPs per token, two conventions (`neox.config.plan.flops_per_token`):
    full:    6 * (N + V * d) + 12 * L * d * s     attention's QK^T and AV counted over the whole s x s square
    causal:  6 * (N + V * d) +  6 * L * d * s     halved: the causal mask leaves half of it to compute
with N the non-embedding parameters, V the padded vocab, d the width, L the layers and s the sequence.
The peak is the card's dense bf16 rate. A card not in the table has no MFU unless `train.peak_tflops`
says its peak: a number against a guessed peak would mislead.
"""
from __future__ import annotations

from typing import Optional, Tuple

# Dense bf16 TFLOP/s by device name fragment, most specific first (an "H100 PCIe" is not an SXM H100).
PEAK_TFLOPS: Tuple[Tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
    ("A100", 312.0),
)


def peak_tflops(device_name: Optional[str], override: Optional[float] = None) -> Optional[float]:
    """The peak to divide by: `train.peak_tflops` when set, else the table's for this device, else None."""
    if override:
        return float(override)
    if not device_name:
        return None
    return next((peak for fragment, peak in PEAK_TFLOPS if fragment in device_name), None)


def unknown_peak_note(device_name: str) -> str:
    return (f"MFU unknown: {device_name} is not in neox's table of peaks; set train.peak_tflops=<its dense bf16 "
            "TFLOP/s> to report it")
