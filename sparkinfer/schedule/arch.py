"""The arch table: the facts about each target that schedules size themselves by.

No schedule keeps a constant sized for one card: where a schedule needs "how many blocks fill
the GPU" or "how many threads keep the cores busy" it reads them from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

# Every arch SparkInfer compiles for: the CUDA ones by compute capability, and this machine's CPU.
ARCHS: tuple[str, ...] = ("sm_90", "sm_120", "sm_121", "cpu")


@dataclass(frozen=True)
class ArchFacts:
    name: str  # one of ARCHS
    kind: str  # "cuda" | "cpu"
    sms: int  # streaming multiprocessors; 0 on cpu
    max_threads_per_block: int  # 0 on cpu
    shared_memory_per_block: int  # bytes a block may use without the opt-in attribute; 0 on cpu
    # bytes a block may use in all (static + dynamic) once its launch opts in, which TVM's CUDA
    # runtime does for a dynamic part of shared_memory_per_block or more; 0 on cpu
    shared_memory_optin_per_block: int
    registers_per_sm: int  # 32-bit registers; 0 on cpu
    l2_bytes: int
    cores: int  # cpu cores the schedule may use; 0 on cuda
    vector_bytes: int  # widest load/SIMD register: 16 (CUDA's 128-bit loads), cpu SIMD width
    # The arch-specific variant a CUDA arch compiles for ("sm_90a": what wgmma, setmaxnreg and
    # TMA multicast, or Blackwell's block-scaled MMA, need); "" on cpu.
    cuda_arch: str = ""


def _cpu_vector_bytes() -> int:
    """This machine's SIMD width: 64 with AVX-512, 32 with AVX2, else 16 (SSE, NEON)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if "avx512f" in flags:
        return 64
    return 32 if "avx2" in flags else 16


def _cpu_l2_bytes() -> int:
    try:
        size = os.sysconf("SC_LEVEL2_CACHE_SIZE")
    except (ValueError, OSError):
        size = 0
    return size if size > 0 else 512 * 1024


def _cuda(name: str, sms: int, l2_mib: int, optin_kib: int) -> ArchFacts:
    # Every card here: 1024 threads and 64 K registers per block/SM, and the static 48 KiB of
    # shared memory per block (more needs an opt-in attribute) that the CUDA target declares.
    return ArchFacts(name=name, kind="cuda", sms=sms, max_threads_per_block=1024,
                     shared_memory_per_block=49152, shared_memory_optin_per_block=optin_kib << 10,
                     registers_per_sm=65536, l2_bytes=l2_mib << 20, cores=0, vector_bytes=16,
                     cuda_arch=f"{name}a")


_CUDA_FACTS = {
    # opt-in shared memory a block: CUDA's tuning guides (227 KiB Hopper, 99 KiB consumer Blackwell)
    "sm_90": _cuda("sm_90", sms=132, l2_mib=50, optin_kib=227),  # H100 / H200 SXM
    "sm_120": _cuda("sm_120", sms=188, l2_mib=128, optin_kib=99),  # RTX PRO 6000 Blackwell (an RTX 5090: 170, 96 MiB)
    "sm_121": _cuda("sm_121", sms=48, l2_mib=24, optin_kib=99),  # DGX Spark GB10
}


def arch_facts(arch: str) -> ArchFacts:
    """The facts for one of ARCHS ("cpu": this machine's CPU)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; SparkInfer targets {', '.join(ARCHS)}")
    if arch == "cpu":
        return ArchFacts(name="cpu", kind="cpu", sms=0, max_threads_per_block=0,
                         shared_memory_per_block=0, shared_memory_optin_per_block=0, registers_per_sm=0,
                         l2_bytes=_cpu_l2_bytes(),
                         cores=os.cpu_count() or 1, vector_bytes=_cpu_vector_bytes())
    return _CUDA_FACTS[arch]


def cuda_target_attrs(facts: ArchFacts) -> dict[str, Any]:
    """The TVM CUDA target of a CUDA arch, as a dict (compiler/targets.py adds the host; dlight's
    rules size their blocks by it)."""
    return {"kind": "cuda", "arch": facts.cuda_arch, "max_threads_per_block": facts.max_threads_per_block,
            "max_shared_memory_per_block": facts.shared_memory_per_block, "thread_warp_size": 32}


def floor_pow2(value: int) -> int:
    """The largest power of two <= value (1 for value < 2)."""
    return 1 << max(0, value.bit_length() - 1)
