"""schedules/<arch>.json: the knobs each kernel gets on an arch, and where they came from.

    {"arch": "cpu", "made_by": {"tvm": ..., "sparkinfer": ..., "device": ..., "date": ...},
     "kernels": {"<space.kernel_key(use)>": {"knobs": {...}, "source": "tuned" | "default" |
                 "transferred", "time_us": float | null, "default_time_us": float | null,
                 "trials": int, "seed": int | null}},
     "step": {"activations": "f32" | "q8", "chunk_operands": "f32" | "f16",
              "decode_launches": "split" | "fused",
              "programmatic_launch": "off" | "on" | "prefetch" | "weights",
              "q6_k_layout": "gguf" | "planar", "attention_form": "read_ahead" | "compact" | "registers",
              "attention_merge": "separate" | "last_block",
              "router_merge": "separate" | "last_block" | "gate_up", "decode_attention": "simt" | "mma",
              "projection_activations": "f32" | "q8", "head_activations": "f32" | "q8",
              "expert_prefetch": "off" | "down", "attention_norm": "separate" | "prologue",
              "chunk_activations": "f32" | "q8", "int8_dots": "sub_block" | "lanes"}}
                                                (optional: model-level variants, STEP_VARIANTS)

The files ship inside the package (sparkinfer/data/schedules/<arch>.json, package data), found
through importlib.resources, so an installed package uses them; `sparkinfer compile
--schedules PATH` names another. `sparkinfer tune` writes "tuned" entries; "transferred" ones
are knobs carried over to an arch nobody tuned on (the arch table's defaults, or another arch's
tuned knobs); a kernel missing from the file gets its rule's default ("default").

Imports no TVM: the manifest's staleness check hashes the file a compile would use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sparkinfer.errors import SparkInferError
from sparkinfer.kernels.gemm import GEMM_OPERANDS
from sparkinfer.kernels.gemv import DECODE_LAUNCHES, Q6_K_LAYOUTS
from sparkinfer.kernels.gemv_q8 import ACTIVATIONS, INT8_DOTS

TUNED, DEFAULT, TRANSFERRED = "tuned", "default", "transferred"
# How the compiled step's CUDA kernels are launched (model.qwen3moe.build_decode_step records it,
# compiler.pipeline.build_step applies it): "on" marks every kernel for programmatic dependent
# launch (compiler/dependent_launch.py), so a kernel may start while the one before it drains;
# "prefetch" does too, and a kernel's blocks first ask the L2 for its weights, which no kernel
# writes, so that their loads from memory overlap the kernel before; "weights" launches only the
# kernels with weights of dependent_launch.WEIGHT_BYTES or more so (and prefetches those).
PROGRAMMATIC_LAUNCH = ("off", "on", "prefetch", "weights")
# The T-token step's tensor-core attention (kernels.prefill_attention.causal_prefill_attention_half,
# chunk_operands "f16"): "read_ahead" reads K and V a key tile ahead into registers, 2 blocks an
# SM on sm_90 at head dim 128; "compact" (its `compact` argument) does not, and fits 3
# (bench/NOTES.md "Prefill attention v4"); "registers" keeps S, P and O in mma.sync's registers
# (`causal_prefill_attention_registers`, bench/NOTES.md "Prefill attention v5").
ATTENTION_FORMS = ("read_ahead", "compact", "registers")
# How the decode step merges its attention's splits: "separate", the attention_combine launch after
# paged_decode_attention; "last_block", inside the attention kernel, by the last of a KV head's
# thread blocks to finish (kernels.attention.paged_decode_attention_merged): a launch a layer less.
ATTENTION_MERGES = ("separate", "last_block")
# How the decode step picks a MoE layer's experts: "separate", the router_topk launch after the
# router's gemv; "last_block", inside the GEMV kernel, by the last of its thread blocks to finish
# (kernels.router.router_gemv_topk): a launch a layer less; "gate_up", inside the int8 experts' gate/up
# kernel, by each of its thread blocks (kernels.moe_q8.moe_gate_up_silu_q8_routed): a launch a layer
# less where the experts run on int8 activations.
ROUTER_MERGES = ("separate", "last_block", "gate_up")
# How the decode step's attention multiplies: "simt", float32 on CUDA cores
# (kernels.attention.paged_decode_attention); "mma", Q and P rounded to f16 and multiplied on tensor
# cores by mma.sync (kernels.attention.paged_decode_attention_mma, bench/NOTES.md "Decode attention v3").
DECODE_ATTENTIONS = ("simt", "mma")
# Whether the decode step's routed int8 gate/up (router_merge "gate_up") asks the L2 for the chosen
# down experts once it has picked them: "off", or "down" (kernels.moe_q8.moe_gate_up_silu_q8_routed_prefetch,
# compiler/l2_prefetch.py), so that the down kernel after it reads them from the L2. On an H100 it
# did (their DRAM reads ~0), but the down kernels gained less than the gate/up lost: -1 %
# (bench/NOTES.md, "Session 23"), so no arch's file picks it.
EXPERT_PREFETCHES = ("off", "down")
# Where the decode step normalizes a layer's attention input where its projections take int8
# activations (projection_activations "q8"): "separate", in an rms_norm_q8_1 launch before the
# Q/K/V kernels; "prologue", in every thread block of those kernels, which read h and quantize
# rmsnorm(h) * w into shared memory themselves (kernels.gemv_q8.gemv_qkv_q8_normed,
# gemv_q8_normed): a launch a layer less, for the norm's work redone by each block.
ATTENTION_NORMS = ("separate", "prologue")
# Model-level variants a schedules file may pick: keyword arguments of
# model.qwen3moe.build_decode_step and their legal values (absent: the first, the default).
STEP_VARIANTS: dict[str, tuple[str, ...]] = {"activations": ACTIVATIONS, "chunk_operands": GEMM_OPERANDS,
                                              "decode_launches": DECODE_LAUNCHES,
                                              "programmatic_launch": PROGRAMMATIC_LAUNCH, "q6_k_layout": Q6_K_LAYOUTS,
                                              "attention_form": ATTENTION_FORMS, "attention_merge": ATTENTION_MERGES,
                                              "router_merge": ROUTER_MERGES, "decode_attention": DECODE_ATTENTIONS,
                                              "projection_activations": ACTIVATIONS, "head_activations": ACTIVATIONS,
                                              "expert_prefetch": EXPERT_PREFETCHES, "attention_norm": ATTENTION_NORMS,
                                              "chunk_activations": ACTIVATIONS, "int8_dots": INT8_DOTS}
SOURCES = (TUNED, DEFAULT, TRANSFERRED)
# Variant values only the CUDA archs have: each with why the cpu build has no such thing.
CUDA_ONLY_VARIANTS = {
    ("chunk_operands", "f16"): "tensor-core operands; the cpu build has no kernels for it",
    ("programmatic_launch", "on"): "a CUDA launch attribute and the griddepcontrol instruction of sm_90 and later; "
                                   "the cpu build launches no kernels",
    **{("programmatic_launch", value): "a CUDA launch attribute, the griddepcontrol instruction and the bulk L2 "
                                       "prefetch of sm_90 and later; the cpu build launches no kernels"
       for value in ("prefetch", "weights")},
    ("attention_form", "compact"): "a form of the tensor-core attention; the cpu build's attention multiplies "
                                   "float32",
    ("attention_merge", "last_block"): "an atomic count and memory fences between CUDA thread blocks; the cpu "
                                       "build's attention has one split, and one kernel merges nothing",
    ("attention_form", "registers"): "a form of the tensor-core attention (mma.sync); the cpu build's attention "
                                     "multiplies float32",
    ("router_merge", "last_block"): "an atomic count and memory fences between CUDA thread blocks; the cpu "
                                    "build has no thread blocks to count",
    ("decode_attention", "mma"): "tensor-core products (mma.sync); the cpu build's attention multiplies float32",
    ("expert_prefetch", "down"): "the bulk L2 prefetch of sm_90 and later; the cpu build has no such instruction",
    ("attention_norm", "prologue"): "the norm redone by every CUDA thread block of the Q/K/V kernels to save a "
                                    "launch; the cpu build launches no kernels",
}
# And those only the cpu build has: each with why the CUDA archs have no such thing.
CPU_ONLY_VARIANTS = {
    ("chunk_activations", "q8"): "the T-token step's GEMM inputs rounded to the int8 blocks' values for float32 "
                                 "products; the CUDA archs' T-token steps multiply float16 operands on tensor "
                                 "cores, and the rounding kernel has no CUDA schedule",
    ("int8_dots", "lanes"): "a lane per word of a block of 32 in a SIMD register across the row; the CUDA "
                            "int8 kernels give each thread its words, and the lane form has no CUDA schedule",
}


def arch_refusal(arch: str, name: str, value: str) -> str | None:
    """Why step variant name=value cannot be built for `arch` ("is for the CUDA archs only (...)"
    or "is for the cpu build only (...)", CUDA_ONLY_VARIANTS' or CPU_ONLY_VARIANTS' reason), or
    None where it can: the one check behind a schedules file's refusal and `build_step`'s."""
    if arch == "cpu" and (name, value) in CUDA_ONLY_VARIANTS:
        return f"is for the CUDA archs only ({CUDA_ONLY_VARIANTS[name, value]})"
    if arch != "cpu" and (name, value) in CPU_ONLY_VARIANTS:
        return f"is for the cpu build only ({CPU_ONLY_VARIANTS[name, value]})"
    return None


class SchedulesFileError(SparkInferError):
    """A schedules file that cannot be read or does not fit the format."""


@dataclass(frozen=True)
class ScheduleEntry:
    knobs: dict[str, Any]
    source: str
    time_us: float | None = None
    default_time_us: float | None = None
    trials: int = 0
    seed: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"knobs": self.knobs, "source": self.source, "time_us": self.time_us,
                "default_time_us": self.default_time_us, "trials": self.trials, "seed": self.seed}


@dataclass
class SchedulesFile:
    arch: str
    made_by: dict[str, Any]
    kernels: dict[str, ScheduleEntry] = field(default_factory=dict)
    step: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {"arch": self.arch, "made_by": self.made_by,
               "kernels": {k: self.kernels[k].to_json() for k in sorted(self.kernels)}}
        if self.step:
            out["step"] = dict(self.step)
        return out

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, path: str | Path) -> SchedulesFile:
        path = Path(path)
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise SchedulesFileError(f"schedules file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SchedulesFileError(f"schedules file {path} is not readable JSON: {e}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("arch"), str) \
                or not isinstance(obj.get("kernels"), dict):
            raise SchedulesFileError(f"schedules file {path}: needs an \"arch\" string and a \"kernels\" object")
        kernels = {}
        for key, entry in obj["kernels"].items():
            if not isinstance(entry, dict) or not isinstance(entry.get("knobs"), dict):
                raise SchedulesFileError(f"schedules file {path}: kernel {key} has no \"knobs\" object")
            if entry.get("source") not in SOURCES:
                raise SchedulesFileError(f"schedules file {path}: kernel {key} has source "
                                         f"{entry.get('source')!r}, not one of {', '.join(SOURCES)}")
            kernels[key] = ScheduleEntry(
                knobs=entry["knobs"], source=entry["source"], time_us=entry.get("time_us"),
                default_time_us=entry.get("default_time_us"), trials=int(entry.get("trials", 0)),
                seed=entry.get("seed"))
        step = obj.get("step") or {}
        for name, value in (step.items() if isinstance(step, dict) else [(None, step)]):
            if name not in STEP_VARIANTS or value not in STEP_VARIANTS[name]:
                legal = "; ".join(f"{k}: {', '.join(v)}" for k, v in STEP_VARIANTS.items())
                raise SchedulesFileError(f"schedules file {path}: step variant {name}={value!r} "
                                         f"is not one of ({legal})")
            why = arch_refusal(obj["arch"], name, value)
            if why is not None:
                raise SchedulesFileError(f"schedules file {path}: step variant {name}={value!r} {why}")
        return cls(arch=obj["arch"], made_by=dict(obj.get("made_by") or {}), kernels=kernels,
                   step=dict(step))


def packaged_schedules_path(arch: str) -> Path:
    """Where the package keeps `arch`'s schedules file (which may not exist)."""
    return Path(str(resources.files("sparkinfer.data").joinpath("schedules", f"{arch}.json")))


def schedules_for(arch: str, path: str | Path | None = None) -> tuple[SchedulesFile | None, Path | None]:
    """The schedules file a compile for `arch` uses: `path` if given (it must exist and be for
    `arch`), else the packaged one if there is one; (None, None) when there is none."""
    if path is None:
        path = packaged_schedules_path(arch)
        if not path.is_file():
            return None, None
    path = Path(path)
    found = SchedulesFile.read(path)
    if found.arch != arch:
        raise SchedulesFileError(f"schedules file {path} is for {found.arch}, not {arch}")
    return found, path
