"""One round of MetaSchedule's evolutionary search, as a pure function of the database.

`propose(task, target, database, seed, round_index, n)` returns up to `n` new candidates
(scheduled traces nobody measured yet): it builds a TuneContext whose design space is the
task's (a ScheduleFn returning the rule's schedules, tunable knobs as sample_categorical
draws), trains MetaSchedule's XGBoost cost model on every record the database holds for the
kernel, and asks EvolutionarySearch (mutations by `MutateCategorical`) for one batch.

Nothing else carries over from round to round: the same database, seed and round give the
same candidates, in this process or in a fresh one, which is what lets two-phase tuning
(`--emit` / `--ingest`) continue across machines and runs, and one-phase tuning use the same
path. For that reason the search runs single-threaded (MetaSchedule hands work to its
threads dynamically, so more threads make the draws depend on timing), XGBoost trains with
one thread, and numpy's global generator (which XGBModel draws from before it has enough
data) is seeded per round. EvolutionarySearch only remembers what it measured within one
process, so candidates already in the database are filtered out here (by the structural hash
of the scheduled module: two knob settings that make the same program are one candidate).
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass

import numpy as np
from tvm import s_tir
from tvm_ffi import structural_hash
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule import _ffi_api as _ms_api
from tvm.s_tir.meta_schedule.logging import get_logger, get_logging_func
from tvm.target import Target

from sparkinfer.tune.mutator import MutateCategorical
from sparkinfer.tune.task import StaleTraceError, TuneTask, categorical_insts, space_trace


@dataclass(frozen=True)
class SearchConfig:
    """EvolutionarySearch's parameters, sized for design spaces of tens to thousands of points
    (MetaSchedule's defaults, population 512 and 50 fresh samples, are for tile-size spaces of
    millions and would cost minutes per round here: the cost model's feature extraction, once
    per member and generation, is what a round spends most of its time on)."""

    population: int = 32
    init_min_unmeasured: int = 8
    genetic_num_iters: int = 2
    eps_greedy: float = 0.05
    # Records before the cost model's predictions replace random scores.
    warmup_samples: int = 4


def round_seed(seed: int, key: str, round_index: int) -> int:
    """A 31-bit seed per (seed, kernel, round): rounds and kernels draw differently."""
    digest = hashlib.sha256(f"{seed}:{key}:{round_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def tune_context(task: TuneTask, target: Target, seed: int, config: SearchConfig) -> ms.TuneContext:
    """MetaSchedule's TuneContext for the task, made without `TuneContext.__init__`: that one
    first imports tvm.s_tir.tensor_intrin, which registers every tensor-core and SIMD
    intrinsic TVM knows (30 s of CPU on this machine) for schedule rules we do not use."""
    spaces = task.spaces
    space_generator = ms.space_generator.ScheduleFn(
        lambda _sch: spaces(), sch_rules=[], postprocs=[], mutator_probs={MutateCategorical(): 1.0}
    )
    search_strategy = ms.search_strategy.EvolutionarySearch(
        population_size=config.population,
        init_min_unmeasured=config.init_min_unmeasured,
        genetic_num_iters=config.genetic_num_iters,
        eps_greedy=config.eps_greedy,
    )
    context = ms.TuneContext.__new__(ms.TuneContext)
    context.__init_handle_by_constructor__(
        _ms_api.TuneContext, task.mod, target, space_generator, search_strategy, task.name, 1, seed,
        get_logging_func(get_logger("sparkinfer.tune")),
    )
    _ms_api.TuneContextInitialize(context)
    return context


def replay(task: TuneTask, trace: s_tir.Trace) -> s_tir.Schedule:
    """The schedule a (recorded or proposed) trace makes of the task's kernel (`replay_all`)."""
    return replay_all(task, [trace])[0]


def replay_all(task: TuneTask, traces: list[s_tir.Trace]) -> list[s_tir.Schedule]:
    """The schedules traces make of the task's kernel: each trace's decisions carried onto the
    full trace of its design space, made on the same copy of the workload as the schedules.

    Why not apply a trace as it is: a trace read back from JSON (a record, or a proposal the
    search grew from one) holds its own copies of the kernel's buffers wherever a rule put
    them into an instruction's attributes (schedule/gemv.py `declare_header_reads`: the
    region of the MoE weights it declares is indexed by `ids`), so on another copy of the
    workload that region names a buffer the kernel does not define, and the build fails
    ("Buffer ids is used before its definition"). A trace of none of the current design
    spaces (a record of an older form of the rule) is applied as it is."""
    mod = task.mod
    spaces = task.design_spaces(mod["main"])
    schedules = []
    for trace in traces:
        try:
            trace = space_trace(task, trace, spaces)
        except StaleTraceError:
            pass
        sch = s_tir.Schedule(mod, enable_check=task.enable_check)
        trace.apply_to_schedule(sch, remove_postproc=True)
        schedules.append(sch)
    return schedules


def records(task: TuneTask, database: ms.database.Database) -> list[ms.database.TuningRecord]:
    """The database's records of this kernel, in commit order."""
    if not database.has_workload(task.mod):
        return []
    key = structural_hash(database.commit_workload(task.mod).mod)
    return [r for r in database.get_all_tuning_records() if structural_hash(r.workload.mod) == key]


def cost_model(context: ms.TuneContext, task: TuneTask, recorded: list[ms.database.TuningRecord],
               config: SearchConfig) -> ms.cost_model.XGBModel:
    """XGBoost trained on the recorded measurements (failed ones count as 1e10 s)."""
    model = ms.cost_model.XGBModel(
        extractor="per-store-feature",
        config=ms.cost_model.xgb_model.XGBConfig(nthread=1),
        num_warmup_samples=config.warmup_samples,
        adaptive_training=False,
    )
    if recorded:
        schedules = replay_all(task, [r.trace for r in recorded])
        candidates = [ms.MeasureCandidate(sch, r.args_info) for sch, r in zip(schedules, recorded)]
        results = [ms.runner.RunnerResult(r.run_secs, None if r.run_secs else "failed") for r in recorded]
        model.update(context, candidates, results)
    return model


def propose(task: TuneTask, target: Target, database: ms.database.Database, *, seed: int, round_index: int,
            n: int, config: SearchConfig = SearchConfig()) -> list[s_tir.Schedule]:
    """Up to `n` candidates for round `round_index` that the database does not hold yet."""
    recorded = records(task, database)
    measured = {structural_hash(sch.mod) for sch in replay_all(task, [r.trace for r in recorded])}
    s = round_seed(seed, task.key, round_index)
    if not task.enable_check:
        return sweep(task, measured, s, n)
    np.random.seed(s)
    context = tune_context(task, target, s, config)
    model = cost_model(context, task, recorded, config)
    # Ask for as many more as the database holds: a fresh search ranks the measured best high.
    ask = min(n + len(measured), config.population)
    context.pre_tuning(max_trials=ask, num_trials_per_iter=ask, design_spaces=context.generate_design_space(),
                       database=database, cost_model=model)
    try:
        found = context.generate_measure_candidates() or []
    finally:
        context.post_tuning()
    fresh: list[s_tir.Schedule] = []
    for sch in replay_all(task, [candidate.sch.trace for candidate in found]):
        h = structural_hash(sch.mod)
        if h not in measured:
            measured.add(h)
            fresh.append(sch)
    return fresh[:n]


# A design space is swept over at most its first this many points.
MAX_SWEEP = 4096


def sweep(task: TuneTask, measured: set[int], seed: int, n: int) -> list[s_tir.Schedule]:
    """The next `n` unmeasured points of the declared space, in a seeded random order.

    For kernels whose rule needs `enable_check=False` (the attention kernel's recurrences
    defeat the schedule's dataflow checks): MetaSchedule 0.27 replays every trace on schedules
    it makes itself, with the checks on, so each of its samples fails and EvolutionarySearch
    gives up ("Cannot sample enough initial population"). Such a kernel's space is swept
    instead, with the same runner and into the same database as the search's candidates."""
    rng = random.Random(seed)
    spaces = task.spaces()
    points = []
    for index, space in enumerate(spaces):
        insts = [i for i in categorical_insts(space.trace) if len(i.attrs[0]) > 1]
        combos = itertools.product(*(range(len(i.attrs[0])) for i in insts))
        points += [(index, insts, combo) for combo in itertools.islice(combos, MAX_SWEEP)]
    rng.shuffle(points)
    fresh: list[s_tir.Schedule] = []
    for index, insts, combo in points:
        if len(fresh) >= n:
            break
        trace = spaces[index].trace
        for inst, decision in zip(insts, combo):
            trace = trace.with_decision(inst, decision, True)
        try:
            sch = replay(task, trace)
        except Exception:  # TVM's errors: this point does not schedule; it is no candidate
            continue
        h = structural_hash(sch.mod)
        if h not in measured:
            measured.add(h)
            fresh.append(sch)
    return fresh
