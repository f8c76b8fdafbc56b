"""One kernel to tune: its concrete unscheduled PrimFunc, timing inputs and design space.

A `TuneTask` is what the search, the bundle builder and the database need of a kernel, and
nothing more: `tasks.model_tasks` makes one per distinct kernel of a model from the schedule
rules (sparkinfer/schedule/space.py: `design_spaces`, `knobs_from_trace`, `rule.default`),
tests make them from a toy rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm import IRModule, s_tir, tirx

from sparkinfer.errors import SparkInferError

SAMPLE_CATEGORICAL = "SampleCategorical"
_from_json = tvm_ffi.get_global_func("ffi.FromJSONGraphString")


@dataclass
class TuneTask:
    key: str  # the kernel's key in the schedules file ("family.factory(args)")
    name: str  # the kernel's name in the decode step, for messages and progress bars
    func: tirx.PrimFunc  # unscheduled, every shape concrete (inputs.concrete_kernel)
    inputs: list[np.ndarray]  # one valid input set, in parameter order
    # one Schedule per structural-knob combination, tunable knobs as sample_categorical RVs
    design_spaces: Callable[[tirx.PrimFunc], list[s_tir.Schedule]]
    knobs_of: Callable[[s_tir.Trace], dict[str, Any]]  # a (design-space) trace's knobs, as JSON
    default_knobs: dict[str, Any]  # the arch default's knobs, as JSON
    enable_check: bool = True  # s_tir.Schedule's dataflow checks (the rule's `enable_check`)
    read_bytes: int | None = None  # what one call reads of `inputs` (inputs.read_bytes; None: all of them)
    _json: str | None = field(default=None, repr=False, compare=False)  # `mod`, serialized once

    @property
    def mod(self) -> IRModule:
        """The workload as MetaSchedule records it: the kernel as "main", exported as "main".

        A deep copy each time: replaying a trace on a Schedule rewrites statements of the
        module it was made from in place where it can, which would change `func` itself. Copied
        through TVM's JSON graph (ffi.DeepCopy would copy the Op singletons too, and a copy would
        then not be structurally equal to the workload the database holds)."""
        if self._json is None:
            self._json = tvm.ir.save_json(IRModule({"main": self.func.with_attr("global_symbol", "main")}))
        return _from_json(self._json)

    def spaces(self) -> list[s_tir.Schedule]:
        return self.design_spaces(self.mod["main"])


def categorical_insts(trace: s_tir.Trace) -> list[Any]:
    """The trace's sample_categorical instructions, in trace order."""
    return [inst for inst in trace.insts if inst.kind.name == SAMPLE_CATEGORICAL]


def default_trace(task: TuneTask) -> s_tir.Trace:
    """The design-space trace whose decisions give the default knobs (`knobs_trace`); a default
    that no space holds is an error (its rule's `space()` does not contain `default()`)."""
    return knobs_trace(task, task.default_knobs, "default")


def knobs_trace(task: TuneTask, want: dict[str, Any], what: str) -> s_tir.Trace:
    """The design-space trace whose decisions give the knobs `want`, or an error naming them
    (`what` says which knobs they are) where no space holds them.

    The design spaces only say which instruction draws which candidate list, so the decision
    of each draw is found by reading the knobs back (`knobs_of`) with each candidate index in
    turn and keeping the index that brings the most knobs to their wanted value."""
    for space in task.spaces():
        trace = space.trace
        if _structural_mismatch(task.knobs_of(trace), want, categorical_insts(trace), trace, task):
            continue
        for inst in categorical_insts(trace):
            n = len(inst.attrs[0])
            scores = [_agreement(task.knobs_of(trace.with_decision(inst, i, True)), want) for i in range(n)]
            trace = trace.with_decision(inst, int(np.argmax(scores)), True)
        if task.knobs_of(trace) == want:
            return trace
    raise SparkInferError(f"kernel {task.name}: its {what} knobs {want} are not in its design space")


def _agreement(knobs: dict[str, Any], want: dict[str, Any]) -> int:
    return sum(knobs.get(k) == v for k, v in want.items())


def _structural_mismatch(knobs: dict[str, Any], want: dict[str, Any], insts: list[Any], trace: s_tir.Trace,
                         task: TuneTask) -> bool:
    """True when a knob that no draw of this space changes differs from the default."""
    varying: set[str] = set()
    for inst in insts:
        for i in range(len(inst.attrs[0])):
            other = task.knobs_of(trace.with_decision(inst, i, True))
            varying |= {k for k in other if other[k] != knobs[k]}
    return any(knobs.get(k) != v for k, v in want.items() if k not in varying)


def _signature(inst: Any) -> tuple[str, str]:
    return inst.kind.name, str(inst.attrs)


class StaleTraceError(SparkInferError):
    """A trace of none of the task's design spaces: a tuning log's record (or a search
    proposal grown from one) made under an older form of the kernel's schedule rule."""


def trace_knobs(task: TuneTask, trace: s_tir.Trace) -> dict[str, Any]:
    """The knobs of any trace of the task's design space, simplified or not (`space_trace`)."""
    return task.knobs_of(space_trace(task, trace, task.spaces()))


def traces_knobs(task: TuneTask, traces: list[s_tir.Trace]) -> list[dict[str, Any] | None]:
    """Each trace's knobs (`space_trace`, the design spaces built once), None for a trace of an
    older form of the rule (a record its knobs no longer read from)."""
    spaces = task.spaces()
    knobs: list[dict[str, Any] | None] = []
    for trace in traces:
        try:
            knobs.append(task.knobs_of(space_trace(task, trace, spaces)))
        except StaleTraceError:
            knobs.append(None)
    return knobs


def space_trace(task: TuneTask, trace: s_tir.Trace, spaces: list[s_tir.Schedule]) -> s_tir.Trace:
    """The full trace of the design space (of `spaces`, the task's) that `trace` is a trace of,
    simplified or not, with `trace`'s decisions.

    MetaSchedule's EvolutionarySearch simplifies the design-space traces (drops instructions
    whose results nothing uses), and a rule's structural knobs are one-candidate draws it
    never uses, so its candidates lack those draws and `knobs_of` cannot read them. This finds
    the design space whose (simplified) instructions the trace has and carries the trace's
    decisions over to that space's full trace; a draw that was dropped keeps its first
    candidate (a structural knob's only one, or a knob the variant never uses)."""
    insts = [inst for inst in trace.insts if inst.kind.name != "EnterPostproc"]
    wanted = [_signature(inst) for inst in insts]
    for space in spaces:
        full = space.trace
        for form in (full, full.simplified(True)):
            if [_signature(inst) for inst in form.insts] != wanted:
                continue
            decided = dict(enumerate(insts))
            # Simplifying keeps the order of what it keeps: match `form` back into `full`.
            position = {}
            j = 0
            for i, inst in enumerate(form.insts):
                while _signature(full.insts[j]) != _signature(inst):
                    j += 1
                position[i] = j
                j += 1
            result = full
            for i, inst in decided.items():
                if inst.kind.name == SAMPLE_CATEGORICAL and inst in trace.decisions:
                    result = result.with_decision(full.insts[position[i]], int(trace.decisions[inst]), True)
            for inst in categorical_insts(full):
                if inst not in result.decisions:
                    result = result.with_decision(inst, 0, True)
            return result
    raise StaleTraceError(f"kernel {task.name}: a trace matches none of its design spaces")
