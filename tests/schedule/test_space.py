"""Schedule rules and spaces (sparkinfer.schedule.space): defaults inside the space, design
spaces whose traces replay with other decisions, knobs read back from a trace, clear errors."""

import itertools

import numpy as np
import pytest
import tvm
from gguf import GGMLQuantizationType as T
from tvm import s_tir

from sparkinfer.kernels import gemv as G
from sparkinfer.kernels import moe as M
from sparkinfer.schedule.arch import ArchFacts, arch_facts
from sparkinfer.schedule.gemv import GemvKnobs
from sparkinfer.schedule.moe import MoeKnobs
from sparkinfer.schedule.space import (
    Knobs,
    ScheduleError,
    design_spaces,
    kernel_use,
    knobs_from_trace,
    rule_for,
    schedule_kernel,
)

SM_90 = arch_facts("sm_90")


def replay(sch: s_tir.Schedule, func: tvm.tirx.PrimFunc, decisions: list[int]) -> s_tir.Schedule:
    """`sch`'s trace with its sampled knobs decided by `decisions`, applied to a fresh schedule."""
    trace = sch.trace
    samples = [inst for inst in trace.insts if inst.kind.name == "SampleCategorical"]
    for inst, decision in zip(samples, decisions, strict=True):
        trace = trace.with_decision(inst, decision, remove_postproc=True)
    fresh = s_tir.Schedule(func)
    trace.apply_to_schedule(fresh, remove_postproc=True)
    return fresh


@pytest.mark.parametrize("arch", ["sm_90", "sm_120", "sm_121"])
def test_defaults_lie_inside_the_space(arch: str) -> None:
    facts = arch_facts(arch)
    for args in [(T.Q4_K, 4096, 2048), (T.Q6_K, 151936, 2048), (T.F32, 128, 2048), (T.Q4_K, 2048, 768)]:
        use = kernel_use("gemv", "gemv", *args)
        rule = rule_for(use, facts)
        space = rule.space(use, facts)
        for name, value in rule.default(use, facts).to_json().items():
            assert value in space[name], (args, name, value)


def test_gemv_defaults_follow_the_sm_count() -> None:
    use = kernel_use("gemv", "gemv", T.Q4_K, 4096, 2048)
    # 256 blocks wanted on 132 SMs (rows_per_thread 4: 4096 / 16 rows = 256 blocks); a GB10's
    # 48 SMs want 64, so the threads take more rows each.
    assert rule_for(use, SM_90).default(use, SM_90) == GemvKnobs(32, 4, 4, 256, 1)
    gb10 = arch_facts("sm_121")
    assert rule_for(use, gb10).default(use, gb10) == GemvKnobs(32, 4, 4, 256, 1)
    # The router's 128 rows: 128 one-warp blocks on both (4-warp blocks on a GB10 would be 32
    # blocks on 48 SMs, a third of them idle).
    short = kernel_use("gemv", "gemv", T.F32, 128, 2048)
    assert rule_for(short, SM_90).default(short, SM_90) == GemvKnobs(32, 1, 1, 256, 0)
    assert rule_for(short, gb10).default(short, gb10) == GemvKnobs(32, 1, 1, 256, 0)


@pytest.mark.parametrize("factory,args,expected", [
    # 256 blocks either way; a thread takes 4 rows (x shared by 4) in blocks of 2 warps; Q4_K's
    # block headers in one 16-byte load (not in the Q/K/V form, which reads W through a stage).
    ("gemv", (T.Q4_K, 2048, 4096), GemvKnobs(32, 2, 4, 256, 1)),
    # 4-warp blocks would be 320 (3 on some SMs where the mean is 2.4): 640 of 2 warps.
    ("gemv_qkv", (T.Q4_K, 4096, 512, 512, 2048), GemvKnobs(32, 2, 4, 256, 0)),
    ("gemv_qkv", (T.Q4_K, 4096, 512, 0, 2048), GemvKnobs(32, 1, 4, 256, 0)),
    # Short: 128 blocks, each warp a row (two of 16 lanes) as before.
    ("gemv", (T.Q6_K, 512, 2048), GemvKnobs(16, 4, 1, 256, 0)),
    # The LM head: Q6_K's 53 words a chunk x 4 rows spill (THREAD_CHUNK_WORDS), x 2 do not;
    # planar Q6_K's 27 words x 4 do not.
    ("gemv", (T.Q6_K, 151936, 2048), GemvKnobs(16, 8, 2, 256, 0)),
    ("gemv", (G.Q6_K_PLANAR, 151936, 2048), GemvKnobs(16, 8, 4, 256, 0)),
])
def test_gemv_defaults_of_the_decode_step(factory: str, args: tuple, expected: GemvKnobs) -> None:
    """Qwen3-30B-A3B's dense decode GEMVs on sm_90 (132 SMs, 256 blocks wanted)."""
    use = kernel_use("gemv", factory, *args)
    assert rule_for(use, SM_90).default(use, SM_90) == expected


def _assert_replays_as(sch, func, use, decisions: list[int], expected) -> None:  # noqa: ANN001
    """The design space `sch` replayed with `decisions` reads back as the knobs `expected`, and
    is the program those concrete knobs give."""
    replayed = replay(sch, func, decisions)
    knobs = knobs_from_trace(replayed.trace, use, SM_90)
    assert knobs == expected
    tvm.ir.assert_structural_equal(
        replayed.mod["main"].with_attr("tirx.is_scheduled", True),
        schedule_kernel(func, use, SM_90, knobs),
    )


@pytest.mark.parametrize("factory,args", [
    ("gemv", (T.Q4_K, 512, 2048)),
    ("gemv", (T.Q6_K, 256, 768)),
    ("gemv_qkv", (T.Q4_K, 512, 128, 128, 2048)),
])
def test_design_space_traces_replay_with_other_decisions(factory: str, args: tuple) -> None:
    func = getattr(G, factory)(*args)
    use = kernel_use("gemv", factory, *args)
    rule = rule_for(use, SM_90)
    space = rule.space(use, SM_90)
    schedules = design_spaces(func, use, SM_90)
    structural = list(itertools.product(space["rows_per_thread"], space["vector_header"]))
    assert len(schedules) == len(structural)  # one design space per combination
    assert space["vector_header"] == ((0, 1) if (factory, args[0]) == ("gemv", T.Q4_K) else (0,))
    rng = np.random.default_rng(0)
    for sch, (rows_per_thread, vector_header) in zip(schedules, structural, strict=True):
        for _ in range(2):
            lanes, rows, unroll = (int(rng.integers(len(space[n]))) for n in ("lanes", "rows", "unroll"))
            _assert_replays_as(sch, func, use, [lanes, rows, 0, unroll, 0],
                               GemvKnobs(space["lanes"][lanes], space["rows"][rows], rows_per_thread,
                                         space["unroll"][unroll], vector_header))


@pytest.mark.parametrize("factory,args", [
    ("moe_gate_up_silu", (T.Q4_K, T.Q4_K, 16, 4, 256, 256)),
    ("moe_down_residual", (T.Q6_K, 16, 4, 256, 256)),
])
def test_moe_design_spaces_cover_rows_per_thread(factory: str, args: tuple) -> None:
    """One design space per rows_per_thread and vector_header (structural), the others drawn
    and read back."""
    func = getattr(M, factory)(*args)
    use = kernel_use("moe", factory, *args)
    rule = rule_for(use, SM_90)
    space = rule.space(use, SM_90)
    assert space["rows_per_thread"] == (1, 2, 4)
    assert space["vector_header"] == ((0, 1) if args[0] == T.Q4_K else (0,))  # Q6_K has no 16-byte header
    assert rule.default(use, SM_90).to_json()["rows_per_thread"] in space["rows_per_thread"]
    schedules = design_spaces(func, use, SM_90)
    structural = list(itertools.product(space["rows_per_thread"], space["vector_header"]))
    assert len(schedules) == len(structural)
    lanes, rows, unroll = len(space["lanes"]) - 1, 1, 0
    for sch, (rows_per_thread, vector_header) in zip(schedules, structural, strict=True):
        _assert_replays_as(sch, func, use, [lanes, rows, 0, unroll, 0],
                           MoeKnobs(space["lanes"][lanes], space["rows"][rows], rows_per_thread,
                                    space["unroll"][unroll], vector_header))


@pytest.mark.parametrize("args,wide", [
    ((G.Q6_K_PLANAR, 128, 8, 2048, 768), (24, 48)),  # 8 slots x 6 chunks
    ((T.Q4_K, 128, 8, 2048, 768), (48, 96)),  # 8 x 12
    ((T.Q6_K, 16, 4, 256, 256), ()),  # 4 x 2: a warp's lanes split them already
])
def test_down_lanes_go_past_a_warp_within_1024_threads_a_block(args: tuple, wide: tuple) -> None:
    """The down kernels' lanes: the powers of two that split a row's slot x chunk count evenly,
    then its divisors up to 128; every lanes x rows of the space a block of at most 1024 threads."""
    for family, factory in (("moe", "moe_down_residual"), ("moe_q8", "moe_down_residual_q8")):
        use = kernel_use(family, factory, *args)
        space = rule_for(use, SM_90).space(use, SM_90)
        powers = tuple(lanes for lanes in space["lanes"] if lanes & (lanes - 1) == 0)
        assert space["lanes"] == (*powers, *wide) and max(powers) <= 32
        assert max(space["lanes"]) * max(space["rows"]) <= 1024 < max(space["lanes"]) * max(space["rows"]) * 2


@pytest.mark.parametrize("factory", ["moe_gate_up_silu_q8", "moe_gate_up_silu_q8_routed"])
def test_int8_gate_up_spaces_are_the_row_splits_of_one_block_of_32(factory: str) -> None:
    """The int8 gate/up's thread block quantizes one block of 32 rows: a design space for each
    (rows, rows_per_thread) that makes 32, none for the others, and knobs of another product are
    an error that says so."""
    from sparkinfer.kernels import moe_q8

    args = (T.Q4_K, T.Q4_K, 16, 4, 256, 256)
    use = kernel_use("moe_q8", factory, *args)
    rule = rule_for(use, SM_90)
    space = rule.space(use, SM_90)
    assert (space["rows"], space["rows_per_thread"]) == ((8, 16, 32), (1, 2, 4))
    schedules = design_spaces(getattr(moe_q8, factory)(*args), use, SM_90)
    splits = [(int(sch.get(sch.get_loops(sch.get_sblock("act"))[2]).extent),
               int(sch.get(sch.get_loops(sch.get_sblock("act"))[3]).extent)) for sch in schedules]
    assert sorted(splits) == [(8, 4), (16, 2), (32, 1)]
    knobs = MoeKnobs(lanes=4, rows=8, rows_per_thread=2, unroll=256, vector_header=0)
    with pytest.raises(ScheduleError, match=r"holds one block of 32 rows, but rows 8 x rows_per_thread 2 is 16"):
        schedule_kernel(getattr(moe_q8, factory)(*args), use, SM_90, knobs)


def test_every_gemv_knob_combination_lowers_to_cuda() -> None:
    from sparkinfer.compiler import targets

    use = kernel_use("gemv", "gemv", T.Q4_K, 64, 256)  # 4 chunks: lanes 1, 2, 4
    func = G.gemv(T.Q4_K, 64, 256)
    space = rule_for(use, SM_90).space(use, SM_90)
    for lanes, rows, per_thread in itertools.product(space["lanes"], (1, 8), space["rows_per_thread"]):
        knobs = GemvKnobs(lanes, rows, per_thread, 16, per_thread % 2)
        source = targets.cuda_source(tvm.IRModule({"main": schedule_kernel(func, use, SM_90, knobs)}), "sm_90")
        assert "__global__" in source


def test_knobs_outside_the_space_are_an_error_naming_the_knob() -> None:
    use = kernel_use("gemv", "gemv", T.Q4_K, 512, 768)  # 12 chunks: at most 4 lanes
    with pytest.raises(ScheduleError, match=r"knob lanes=8 is outside the space .*\(1, 2, 4\)"):
        schedule_kernel(G.gemv(T.Q4_K, 512, 768), use, SM_90, GemvKnobs(8, 4, 1, 256, 0))


def test_a_kernel_without_a_rule_is_an_error_naming_it() -> None:
    use = kernel_use("gemv", "no_such_factory", 1)
    with pytest.raises(ScheduleError, match=r"kernel gemv.no_such_factory\(1\) .* no schedule rule for sm_90"):
        rule_for(use, SM_90)


def test_knobs_round_trip_through_json() -> None:
    knobs = GemvKnobs(16, 8, 2, 64, 1)
    assert GemvKnobs.from_json(knobs.to_json()) == knobs
    with pytest.raises(ScheduleError, match=r"unknown \['lane'\]; missing \['lanes'\]"):
        GemvKnobs.from_json({"lane": 16, "rows": 8, "rows_per_thread": 2, "unroll": 64, "vector_header": 0})


def test_the_arch_table_rejects_an_unknown_arch() -> None:
    with pytest.raises(ValueError, match="unknown arch 'sm_80'"):
        arch_facts("sm_80")
    cpu = arch_facts("cpu")
    assert isinstance(cpu, ArchFacts) and cpu.kind == "cpu" and cpu.cores >= 1 and cpu.sms == 0
    assert issubclass(GemvKnobs, Knobs)


@pytest.mark.parametrize("family,factory,args", [
    ("gemv", "gemv", (T.Q4_K, 96, 512)),
    ("gemv", "gemv_qkv", (T.Q6_K, 64, 32, 32, 256)),
])
def test_cpu_design_spaces_replay_with_other_decisions(family: str, factory: str, args: tuple) -> None:
    cpu = arch_facts("cpu")
    func = getattr(G, factory)(*args)
    use = kernel_use(family, factory, *args)
    rule = rule_for(use, cpu)
    space = rule.space(use, cpu)
    rng = np.random.default_rng(1)
    for sch in design_spaces(func, use, cpu):  # serial and parallel
        decisions = [0, *(int(rng.integers(len(space[n]))) for n in ("rows_per_task", "vector", "unroll"))]
        replayed = replay(sch, func, decisions)
        knobs = knobs_from_trace(replayed.trace, use, cpu)
        assert knobs.vector == space["vector"][decisions[2]]
        tvm.ir.assert_structural_equal(replayed.mod["main"].with_attr("tirx.is_scheduled", True),
                                       schedule_kernel(func, use, cpu, knobs))
