"""The sampling, length and prompt arguments of a generation, checked in one place.

The `run` and `chat` commands, the Python API (`LLM.start`) and the HTTP server
(`sparkinfer.server.protocol`) all call these functions, so a value is accepted or refused
with the same message everywhere, before any model loads. One function per group of
parameters; each raises `InvalidParameterError`, whose `param` is the API name (the server
reports it as the OpenAI error's `param`). `sampler_path` says which of the device sampler's
paths a setting takes (kernels/sampling.py), for the runtime to report; plain Python, so that
the runtime imports no kernel.
"""

from __future__ import annotations

import math
import numbers

from sparkinfer.errors import InvalidParameterError

# OpenAI's ranges (the server speaks its API); 0 is greedy, top_k 0 keeps every token.
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_P_RANGE = (0.0, 1.0)

# The device sampler's paths (kernels/sampling.py: `sample_token`'s `path` output).
PATH_WINNERS = 0  # greedy, or no filter: the best of the blocks' winners
PATH_CANDIDATES = 1  # top-k (and top-p) over the merged candidates
PATH_ONE_BLOCK = 2  # the candidates could not prove the kept set: the one-block algorithm
PATH_NAMES = ("winners", "candidates", "one-block")  # by PATH_* value
# The highest top-k the candidates' path proves (kernels/sampling.py's blocks keep this many).
SAMPLER_K_MAX = 64


def sampler_path(temperature: float, top_p: float, top_k: float, vocab: int, k_max: int = SAMPLER_K_MAX) -> int:
    """The PATH_* that the device sampler takes for these settings on logits without ties at
    the top-k edge; ties there can only turn PATH_CANDIDATES into PATH_ONE_BLOCK (the kernel's
    `path` output says). float32 arithmetic, as the kernel reads the settings."""
    import numpy as np  # here: `import sparkinfer` stays light (tests/test_api.py)

    t, p = np.float32(temperature), np.float32(top_p)
    k = int(np.float32(max(min(np.float32(top_k), np.float32(vocab)), np.float32(0.0))))
    if not t > 0:
        return PATH_WINNERS
    if 0 < k < vocab:
        return PATH_CANDIDATES if k <= k_max else PATH_ONE_BLOCK
    return PATH_ONE_BLOCK if p < 1 else PATH_WINNERS


def check_sampling(*, temperature: object, top_p: object, top_k: object, seed: object = None) -> None:
    """temperature in [0, 2], top_p in [0, 1], top_k an integer >= 0, seed an integer or None."""
    _check_number("temperature", temperature, TEMPERATURE_RANGE)
    _check_number("top_p", top_p, TOP_P_RANGE)
    _check_integer("top_k", top_k, "an integer >= 0 (0: no top-k cut)")
    if seed is not None and not _is_integer(seed):
        raise InvalidParameterError("seed", f"seed must be an integer or None, got {_shown(seed)}")


def check_max_tokens(max_tokens: object, param: str = "max_tokens") -> None:
    """An integer >= 0, or None (until a stop or the end of the context). `param` names it in
    the message (the server's max_completion_tokens)."""
    if max_tokens is not None:
        _check_integer(param, max_tokens, "an integer >= 0")


def check_prompt_tokens(tokens: list[int], vocab_size: int) -> None:
    """At least one token, every id inside the vocabulary (ids already ints)."""
    if not tokens:
        raise InvalidParameterError("prompt", "the prompt is empty: give at least one token")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise InvalidParameterError("prompt", f"token id {bad[0]} is outside the vocabulary of {vocab_size} tokens")


def _check_number(param: str, value: object, bounds: tuple[float, float]) -> None:
    lo, hi = bounds
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidParameterError(param, f"{param} must be a number in [{lo:g}, {hi:g}], got {_shown(value)}")
    if math.isnan(value) or not lo <= value <= hi:
        raise InvalidParameterError(param, f"{param} must be in [{lo:g}, {hi:g}], got {float(value):g}")


def _check_integer(param: str, value: object, what: str) -> None:
    if not _is_integer(value) or value < 0:  # type: ignore[operator]
        raise InvalidParameterError(param, f"{param} must be {what}, got {_shown(value)}")


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _shown(value: object) -> str:
    if isinstance(value, (bool, numbers.Real)):
        return str(value)
    return f"{value!r:.40} ({type(value).__name__})"


__all__ = ["PATH_CANDIDATES", "PATH_NAMES", "PATH_ONE_BLOCK", "PATH_WINNERS", "SAMPLER_K_MAX", "TEMPERATURE_RANGE",
           "TOP_P_RANGE", "check_max_tokens", "check_prompt_tokens", "check_sampling", "sampler_path"]
