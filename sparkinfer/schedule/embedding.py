"""GPU schedule for `sparkinfer.kernels.embedding`: one thread per hidden element.

A lookup moves one row (a few KiB): the kernel is launch-bound, so the plain mapping is the
whole schedule. Each thread decodes its weight's scale from the block header itself; the
header bytes are shared by the 32..256 threads of a block and served from L1.
"""

from tvm import s_tir, tirx

_THREADS = 256


def schedule_embedding(func: tirx.PrimFunc, threads: int = _THREADS) -> tirx.PrimFunc:
    """Schedule an `embedding` PrimFunc for a CUDA target."""
    sch = s_tir.Schedule(func)
    (h,) = sch.get_loops(sch.get_sblock("embedding"))
    block, lane = sch.split(h, [None, threads])
    sch.bind(block, "blockIdx.x")
    sch.bind(lane, "threadIdx.x")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
