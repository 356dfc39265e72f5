"""Hardware constants of the roofline, each with its source.

Sources: NVIDIA H100 Tensor Core GPU datasheet and the NVIDIA H100 Tensor Core GPU Architecture
whitepaper (2022): the SXM5 part has 132 SMs, a 50 MB L2 cache, 3.35 TB/s of HBM3 bandwidth and
a 1,980 MHz maximum boost clock; each SM has four partitions, each with one warp scheduler that
issues one warp instruction per clock and four special-function units (16 SFU results, such as
MUFU.EX2, per SM per clock), 65,536 32-bit registers, up to 228 KB of shared memory, at most
2,048 resident threads and 32 resident thread blocks.  The L2 is taken as the datasheet's
50 MB, in decimal bytes (the smaller reading).  The H200 (NVIDIA H200 Tensor Core GPU
datasheet, 2024) is the same GH100 die (132 SMs, 50 MB L2) with 4.8 TB/s of HBM3e.

Copy bandwidth: the benchmark reports achieved bandwidth as a share of a device-to-device copy
measured in the same run; no such measurement exists here, so the model assumes a copy reaches
``COPY_EFFICIENCY`` of the datasheet bandwidth (an assumption, named as such in every report).
"""

from __future__ import annotations

import dataclasses

COPY_EFFICIENCY = 0.90  # assumed share of datasheet HBM bandwidth a large copy achieves
LAUNCH_OVERHEAD_S = 4e-6  # assumed fixed cost of one kernel launch on the stream (host side)
# Assumed cost of one host synchronisation (``.item()``, ``nonzero``): the device-to-host copy's
# round trip and the drained queue, whose next launches no longer overlap the GPU's work.
SYNC_S = 20e-6


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    clock_hz: float
    hbm_bytes_per_s: float
    l2_bytes: int
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    issue_per_sm_per_clock: int = 4  # warp instructions: one per partition
    sfu_per_sm_per_clock: int = 16  # MUFU results (EX2, LG2, RCP...)

    @property
    def copy_bytes_per_s(self) -> float:
        return self.hbm_bytes_per_s * COPY_EFFICIENCY


H100 = Gpu("H100 SXM5", sms=132, clock_hz=1.98e9, hbm_bytes_per_s=3.35e12,
           l2_bytes=50_000_000)
H200 = Gpu("H200 SXM", sms=132, clock_hz=1.98e9, hbm_bytes_per_s=4.8e12,
           l2_bytes=50_000_000)
GPUS = [H100, H200]
