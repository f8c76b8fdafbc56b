"""The accuracy gate: does the compiled engine compute what the numpy reference computes?

`sparkinfer accuracy MODEL.gguf` scores the same token sequence teacher-forced through the
engine and through a reference (the numpy float32 forward of MODEL or of another file of the
same model, e.g. its F16 original; or log-probs saved earlier), generates greedily with both,
and fails (exit 3) when a number is over its threshold. `gate` says what is measured,
`reference` how a reference is computed and saved, `metrics` the formulas.

Layering: uses `reference/`, `tokenizer/`, `gguf_file/` and `runtime/` (the Engine, loaded
only when the engine side runs); nothing below `runtime/` uses it.
"""

from sparkinfer.accuracy.gate import (
    DEFAULT_GREEDY_TOKENS,
    DEFAULT_PROMPT_TOKENS,
    DEFAULT_TOKENS,
    GATE_FAILED_EXIT,
    AccuracyInputError,
    AccuracyReport,
    Thresholds,
    evaluate,
    score,
)
from sparkinfer.accuracy.reference import (
    Reference,
    ReferenceFileError,
    compute_reference,
    load_reference,
    save_reference,
)

__all__ = [
    "DEFAULT_GREEDY_TOKENS",
    "DEFAULT_PROMPT_TOKENS",
    "DEFAULT_TOKENS",
    "GATE_FAILED_EXIT",
    "AccuracyInputError",
    "AccuracyReport",
    "Reference",
    "ReferenceFileError",
    "Thresholds",
    "compute_reference",
    "evaluate",
    "load_reference",
    "save_reference",
    "score",
]
