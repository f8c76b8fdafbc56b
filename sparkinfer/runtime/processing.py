"""What a request asks of the logits besides sampling: penalties, a constraint on the tokens
(a grammar), log-probabilities. The device side is kernels/logits.py, run by the step's
ENTRY_PROCESSED function; this module is the host side the engine drives.

Per request the engine writes `logits_params` and zeroes `token_counts` once; per token it
writes the constraint's mask (when there is one) before the step that samples with it. So a
constrained or logprobs request runs with no lookahead (the next mask depends on the token
just read); penalties alone keep it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from sparkinfer.errors import SparkInferError


class TokenConstraint(Protocol):
    """Which tokens may come next (a grammar matcher; sparkinfer/grammar.py)."""

    def fill_mask(self, mask: np.ndarray) -> None:
        """Write the allowed next tokens into int32[ceil(V / 32)] (bit i of word i // 32)."""

    def accept(self, token: int) -> None:
        """Advance past a sampled token."""


@dataclass
class LogitsProcessing:
    """presence, frequency: OpenAI's penalties (subtracted once for a token generated before,
    and per time it was); repetition: CTRL's (> 1 discourages repeats); all over the tokens
    generated in this request. constraint: a grammar's token masks. logprobs: None, or how
    many most likely alternatives to report per token (0: only the chosen token's)."""

    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    constraint: TokenConstraint | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        for name in ("presence", "frequency"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2.0 <= value <= 2.0):
                raise SparkInferError(f"{name}_penalty must be in [-2, 2], got {value}")
        if not (math.isfinite(self.repetition) and 0.0 < self.repetition <= 10.0):
            raise SparkInferError(f"repetition_penalty must be in (0, 10], got {self.repetition}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise SparkInferError(f"top_logprobs must be in [0, 20], got {self.logprobs}")

    @property
    def on_device(self) -> bool:
        """Whether the step must process the logits (else the plain step runs: no cost)."""
        return (self.presence != 0.0 or self.frequency != 0.0 or self.repetition != 1.0
                or self.constraint is not None)

    @property
    def params(self) -> np.ndarray:
        return np.array([self.presence, self.frequency, self.repetition], np.float32)


@dataclass
class TokenLogprob:
    """The log-probability of a generated token under the model (raw logits, before
    temperature, penalties and masks: as `LLM.score` computes it), and the `top` most likely
    tokens with theirs."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def token_logprob(logits: np.ndarray, token: int, n_top: int) -> TokenLogprob:
    """log_softmax(logits)[token] in float64, and the n_top best (ties: lower id first)."""
    x = np.asarray(logits, np.float64)
    m = x.max()
    logz = m + math.log(np.exp(x - m).sum())
    top: list[tuple[int, float]] = []
    if n_top:
        best = np.argpartition(-x, n_top - 1)[:n_top]
        best = best[np.lexsort((best, -x[best]))]
        top = [(int(i), float(x[i] - logz)) for i in best]
    return TokenLogprob(int(token), float(x[token] - logz), top)
