"""The Python API: `sparkinfer.load()` returns an `LLM`, a thin text-level wrapper of the runtime
`Engine` (tokens) with its tokenizer and chat template.

    import sparkinfer
    llm = sparkinfer.load()                          # the model shipped in the package
    llm.generate("Once upon a time", max_tokens=32)  # -> str
    for delta in llm.generate([{"role": "user", "content": "Hi"}], stream=True):
        print(delta, end="")
    llm.score("The cat sat")                         # teacher-forced log-probabilities

Every generation keeps the cached K/V of the longest common prefix with the previous sequence
(`Engine.generate(reuse_prefix=True)`), so a chat that resends its history each turn only runs
the new tokens. The engine holds one sequence: an `LLM` runs one generation at a time, and
starting a new one (or `score`) ends a stream still open. It is not meant to be shared between
threads without a lock; the HTTP server (`sparkinfer.server`) serialises requests in one worker.

Importing this module is light: TVM, numpy and the tokenizer load with the model.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence, Union

from sparkinfer.errors import ContextLengthError, InvalidParameterError, SparkInferError
from sparkinfer.sampling_params import check_max_tokens, check_prompt_tokens, check_sampling

if TYPE_CHECKING:
    import numpy as np

    from sparkinfer.grammar import Grammar, Grammars
    from sparkinfer.runtime.engine import Engine, Generation, GenerationStats
    from sparkinfer.runtime.processing import LogitsProcessing, TokenLogprob

_PROMPT_KINDS = "a prompt is a string, a list of chat messages (dicts with 'role' and 'content') or a list of token ids"

Message = dict[str, Any]
Prompt = Union[str, Sequence[Message], Sequence[int]]

logger = logging.getLogger("sparkinfer")


def load(
    model: str | Path | None = None,
    arch: str | None = None,
    context: int | None = None,
    **engine_options: Any,
) -> LLM:
    """Load a GGUF model for generation.

    model: a .gguf path (None: the small model shipped in the package). arch: "cpu", "sm_90",
    "sm_120", "sm_121" (None: the GPU found, else cpu). context: KV-cache tokens (None: the
    model's context_length, shrunk to what fits). `engine_options` go to the runtime `Engine`
    (module_dir, cuda_graph, search_roots, cache, compile, ...). The module for this model and
    device is compiled on first use when none is found (needs full TVM).
    """
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise InvalidParameterError("model", f"model must be a path to a .gguf file or None, got "
                                    f"{type(model).__name__}")
    from sparkinfer.runtime.device import check_arch
    from sparkinfer.runtime.engine import Engine

    if arch is not None:
        check_arch(arch)

    if model is None:
        from sparkinfer.data import default_model_path

        model = default_model_path()
    engine_options.setdefault("log", logger.info)
    return LLM(Engine(model, arch=arch, context=context, **engine_options))


@dataclass
class Completion:
    """The outcome of one generation. finish_reason: "stop" (a stop token or stop string),
    "length" (max_tokens or the context), or "cancelled" (`TextStream.cancel`, or the stream was
    closed or replaced before the end)."""

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    reused_tokens: int
    seed: int
    time_to_first_token_s: float  # from the call to the first token on the host (prefill included)
    elapsed_s: float
    stats: GenerationStats | None = field(default=None, repr=False)

    @property
    def logprobs(self) -> list[TokenLogprob]:
        """Per token of `tokens`, when the generation asked for logprobs (else empty)."""
        return self.stats.logprobs if self.stats is not None else []

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first per second of the time after the first."""
        rest = self.elapsed_s - self.time_to_first_token_s
        return (len(self.tokens) - 1) / rest if len(self.tokens) > 1 and rest > 0 else 0.0

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class StopMatcher:
    """Cut a text stream at the first of several stop strings without ever releasing text that
    might turn out to be the start of one: the longest tail that is a prefix of a stop string
    is held back until the next piece decides."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """(text safe to release, whether a stop string was found: nothing after it comes)."""
        if not self.stops:
            return piece, False
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        self._held = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """The held tail, at the end of the stream (it was not a stop string)."""
        held, self._held = self._held, ""
        return held


class TextStream:
    """An iterator of text deltas (whole UTF-8 characters, stop strings cut off); once it ends,
    `completion` holds the result. `cancel()` (from any thread) ends it after the current token;
    `close()` ends it at once."""

    def __init__(self, llm: LLM, prompt: list[int], max_tokens: int, sampling: tuple[float, float, int, int],
                 stop: Sequence[str], stop_tokens: Sequence[int] | None,
                 processing: LogitsProcessing | None = None) -> None:
        self._llm = llm
        self._processing = processing
        self._prompt = prompt
        self._max_tokens = max_tokens
        self._sampling = sampling
        self._stop = list(stop)
        self._stop_tokens = stop_tokens
        self._cancelled = False
        self._gen: Generation | None = None
        self.completion: Completion | None = None
        self._it = self._run()

    @property
    def seed(self) -> int:
        return self._sampling[3]

    @property
    def logprobs(self) -> list[TokenLogprob]:
        """The log-probabilities of the tokens generated so far (when asked for)."""
        return self._gen.stats.logprobs if self._gen is not None else []

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._it)

    def cancel(self) -> None:
        self._cancelled = True

    def close(self) -> None:
        self._it.close()

    def text(self) -> str:
        """Run to the end; the whole text."""
        return "".join(self)

    def _run(self) -> Iterator[str]:
        from sparkinfer.tokenizer import StreamDecoder

        llm = self._llm
        t0 = time.perf_counter()
        llm._claim(self)
        temperature, top_p, top_k, seed = self._sampling
        gen = llm.engine.generate(self._prompt, self._max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                  seed=seed, stop_tokens=self._stop_tokens, stream=True, reuse_prefix=True,
                                  processing=self._processing)
        self._gen = gen
        decoder = StreamDecoder(llm.tokenizer, skip_special=True)
        matcher = StopMatcher(self._stop)
        parts: list[str] = []
        finish = "cancelled"
        first = 0.0
        try:
            ended = False
            for token in gen:
                if not first:
                    first = time.perf_counter() - t0
                out, hit = matcher.push(decoder.push(token))
                if out:
                    parts.append(out)
                    yield out
                if hit:
                    finish, ended = "stop", True
                    break
                if self._cancelled:
                    ended = True
                    break
            if not ended:
                out, hit = matcher.push(decoder.flush())
                out += "" if hit else matcher.flush()
                if out:
                    parts.append(out)
                    yield out
                finish = "stop" if hit else gen.stats.stop_reason or "length"
        finally:
            gen.close()
            llm._release(self)
            stats = gen.stats
            self.completion = Completion(
                text="".join(parts), tokens=list(stats.tokens), finish_reason=finish,
                prompt_tokens=stats.prompt_tokens, reused_tokens=stats.reused_tokens, seed=seed,
                time_to_first_token_s=first or stats.prefill_s, elapsed_s=time.perf_counter() - t0, stats=stats)


class LLM:
    """A loaded model at the level of text. `engine` is the runtime Engine underneath."""

    def __init__(self, engine: Engine, name: str | None = None) -> None:
        self.engine = engine
        self.name = name or _model_name(engine)
        self._lock = threading.Lock()
        self._active: TextStream | None = None
        self._bound_thread: int | None = None
        self._grammars: Grammars | None = None

    # -- model facts ------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def grammars(self) -> Grammars:
        """The grammar compiler for this model's tokenizer (llguidance; built on first use)."""
        if self._grammars is None:
            from sparkinfer.grammar import Grammars

            self._grammars = Grammars(self.tokenizer, self.engine.default_stop_tokens())
        return self._grammars

    @property
    def config(self) -> Any:
        return self.engine.config

    @property
    def context(self) -> int:
        """Tokens the KV cache holds: prompt + generated tokens of one sequence."""
        return self.engine.capacity

    # -- text <-> tokens --------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of `text`; with special=False, control tokens written in it are plain text."""
        return self.tokenizer.encode(text, allow_special=special)

    def detokenize(self, tokens: Sequence[int], *, skip_special: bool = False) -> str:
        return self.tokenizer.decode([int(t) for t in tokens], skip_special=skip_special)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """The model's chat template (GGUF `tokenizer.chat_template`) rendered for `messages`;
        `extra` reaches the template (tools, enable_thinking, ...)."""
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, **extra)

    def prompt_tokens(self, prompt: Prompt, **template_extra: Any) -> list[int]:
        """Token ids of a prompt: text, chat messages (rendered with the chat template, ready
        for the assistant's turn) or token ids (checked against the vocabulary)."""
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        if not isinstance(prompt, Sequence):
            raise InvalidParameterError("prompt", f"{_PROMPT_KINDS}, got {type(prompt).__name__}")
        items = list(prompt)
        if items and all(isinstance(m, dict) for m in items):
            return self.tokenize(self.apply_chat_template(items, add_generation_prompt=True, **template_extra))
        if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
            ids = [int(t) for t in items]
            if ids:  # empty is refused by `start`, and scores nothing
                check_prompt_tokens(ids, self.config.vocab_size)
            return ids
        raise InvalidParameterError("prompt", f"{_PROMPT_KINDS}, got a list holding "
                                    f"{', '.join(sorted({type(i).__name__ for i in items}))}")

    # -- generation -------------------------------------------------------------------------

    def generate(
        self,
        prompt: Prompt,
        max_tokens: int | None = None,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
        stop_tokens: Sequence[int] | None = None,
        **processing: Any,
    ) -> Any:
        """Generate text after `prompt` (text, chat messages or token ids).

        max_tokens None: until a stop, or the context is full. temperature 0 is greedy.
        seed None: a fresh random one (see `Completion.seed`). stop: strings that end the text
        (not included). stop_tokens: token ids that end it (None: the model's EOS/EOT).
        `processing` (see `start`): presence_penalty, frequency_penalty, repetition_penalty,
        json_schema, grammar, logprobs.
        Returns the text, or with stream=True a `TextStream` of text deltas.
        """
        s = self.start(prompt, max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                       stop=stop, stop_tokens=stop_tokens, **processing)
        return s if stream else s.text()

    def complete(self, prompt: Prompt, max_tokens: int | None = None, **options: Any) -> Completion:
        """Like `generate`, but the whole `Completion`: text, finish reason, usage, timings."""
        s = self.start(prompt, max_tokens, **options)
        s.text()
        assert s.completion is not None
        return s.completion

    def start(
        self,
        prompt: Prompt,
        max_tokens: int | None = None,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_tokens: Sequence[int] | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        json_schema: Any = None,
        grammar: Grammar | None = None,
        logprobs: int | None = None,
    ) -> TextStream:
        """The `TextStream` of `generate(..., stream=True)`; checks every argument before any work.

        presence_penalty, frequency_penalty (OpenAI's, in [-2, 2]) and repetition_penalty
        (CTRL's, > 1 discourages) act on the tokens generated so far, on the device.
        json_schema: a JSON schema (dict) the text must be valid under (llguidance; strings,
        numbers, lists and objects it leaves open are bounded: `grammar.bounded`); grammar: a
        `Grammar` from `llm.grammars` (JSON schema, JSON object, tool calls) instead.
        logprobs: report each token's log-probability and this many alternatives
        (`Completion.logprobs`, `TextStream.logprobs`).
        """
        check_sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        check_max_tokens(max_tokens)
        stops = _stop_strings(stop)
        ids = self.prompt_tokens(prompt)
        check_prompt_tokens(ids, self.config.vocab_size)
        max_tokens = self.check_length(len(ids), max_tokens)
        if seed is None:
            seed = secrets.randbits(31)
        from sparkinfer.runtime.processing import LogitsProcessing

        if json_schema is not None:
            if grammar is not None:
                raise SparkInferError("give json_schema or grammar, not both")
            grammar = self.grammars.json_schema(json_schema)
        if grammar is not None and stop_tokens is not None:
            stop_tokens = list(stop_tokens) + self.engine.default_stop_tokens()  # how a grammar ends
        processing = LogitsProcessing(float(presence_penalty), float(frequency_penalty), float(repetition_penalty),
                                      grammar.constraint() if grammar is not None else None,
                                      None if logprobs is None else int(logprobs))
        return TextStream(self, ids, max_tokens, (float(temperature), float(top_p), int(top_k), int(seed)), stops,
                          stop_tokens, processing)

    def check_length(self, n_prompt: int, max_tokens: int | None) -> int:
        """max_tokens for a prompt of `n_prompt` tokens (None: what is left of the context);
        ContextLengthError naming the prompt, max_tokens and the context when it does not fit."""
        check_max_tokens(max_tokens)
        if max_tokens is None:
            if n_prompt >= self.context:
                raise ContextLengthError(
                    f"prompt ({n_prompt} tokens) leaves no room for max_tokens (at least 1) in the context of "
                    f"{self.context} tokens: the prompt must be shorter than {self.context} tokens")
            return self.context - n_prompt
        if n_prompt + max_tokens > self.context:
            raise ContextLengthError(
                f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {n_prompt + max_tokens} tokens exceeds "
                f"the context of {self.context} tokens")
        return max_tokens

    # -- scoring ----------------------------------------------------------------------------

    def score(self, tokens: str | Sequence[int]) -> np.ndarray:
        """Teacher-forced log-probabilities: float32[T - 1], entry i = log P(tokens[i + 1] |
        tokens[: i + 1]) (the first token has no prediction). Text is tokenized first."""
        import numpy as np

        ids = self.prompt_tokens(tokens) if not isinstance(tokens, str) else self.tokenize(tokens)
        if len(ids) > self.context:
            raise ContextLengthError(f"{len(ids)} tokens to score exceed the context of {self.context} tokens")
        if len(ids) < 2:
            return np.zeros(0, np.float32)
        self._claim(None)
        try:
            logits = self.engine.forward(ids[:-1]).astype(np.float64)
        finally:
            self._release(None)
        m = logits.max(axis=-1, keepdims=True)
        logz = m[:, 0] + np.log(np.exp(logits - m).sum(axis=-1))
        return (logits[np.arange(len(ids) - 1), ids[1:]] - logz).astype(np.float32)

    # -- lifetime ---------------------------------------------------------------------------

    def _claim(self, owner: TextStream | None) -> None:
        """Make `owner` the one user of the engine's sequence, ending a stream left open."""
        with self._lock:
            previous, self._active = self._active, owner
        if previous is not None and previous is not owner:
            previous.close()
        self._bind_thread()

    def _release(self, owner: TextStream | None) -> None:
        with self._lock:
            if self._active is owner:
                self._active = None

    def _bind_thread(self) -> None:
        """On a GPU, make the engine's device and stream current in this thread (TVM keeps
        the launch stream per thread; the server generates in a worker thread)."""
        stream = getattr(self.engine, "stream", None)
        ident = threading.get_ident()
        if stream is None or self._bound_thread == ident:
            return
        stream.rt.set_device(self.engine.device.index)
        stream.activate()
        self._bound_thread = ident

    def close(self) -> None:
        if self._active is not None:
            self._active.close()
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LLM({self.name!r}, arch={self.engine.arch!r}, context={self.context})"


def _stop_strings(stop: object) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop) if isinstance(stop, (list, tuple)) else None
    if stops is None or not all(isinstance(s, str) for s in stops):
        raise InvalidParameterError("stop", f"stop must be a string or a list of strings, got {stop!r:.40}")
    return stops


def _model_name(engine: Any) -> str:
    name = engine.model.metadata.get("general.name")
    if isinstance(name, str) and name.strip():
        return name.strip()
    return Path(engine.model.path).stem


__all__ = ["LLM", "Completion", "StopMatcher", "TextStream", "load"]
