"""GPU schedules for `sparkinfer.kernels.logits`.

`process_logits` is elementwise over the vocabulary: 256 threads a block, one token a thread
(151936 tokens: 594 blocks, ~1.8 MB read and 0.6 MB written, a few microseconds).
`count_token` is a single thread.
"""

from tvm import s_tir, tirx

PROCESS_THREADS = 256


def schedule_process_logits(func: tirx.PrimFunc, threads: int = PROCESS_THREADS) -> tirx.PrimFunc:
    """Schedule a `process_logits` PrimFunc for a CUDA target."""
    sch = s_tir.Schedule(func)
    block, lane = sch.split(sch.get_loops(sch.get_sblock("process"))[0], [None, threads])
    sch.bind(block, "blockIdx.x")
    sch.bind(lane, "threadIdx.x")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_count_token(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Schedule `count_token` for a CUDA target: one thread of one block."""
    sch = s_tir.Schedule(func)
    sch.bind(sch.get_loops(sch.get_sblock("count"))[0], "blockIdx.x")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
