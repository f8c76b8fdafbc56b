"""Schedule rules and their spaces: how every kernel of a decode step gets its schedule.

A rule (one class per kernel factory and target kind, like TVM dlight's rules) turns the
unscheduled PrimFunc of a `KernelUse` into a scheduled one, given a `Knobs` value of its
family and the `ArchFacts` of the target. It declares each knob's legal values (`space`), which
knobs change the program's structure (`structural`: an algorithmic variant, a memory scope,
whether a loop exists), and a default derived from the arch table.

The same `apply` serves three callers:
  - `schedule_kernel`: concrete knobs (the default, or a schedules/<arch>.json entry);
  - `design_spaces`: one `s_tir.Schedule` per combination of structural values, every tunable
    knob drawn by `sample_categorical`, so MetaSchedule can replay the trace with other
    decisions (apply passes tunable knobs straight to split factors and annotation values);
  - `knobs_from_trace`: the knobs a trace's decisions stand for.

Every knob, structural ones too, is one SampleCategorical of the trace, in the order of the
knobs dataclass's fields: a tunable one over its values, a structural one over the single index
of its value in the space (a one-candidate draw never mutates). That makes a trace carry all of
its knobs, so `knobs_from_trace` needs nothing else. Rules sample nothing themselves.

Rules are found by explicit registration (`register`, called by sparkinfer.schedule.registry),
never by module or function names: a kernel without a rule for the target is an error.
"""

from __future__ import annotations

import dataclasses
import itertools
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from tvm import s_tir, tirx

from sparkinfer.errors import SparkInferError
from sparkinfer.kernels.use import KernelUse, kernel_args
from sparkinfer.schedule.arch import ArchFacts


class ScheduleError(SparkInferError):
    """No rule for a kernel, or knobs outside a rule's space."""


class Knobs:
    """Base of one frozen dataclass per family. A field holds a plain value, or (a tunable knob
    inside `design_spaces`) the ExprRV of its sample."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Knobs:
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(names))
        missing = [n for n in names if n not in d]
        if unknown or missing:
            raise ScheduleError(
                f"{cls.__name__} knobs {dict(d)} do not fit: "
                + "; ".join(p for p in (f"unknown {unknown}" if unknown else "",
                                        f"missing {missing}" if missing else "") if p)
            )
        return cls(**{n: d[n] for n in names})


@dataclasses.dataclass(frozen=True)
class NoKnobs(Knobs):
    """The knobs of a rule whose kernel has nothing to choose (its layout follows its shape)."""


class ScheduleRule(ABC):
    """Schedules the kernels of one factory (`family`.`factory`) for the targets where
    `is_target_available` (by default: those of kind `target_kind`)."""

    target_kind: ClassVar[str]  # "cuda" | "cpu"
    family: ClassVar[str]
    factory: ClassVar[str]
    knobs_type: ClassVar[type[Knobs]]
    # False where the kernel's recurrences defeat the schedule's dataflow checks.
    enable_check: ClassVar[bool] = True

    def is_target_available(self, facts: ArchFacts) -> bool:
        return facts.kind == self.target_kind

    @abstractmethod
    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
        """The legal values of every knob (each value of a tunable knob an int)."""

    def structural(self) -> tuple[str, ...]:
        """The knobs that change the program's structure; the others are tunable."""
        return ()

    @abstractmethod
    def default(self, use: KernelUse, facts: ArchFacts) -> Knobs:
        """Derived from the arch table; inside `space`."""

    @abstractmethod
    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        """Transform `sch` (PrimFunc "main") in place. Tunable knobs may be ExprRVs: they only
        go to split factors and annotation values, never into a branch."""

    @property
    def name(self) -> str:
        return f"{type(self).__module__}.{type(self).__name__}"


class FixedRule(ScheduleRule):
    """A rule with nothing to choose: the kernel's layout follows from its shape."""

    knobs_type = NoKnobs

    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
        return {}

    def default(self, use: KernelUse, facts: ArchFacts) -> Knobs:
        return NoKnobs()


_RULES: list[ScheduleRule] = []


def register(rule: ScheduleRule) -> ScheduleRule:
    """Add `rule`; two rules for the same factory must not both serve one target kind."""
    _RULES.append(rule)
    return rule


def registered_rules() -> tuple[ScheduleRule, ...]:
    # Imported here, not at the top: the registry imports the rule modules, which import this one.
    from sparkinfer.schedule import registry  # noqa: F401  (its import registers every rule)

    return tuple(_RULES)


def rule_for(use: KernelUse, facts: ArchFacts) -> ScheduleRule:
    found = [r for r in registered_rules()
             if r.family == use.family and r.factory == use.factory and r.is_target_available(facts)]
    if not found:
        raise ScheduleError(
            f"kernel {use.name} ({use.family}.{use.factory}) has no schedule rule for {facts.name}: "
            f"register one in sparkinfer/schedule/registry.py"
        )
    if len(found) > 1:
        raise ScheduleError(
            f"kernel {use.name} ({use.family}.{use.factory}) has {len(found)} schedule rules for "
            f"{facts.name}: {', '.join(r.name for r in found)}"
        )
    return found[0]


def kernel_key(use: KernelUse) -> str:
    """The stable name of a kernel across models: family.factory(args), as schedules/<arch>.json
    keys it."""
    return f"{use.family}.{use.factory}({', '.join(repr(a) for a in use.args)})"


def kernel_use(family: str, factory: str, *args: Any) -> KernelUse:
    """A KernelUse for a factory call outside a decode step (tests, the tuner), named by its key."""
    use = KernelUse(name="", family=family, factory=factory, args=kernel_args(args))
    return dataclasses.replace(use, name=kernel_key(use))


def check_knobs(rule: ScheduleRule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
    """ScheduleError unless `knobs` is the rule's type and each value is in its space."""
    if not isinstance(knobs, rule.knobs_type):
        raise ScheduleError(f"kernel {use.name}: {rule.name} takes {rule.knobs_type.__name__}, "
                            f"got {type(knobs).__name__}")
    space = rule.space(use, facts)
    for name, value in knobs.to_json().items():
        if value not in space[name]:
            raise ScheduleError(f"kernel {use.name}: knob {name}={value!r} is outside the space "
                                f"of {rule.name} for {facts.name} ({', '.join(map(repr, space[name]))})")


def schedule_kernel(func: tirx.PrimFunc, use: KernelUse, facts: ArchFacts,
                    knobs: Knobs | None = None) -> tirx.PrimFunc:
    """`func` scheduled by its rule with `knobs` (None: the rule's default)."""
    rule = rule_for(use, facts)
    knobs = rule.default(use, facts) if knobs is None else knobs
    check_knobs(rule, use, knobs, facts)
    sch = s_tir.Schedule(func, enable_check=rule.enable_check)
    rule.apply(sch, use, knobs, facts)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def design_spaces(func: tirx.PrimFunc, use: KernelUse, facts: ArchFacts) -> list[s_tir.Schedule]:
    """One schedule per combination of structural knob values; the tunable knobs sampled. A
    combination that does not schedule (TVM's ScheduleError, or the rule's own for knob values
    that do not go together) is left out of the space: the sampled knobs only go to split
    factors and annotations, so a combination schedules for every draw or for none."""
    rule = rule_for(use, facts)
    space = rule.space(use, facts)
    names = [f.name for f in dataclasses.fields(rule.knobs_type)]  # type: ignore[arg-type]
    structural = [n for n in names if n in rule.structural()]
    schedules, failed = [], []
    for combo in itertools.product(*(range(len(space[n])) for n in structural)):
        chosen = dict(zip(structural, combo))
        sch = s_tir.Schedule(func, enable_check=rule.enable_check)
        values: dict[str, Any] = {}
        for n in names:
            if n in chosen:
                sch.sample_categorical([chosen[n]], [1.0])
                values[n] = space[n][chosen[n]]
            else:
                candidates = [int(v) for v in space[n]]
                values[n] = sch.sample_categorical(candidates, [1.0 / len(candidates)] * len(candidates))
        try:
            rule.apply(sch, use, rule.knobs_type(**values), facts)
        except (s_tir.ScheduleError, ScheduleError) as e:
            failed.append(f"{values}: {str(e).strip().splitlines()[-1]}")
            continue
        schedules.append(sch)
    if not schedules:
        raise ScheduleError(f"kernel {use.name}: no combination of {rule.name}'s knobs schedules ({failed[0]})")
    return schedules


def knobs_from_trace(trace: s_tir.schedule.Trace, use: KernelUse, facts: ArchFacts) -> Knobs:
    """The knobs a `design_spaces` trace (replayed with any decisions) was applied with."""
    rule = rule_for(use, facts)
    space = rule.space(use, facts)
    names = [f.name for f in dataclasses.fields(rule.knobs_type)]  # type: ignore[arg-type]
    samples = [inst for inst in trace.insts if inst.kind.name == "SampleCategorical"]
    if len(samples) != len(names):
        raise ScheduleError(f"kernel {use.name}: the trace has {len(samples)} sampled knobs, "
                            f"{rule.knobs_type.__name__} has {len(names)}")
    values: dict[str, Any] = {}
    for n, inst in zip(names, samples):
        decision = trace.decisions.get(inst)
        candidates = [int(c) for c in inst.attrs[0]]
        picked = candidates[int(decision) if decision is not None else 0]
        values[n] = space[n][picked] if n in rule.structural() else picked
    return rule.knobs_type(**values)
