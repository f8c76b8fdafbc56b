"""The mutator that moves tunable knobs: re-draws one sample_categorical decision.

TVM 0.27's own mutators (MutateTileSize, MutateUnroll, MutateThreadBinding, MutateParallel,
MutateComputeLocation) never change a `sample_categorical` decision, and our design spaces
draw every tunable knob that way, so without this mutator the evolutionary search would only
ever re-sample whole spaces.
"""

from __future__ import annotations

import random

from tvm.ir.utils import derived_object
from tvm.s_tir import Trace
from tvm.s_tir.meta_schedule.mutator import PyMutator

from sparkinfer.tune.task import categorical_insts


@derived_object
class MutateCategorical(PyMutator):
    """Picks one decided sample_categorical instruction and gives it another candidate index,
    both uniformly. The random state comes from the search (per call), so a seeded search
    mutates the same way every time."""

    def _initialize_with_tune_context(self, context) -> None:  # noqa: ANN001 (TuneContext)
        pass

    def apply(self, trace: Trace, rand_state: int) -> Trace | None:
        decisions = trace.decisions
        insts = [inst for inst in categorical_insts(trace)
                 if decisions.get(inst) is not None and len(inst.attrs[0]) > 1]
        if not insts:
            return None
        rng = random.Random(int(rand_state))
        inst = insts[rng.randrange(len(insts))]
        current = int(decisions[inst])
        choice = rng.randrange(len(inst.attrs[0]) - 1)
        return trace.with_decision(inst, choice + (choice >= current), True)

    def clone(self) -> "MutateCategorical":
        return MutateCategorical()
