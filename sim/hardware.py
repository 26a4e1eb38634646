"""Hardware presets for the roofline cost model, by exact name.

Figures per GPU, from the vendors' datasheets (named beside each preset): peak dense bf16
tensor FLOP/s (without structured sparsity), memory bandwidth and capacity, the GPU-to-GPU
interconnect that tensor- and pipeline-parallel traffic crosses, and the host link that swap
traffic crosses. Link bandwidths are one direction (datasheets usually quote both directions
added: NVLink 4's "900 GB/s" is 450 GB/s each way). ``link_latency_s`` is the time of one hop
of a ring collective with a small message (NCCL/RCCL's launch and synchronisation, not the
wire); it is an assumption, as are the efficiency factors: the fractions of peak a serving
engine typically sustains. A calibrated profile replaces all of them with measurements.
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
    interconnect: str = "PCIe"
    """What GPUs of one server talk over: NVLink, Infinity Fabric, PCIe."""
    link_bytes_per_s: float = 32 * GB
    """GPU-to-GPU bandwidth, one direction, per GPU."""
    link_latency_s: float = 10e-6
    compute_efficiency: float = 0.6
    memory_efficiency: float = 0.8
    link_efficiency: float = 0.8
    step_overhead_s: float = 0.003  # scheduling, input preparation, kernel launches per step
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("peak_flops", "memory_bytes_per_s", "memory_bytes", "host_link_bytes_per_s",
                     "link_bytes_per_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{self.name}: {name} must be > 0")
        if self.link_latency_s < 0 or self.step_overhead_s < 0:
            raise ValueError(f"{self.name}: link_latency_s and step_overhead_s must be >= 0")
        for name in ("compute_efficiency", "memory_efficiency", "link_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{self.name}: {name} must be in (0, 1]")


# NVLink hop latencies are taken as 5 us, PCIe (through the host bridge) 15 us.
_NVLINK_LATENCY_S = 5e-6
_PCIE_LATENCY_S = 15e-6

HARDWARE: dict[str, HardwareSpec] = {
    h.name: h
    for h in [
        HardwareSpec("h100-sxm", peak_flops=989e12, memory_bytes_per_s=3350 * GB, memory_bytes=80 * GB,
                     host_link_bytes_per_s=64 * GB, interconnect="NVLink 4", link_bytes_per_s=450 * GB,
                     link_latency_s=_NVLINK_LATENCY_S,
                     source="NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOPS bf16 dense, 3.35 TB/s, "
                            "80 GB HBM3, NVLink 900 GB/s, PCIe Gen5 x16"),
        HardwareSpec("h200", peak_flops=989e12, memory_bytes_per_s=4800 * GB, memory_bytes=141 * GB,
                     host_link_bytes_per_s=64 * GB, interconnect="NVLink 4", link_bytes_per_s=450 * GB,
                     link_latency_s=_NVLINK_LATENCY_S,
                     source="NVIDIA H200 Tensor Core GPU datasheet (SXM): 989 TFLOPS bf16 dense, 4.8 TB/s, "
                            "141 GB HBM3e, NVLink 900 GB/s, PCIe Gen5 x16"),
        HardwareSpec("b200", peak_flops=2250e12, memory_bytes_per_s=8000 * GB, memory_bytes=180 * GB,
                     host_link_bytes_per_s=64 * GB, interconnect="NVLink 5", link_bytes_per_s=900 * GB,
                     link_latency_s=_NVLINK_LATENCY_S,
                     source="NVIDIA HGX B200 datasheet, per GPU: 4.5 PFLOPS bf16 with sparsity (2.25 dense), "
                            "8 TB/s, 180 GB HBM3e, NVLink 5 1.8 TB/s, PCIe Gen5 x16"),
        HardwareSpec("h20", peak_flops=148e12, memory_bytes_per_s=4000 * GB, memory_bytes=96 * GB,
                     host_link_bytes_per_s=64 * GB, interconnect="NVLink 4", link_bytes_per_s=450 * GB,
                     link_latency_s=_NVLINK_LATENCY_S,
                     source="NVIDIA H20 product brief: 148 TFLOPS bf16 dense, 4.0 TB/s, 96 GB HBM3, "
                            "NVLink 900 GB/s, PCIe Gen5 x16"),
        HardwareSpec("a100-80gb", peak_flops=312e12, memory_bytes_per_s=2039 * GB, memory_bytes=80 * GB,
                     host_link_bytes_per_s=32 * GB, interconnect="NVLink 3", link_bytes_per_s=300 * GB,
                     link_latency_s=_NVLINK_LATENCY_S,
                     source="NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): 312 TFLOPS bf16 dense, 2,039 GB/s, "
                            "80 GB HBM2e, NVLink 600 GB/s, PCIe Gen4 x16"),
        HardwareSpec("mi300x", peak_flops=1307.4e12, memory_bytes_per_s=5300 * GB, memory_bytes=192 * GB,
                     host_link_bytes_per_s=64 * GB, interconnect="Infinity Fabric", link_bytes_per_s=448 * GB,
                     link_latency_s=_NVLINK_LATENCY_S,
                     source="AMD Instinct MI300X datasheet: 1307.4 TFLOPS bf16 dense, 5.3 TB/s, 192 GB HBM3, "
                            "896 GB/s aggregate Infinity Fabric (7 links of 128 GB/s), PCIe Gen5 x16"),
        HardwareSpec("l40s", peak_flops=362.05e12, memory_bytes_per_s=864 * GB, memory_bytes=48 * GB,
                     host_link_bytes_per_s=32 * GB, interconnect="PCIe", link_bytes_per_s=32 * GB,
                     link_latency_s=_PCIE_LATENCY_S,
                     source="NVIDIA L40S datasheet: 362.05 TFLOPS bf16 dense (733 with sparsity), 864 GB/s, "
                            "48 GB GDDR6, PCIe Gen4 x16 (no NVLink)"),
        HardwareSpec("l4", peak_flops=121e12, memory_bytes_per_s=300 * GB, memory_bytes=24 * GB,
                     host_link_bytes_per_s=32 * GB, interconnect="PCIe", link_bytes_per_s=32 * GB,
                     link_latency_s=_PCIE_LATENCY_S,
                     source="NVIDIA L4 datasheet: 121 TFLOPS bf16 dense (242 with sparsity), 300 GB/s, "
                            "24 GB GDDR6, PCIe Gen4 x16 (no NVLink)"),
        HardwareSpec("a10g", peak_flops=125e12, memory_bytes_per_s=600 * GB, memory_bytes=24 * GB,
                     host_link_bytes_per_s=32 * GB, interconnect="PCIe", link_bytes_per_s=32 * GB,
                     link_latency_s=_PCIE_LATENCY_S,
                     source="NVIDIA A10 datasheet (AWS publishes no separate figures for its A10G variant, "
                            "whose clocks differ slightly): 125 TFLOPS bf16 dense, 600 GB/s, 24 GB GDDR6, "
                            "PCIe Gen4 x16"),
        HardwareSpec("rtx-4090", peak_flops=165.2e12, memory_bytes_per_s=1008 * GB, memory_bytes=24 * GB,
                     host_link_bytes_per_s=32 * GB, interconnect="PCIe", link_bytes_per_s=32 * GB,
                     link_latency_s=_PCIE_LATENCY_S,
                     source="NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090: 165.2 TFLOPS bf16 "
                            "dense with fp32 accumulate, 1,008 GB/s, 24 GB GDDR6X, PCIe Gen4 x16 (no NVLink)"),
        # A nominal small cloud VM (2 cores, AVX2 fp32, one DDR4 channel); not a datasheet
        # figure. Calibrate on the real machine instead of trusting it.
        HardwareSpec("cpu", peak_flops=100e9, memory_bytes_per_s=20 * GB, memory_bytes=24 * GIB,
                     host_link_bytes_per_s=10 * GB, interconnect="none", link_bytes_per_s=10 * GB,
                     compute_efficiency=0.5, memory_efficiency=0.5, step_overhead_s=0.002,
                     source="nominal, not a datasheet figure"),
    ]
}


def get_hardware(name: str) -> HardwareSpec:
    try:
        return HARDWARE[name]
    except KeyError:
        raise ValueError(f"unknown hardware preset {name!r}; known: {', '.join(HARDWARE)}") from None
