"""Hardware presets for the roofline cost model, by exact name.

Peak dense bf16 tensor FLOP/s, memory bandwidth and capacity are NVIDIA's datasheet figures
(H100 SXM5, H200 SXM, A100 80GB SXM, L4). ``host_link_bytes_per_s`` is one direction of the
PCIe link that swap traffic crosses (Gen5 x16 ~64 GB/s, Gen4 x16 ~32 GB/s). The efficiency
factors are the fractions of peak a serving engine typically sustains; they are assumptions,
and a calibrated profile replaces them with measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
GIB = 1024**3


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    peak_flops: float  # dense bf16 (fp32 for cpu), FLOP/s
    memory_bytes_per_s: float
    memory_bytes: float
    host_link_bytes_per_s: float
    compute_efficiency: float = 0.6
    memory_efficiency: float = 0.8
    step_overhead_s: float = 0.003  # scheduling, input preparation, kernel launches per step

    def __post_init__(self) -> None:
        for name in ("peak_flops", "memory_bytes_per_s", "memory_bytes", "host_link_bytes_per_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{self.name}: {name} must be > 0")
        for name in ("compute_efficiency", "memory_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{self.name}: {name} must be in (0, 1]")


HARDWARE: dict[str, HardwareSpec] = {
    h.name: h
    for h in [
        HardwareSpec("h100-sxm", peak_flops=989e12, memory_bytes_per_s=3350 * GB, memory_bytes=80 * GB,
                     host_link_bytes_per_s=64 * GB),
        HardwareSpec("h200", peak_flops=989e12, memory_bytes_per_s=4800 * GB, memory_bytes=141 * GB,
                     host_link_bytes_per_s=64 * GB),
        HardwareSpec("a100-80gb", peak_flops=312e12, memory_bytes_per_s=2039 * GB, memory_bytes=80 * GB,
                     host_link_bytes_per_s=32 * GB),
        HardwareSpec("l4", peak_flops=121e12, memory_bytes_per_s=300 * GB, memory_bytes=24 * GB,
                     host_link_bytes_per_s=32 * GB),
        # A nominal small cloud VM (2 cores, AVX2 fp32, one DDR4 channel); not a datasheet
        # figure. Calibrate on the real machine instead of trusting it.
        HardwareSpec("cpu", peak_flops=100e9, memory_bytes_per_s=20 * GB, memory_bytes=24 * GIB,
                     host_link_bytes_per_s=10 * GB, compute_efficiency=0.5, memory_efficiency=0.5,
                     step_overhead_s=0.002),
    ]
}


def get_hardware(name: str) -> HardwareSpec:
    try:
        return HARDWARE[name]
    except KeyError:
        raise ValueError(f"unknown hardware preset {name!r}; known: {', '.join(HARDWARE)}") from None
