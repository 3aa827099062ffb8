"""GPUs the planner knows by name: memory, dense bf16 peak, memory bandwidth, and interconnect defaults.

Memory is what `torch.cuda.get_device_properties(i).total_memory` reports for the card (the H200's
143,771 MiB was read on the project's machine, bench/RESULTS.md; the others are the vendors' figures in
GiB as the driver exposes them). Peaks and bandwidths are the vendors' datasheet numbers (SXM parts);
`intra_node_gbs` is one GPU's NVLink bandwidth in one direction, `inter_node_gbs` one GPU's share of a
typical InfiniBand fabric of its generation (one 200 Gb/s HCA per A100, 400 Gb/s per H100/H200). A
cluster differs: set `cluster.intra_node_gbs` / `cluster.inter_node_gbs` for yours.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from neox.errors import ConfigError

GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory: int  # bytes usable by one process (total_memory)
    peak_tflops: float  # dense bf16
    hbm_gbs: float  # memory bandwidth, GB/s
    intra_node_gbs: float  # GPU to GPU inside a node, one direction, GB/s
    inter_node_gbs: float  # one GPU's share of the network between nodes, GB/s


GPUS = {
    "H200": GpuSpec("H200", 143_771 * MiB, 989.0, 4800.0, 450.0, 50.0),
    "H100": GpuSpec("H100 80GB", int(79.2 * GiB), 989.0, 3350.0, 450.0, 50.0),
    "A100-80GB": GpuSpec("A100 80GB", int(79.3 * GiB), 312.0, 2039.0, 300.0, 25.0),
    "A100-40GB": GpuSpec("A100 40GB", int(39.6 * GiB), 312.0, 1555.0, 300.0, 25.0),
}
# Other spellings users (and torch.cuda.get_device_name) use for the same cards.
ALIASES = {"h200": "H200", "h100": "H100", "h100-80gb": "H100", "h100 80gb": "H100",
           "a100": "A100-80GB", "a100-80gb": "A100-80GB", "a100 80gb": "A100-80GB", "a100-80g": "A100-80GB",
           "a100-40gb": "A100-40GB", "a100 40gb": "A100-40GB", "a100-40g": "A100-40GB"}


def known_names() -> str:
    return ", ".join(GPUS)


def by_name(name: str) -> GpuSpec:
    """The spec of a card named like `H100`, `A100-40GB` or a torch device name (`NVIDIA A100-SXM4-40GB`)."""
    key = name.strip().lower()
    if key in ALIASES:
        return GPUS[ALIASES[key]]
    for canonical in GPUS:
        if canonical.lower() == key:
            return GPUS[canonical]
    # torch device names: "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", "NVIDIA H200"
    if "h200" in key:
        return GPUS["H200"]
    if "h100" in key:
        return GPUS["H100"]
    if "a100" in key:
        return GPUS["A100-40GB" if "40g" in key else "A100-80GB"]
    raise ConfigError(f"cluster.gpu={name!r} is not a GPU the planner knows ({known_names()}); "
                      "set cluster.gpu_memory_gb=<GiB per GPU> instead")


def resolve(name: Optional[str], memory_gb: Optional[float], detected_name: Optional[str] = None,
            detected_memory: Optional[int] = None) -> Optional[GpuSpec]:
    """The GPU to plan for: cluster.gpu, else the one detected here; cluster.gpu_memory_gb overrides its
    memory (or, alone, describes an unknown card with an H100's speed). None: nothing says the memory."""
    spec = by_name(name) if name else None
    if spec is None and detected_name:
        try:
            spec = by_name(detected_name)
        except ConfigError:
            spec = None
        if detected_memory is not None:
            spec = replace(spec or GPUS["H100"], name=detected_name, memory=int(detected_memory))
    if memory_gb is not None:
        spec = replace(spec or replace(GPUS["H100"], name=f"GPU of {memory_gb:g} GiB"),
                       memory=int(memory_gb * GiB))
    return spec
