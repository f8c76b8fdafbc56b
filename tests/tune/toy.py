"""A toy kernel and schedule rule for the tuner's tests: y = W x on float32, rows split across
a parallel loop and the reduction split into lanes, both tunable (sample_categorical); whether
the lanes loop is unrolled is the structural knob."""

from __future__ import annotations

from typing import Any

import numpy as np
from tvm import s_tir, te, tirx

from sparkinfer.tune.task import TuneTask, categorical_insts

ROWS = (1, 2, 4, 8)
LANES = (4, 8, 16, 32)
UNROLL = (False, True)
DEFAULT = {"rows": 4, "lanes": 8, "unroll": False}


def toy_gemv(n: int, k: int) -> tirx.PrimFunc:
    w = te.placeholder((n, k), "float32", name="W")
    x = te.placeholder((k,), "float32", name="x")
    r = te.reduce_axis((0, k), name="r")
    y = te.compute((n,), lambda i: te.sum(w[i, r] * x[r], axis=r), name="y")
    return te.create_prim_func([w, x, y])


def apply(sch: s_tir.Schedule, rows: Any, lanes: Any, unroll: bool) -> None:
    block = sch.get_sblock("y")
    i, r = sch.get_loops(block)
    io, ii = sch.split(i, [None, rows])
    ro, ri = sch.split(r, [None, lanes])
    sch.reorder(io, ro, ii, ri)
    sch.parallel(io)
    if unroll:
        sch.unroll(ri)


def design_spaces(func: tirx.PrimFunc, revised: bool = False) -> list[s_tir.Schedule]:
    """`revised`: the rule's later form, one instruction more (an annotation), so that the
    traces of the first form match none of its spaces."""
    spaces = []
    for unroll in UNROLL:
        sch = s_tir.Schedule(func)
        rows = sch.sample_categorical(list(ROWS), [1 / len(ROWS)] * len(ROWS))
        lanes = sch.sample_categorical(list(LANES), [1 / len(LANES)] * len(LANES))
        apply(sch, rows, lanes, unroll)
        if revised:
            sch.annotate(sch.get_sblock("y"), "toy_revised", 1)
        spaces.append(sch)
    return spaces


def knobs_of(trace: s_tir.Trace) -> dict[str, Any]:
    rows_inst, lanes_inst = categorical_insts(trace)
    decisions = trace.decisions
    unroll = any(inst.kind.name == "Unroll" for inst in trace.insts)
    return {"rows": ROWS[int(decisions[rows_inst])], "lanes": LANES[int(decisions[lanes_inst])], "unroll": unroll}


def toy_task(n: int = 256, k: int = 512, seed: int = 0, revised: bool = False) -> TuneTask:
    rng = np.random.default_rng(seed)
    inputs = [rng.standard_normal((n, k), dtype=np.float32), rng.standard_normal(k, dtype=np.float32),
              rng.standard_normal(n, dtype=np.float32)]
    return TuneTask(key=f"toy.gemv({n}, {k})", name=f"toy_gemv_{n}x{k}", func=toy_gemv(n, k), inputs=inputs,
                    design_spaces=lambda func: design_spaces(func, revised), knobs_of=knobs_of,
                    default_knobs=dict(DEFAULT))
