"""The accuracy gate: score one token sequence teacher-forced through the compiled engine and
through a reference, generate greedily with both, compare, and judge against thresholds.

    from sparkinfer.accuracy import evaluate
    report = evaluate("model.gguf", ref_model="model-f16.gguf", arch="cpu")
    print(report.table()); report.ok, report.failures, report.to_json()

What is compared (`metrics` defines the per-position numbers):
  - teacher-forced: N tokens of text fed one step each (`Engine.forward`) against the
    reference's log-probs at the same N-1 positions: mean KL(ref || ours), top-1 agreement,
    perplexity of both and ppl_ours / ppl_ref;
  - greedy, from a prompt of the text's first `prompt_tokens` tokens, `greedy_tokens` long:
      greedy_match: along the reference's greedy continuation, fed to our engine teacher-forced,
        the fraction of steps where our argmax picks the reference's token. It is what the
        gate judges: it does not depend on where the two first part ways;
      greedy_prefix: our free-running greedy generation (`Engine.generate`) and the reference's
        agree on this many leading tokens. After the first difference the two texts continue
        different contexts, so a quantized model against its F16 original (top-1 agreement
        ~94 %) parts within a few tokens; against the numpy forward of the same file it is all
        of them. Reported; judged only when `min_greedy_prefix` > 0.

Default thresholds: the shipped Q4_K_M model against its F16 original on the default held-out
text, measured on the CPU runtime, with a margin (numbers in `sparkinfer/data/README.md`).
The same limits are loose for a model against the numpy forward of the same file (where KL is
~1e-7), and still catch a broken kernel, which costs nats, not hundredths.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparkinfer.accuracy import metrics
from sparkinfer.accuracy.reference import (
    Reference,
    check_reference,
    compute_reference,
    load_reference,
    model_identity,
    save_reference,
    vocab_hash,
)
from sparkinfer.errors import SparkInferError

Log = Callable[[str], None]

DEFAULT_TOKENS = 512
DEFAULT_PROMPT_TOKENS = 32
DEFAULT_GREEDY_TOKENS = 64
GATE_FAILED_EXIT = 3  # `sparkinfer accuracy`: 0 pass, 1 error, 2 usage, 3 over a threshold


class AccuracyInputError(SparkInferError):
    """The gate cannot run on what it was given (text too short, too many tokens...)."""


@dataclass(frozen=True)
class Thresholds:
    """Limits of the gate (None or a non-finite value: not judged)."""

    max_mean_kl: float | None = 0.03
    min_top1: float | None = 0.85
    max_ppl_ratio: float | None = 1.05
    min_greedy_match: float | None = 0.6
    min_greedy_prefix: float | None = 0.0  # a fraction of greedy_tokens; 0: reported only


# (threshold field, metric key, "max"/"min", label, CLI flag)
CHECKS: tuple[tuple[str, str, str, str, str], ...] = (
    ("max_mean_kl", "mean_kl", "max", "mean KL(ref || ours)", "--max-kl"),
    ("min_top1", "top1_agreement", "min", "top-1 agreement", "--min-top1"),
    ("max_ppl_ratio", "ppl_ratio", "max", "perplexity ratio ours/ref", "--max-ppl-ratio"),
    ("min_greedy_match", "greedy_match", "min", "greedy match", "--min-greedy-match"),
    ("min_greedy_prefix", "greedy_prefix_fraction", "min", "greedy prefix", "--min-greedy-prefix"),
)


@dataclass
class AccuracyReport:
    model: str
    reference: dict[str, Any]
    engine: dict[str, Any]
    text: dict[str, Any]
    metrics: dict[str, Any]
    greedy: dict[str, Any]
    thresholds: dict[str, Any]
    checks: list[dict[str, Any]]
    per_position: dict[str, list]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    @property
    def failures(self) -> list[str]:
        """One sentence per failed threshold, naming it and its flag."""
        return [f"{c['label']} {_fmt(c['metric'], c['value'])} {'>' if c['kind'] == 'max' else '<'} "
                f"{c['kind']} {_fmt(c['metric'], c['limit'])} ({c['flag']})" for c in self.checks if not c["ok"]]

    def failure_message(self) -> str:
        return "accuracy gate failed: " + "; ".join(self.failures)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        out["failed"] = [c["name"] for c in self.checks if not c["ok"]]
        return out

    def table(self) -> str:
        m, g = self.metrics, self.greedy
        ref = self.reference
        lines = [
            f"model      {self.model} on {self.engine.get('arch', '?')} ({self.engine.get('device', '?')})",
            f"reference  {ref['description']}",
            f"text       {self.text['source']}: {self.text['n_tokens']} tokens, {m['positions']} positions; "
            f"greedy {g['tokens']} tokens after {g['prompt_tokens']}",
            "",
            f"{'metric':<28}{'value':>22}  {'limit':>10}",
        ]
        limits = {c["metric"]: c for c in self.checks}
        rows = [
            ("mean KL(ref || ours), nats", "mean_kl", _kl(m["mean_kl"])),
            ("  p99 / max KL", None, f"{_kl(m['p99_kl'])} / {_kl(m['max_kl'])}"),
            ("top-1 agreement", "top1_agreement", f"{100 * m['top1_agreement']:.2f} %"),
            ("perplexity ref / ours", None, f"{m['ppl_ref']:.3f} / {m['ppl_ours']:.3f}"),
            ("perplexity ratio ours/ref", "ppl_ratio", f"{m['ppl_ratio']:.4f}"),
            ("greedy match (forced)", "greedy_match",
             "-" if g["match"] is None else f"{100 * g['match']:.2f} %"),
            ("greedy prefix (free-running)", "greedy_prefix_fraction",
             "-" if g["prefix"] is None else f"{g['prefix']} of {g['tokens']}"),
        ]
        for label, key, value in rows:
            c = limits.get(key) if key else None
            limit = (f"{'<=' if c['kind'] == 'max' else '>='} {_fmt(key, c['limit'])}") if c else ""
            mark = ("ok" if c["ok"] else "FAIL") if c else ""
            lines.append(f"{label:<28}{value:>22}  {limit:>10}  {mark}".rstrip())
        lines.append("")
        lines.append("PASS" if self.ok else "FAIL: " + "; ".join(self.failures))
        return "\n".join(lines)


def _kl(value: float) -> str:
    """A KL for the table: fixed point, or 3 significant digits below 1e-3 (a model against its
    own numpy forward is at 1e-9, which fixed point would print as zero)."""
    return f"{value:.5f}" if value >= 1e-3 or value == 0 else f"{value:.2e}"


def _fmt(metric: str, value: float) -> str:
    if metric in ("top1_agreement", "greedy_match", "greedy_prefix_fraction"):
        return f"{100 * value:.2f} %"
    if metric == "mean_kl":
        return f"{value:.5f}"
    return f"{value:.4f}"


# -----------------------------------------------------------------------------------------
# Scoring an engine against a reference
# -----------------------------------------------------------------------------------------


def judge(values: dict[str, float | None], thresholds: Thresholds) -> list[dict[str, Any]]:
    checks = []
    for name, metric, kind, label, flag in CHECKS:
        limit = getattr(thresholds, name)
        value = values.get(metric)
        if limit is None or not np.isfinite(limit) or value is None:
            continue
        if name == "min_greedy_prefix" and limit <= 0:
            continue
        ok = bool(value <= limit) if kind == "max" else bool(value >= limit)
        checks.append({"name": name, "metric": metric, "kind": kind, "label": label, "flag": flag,
                       "value": float(value), "limit": float(limit), "ok": ok})
    return checks


def score(engine: Any, ref: Reference, thresholds: Thresholds = Thresholds(), *, log: Log | None = None
          ) -> tuple[dict[str, Any], dict[str, Any], dict[str, list], list[dict[str, Any]], dict[str, float]]:
    """Run `engine` (anything with Engine's `forward(tokens) -> logits [T, V]` and
    `generate(prompt, n, stop_tokens=())`) against `ref`. Returns (metrics, greedy,
    per_position, checks, timings)."""
    log = log or (lambda message: None)
    tokens = np.asarray(ref.tokens, np.int64)
    t0 = time.perf_counter()
    logits = np.asarray(engine.forward(tokens[:-1].tolist()))
    t1 = time.perf_counter()
    vocab = int(ref.meta.get("vocab_size") or logits.shape[-1])
    if logits.shape != (tokens.size - 1, vocab):
        raise SparkInferError(f"the engine gave logits of shape {logits.shape} for {tokens.size - 1} tokens")
    lo = metrics.log_softmax(logits)
    pos = np.arange(tokens.size - 1)
    kl = ref.kl(lo)
    top1_match = np.argmax(lo, axis=-1) == ref.top1
    nll_ref = -np.asarray(ref.target_logprob, np.float64)
    nll_ours = -lo[pos, tokens[1:]].astype(np.float64)
    summary = metrics.summary(kl, top1_match, nll_ref, nll_ours)
    log(f"ours: {tokens.size - 1} teacher-forced steps in {t1 - t0:.1f} s")

    prompt = [int(t) for t in ref.greedy_prompt]
    want = [int(t) for t in ref.greedy_tokens]
    greedy: dict[str, Any] = {"prompt_tokens": len(prompt), "tokens": len(want), "match": None, "prefix": None,
                              "prefix_fraction": None, "ref_ids": want, "ours_ids": [], "forced_ids": []}
    t2 = t3 = time.perf_counter()
    if want:
        ours = [int(t) for t in engine.generate(prompt, len(want), stop_tokens=())]
        t2 = time.perf_counter()
        forced = np.argmax(np.asarray(engine.forward(prompt + want[:-1])), axis=-1)[len(prompt) - 1:]
        t3 = time.perf_counter()
        prefix = metrics.first_divergence(ours, want)
        greedy.update(match=float(np.mean(forced == np.asarray(want))), prefix=prefix,
                      prefix_fraction=prefix / len(want), ours_ids=ours, forced_ids=[int(t) for t in forced])
        log(f"ours: greedy {len(want)} tokens in {t2 - t1:.1f} s, forced {len(prompt) + len(want) - 1} steps "
            f"in {t3 - t2:.1f} s")
    checks = judge({**summary, "greedy_match": greedy["match"], "greedy_prefix_fraction": greedy["prefix_fraction"]},
                   thresholds)
    per_position = {
        "kl": [round(float(x), 7) for x in kl],
        "top1_match": [int(x) for x in top1_match],
        "nll_ref": [round(float(x), 5) for x in nll_ref],
        "nll_ours": [round(float(x), 5) for x in nll_ours],
    }
    timings = {"ours_forward_s": round(t1 - t0, 3), "ours_greedy_s": round(t2 - t1, 3),
               "ours_forced_s": round(t3 - t2, 3)}
    return summary, greedy, per_position, checks, timings


# -----------------------------------------------------------------------------------------
# The whole gate from files
# -----------------------------------------------------------------------------------------


def read_text(text: str | Path | None) -> tuple[str, dict[str, Any]]:
    """(text, {source, sha256}) of a text file, or of the default held-out text when None."""
    from sparkinfer.data import default_text_path

    path = Path(text) if text is not None else default_text_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise AccuracyInputError(f"text file {path} does not exist") from None
    except OSError as e:
        raise AccuracyInputError(f"cannot read the text file {path}: {e.strerror}") from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AccuracyInputError(f"text file {path} is not UTF-8 ({e.reason} at byte {e.start})") from None
    source = f"default ({path.name})" if text is None else str(path)
    return content, {"source": source, "sha256": hashlib.sha256(raw).hexdigest()}


def tokens_of(model: Any, text: str, n_tokens: int, text_name: str, *, prompt_tokens: int,
              greedy_tokens: int) -> list[int]:
    """The first `n_tokens` ids of `text`, with every size checked against the model."""
    from sparkinfer.tokenizer import Tokenizer

    ctx = int(model.config.context_length)
    if n_tokens < 2:
        raise AccuracyInputError(f"--tokens must be at least 2 (one position scored), got {n_tokens}")
    if n_tokens > ctx:
        raise AccuracyInputError(f"--tokens {n_tokens} exceeds the model's context of {ctx} tokens")
    if greedy_tokens < 0 or prompt_tokens < 1:
        raise AccuracyInputError(f"--greedy must be >= 0 and --prompt-tokens >= 1, got {greedy_tokens} and "
                                 f"{prompt_tokens}")
    if greedy_tokens and prompt_tokens > n_tokens:
        raise AccuracyInputError(f"--prompt-tokens {prompt_tokens} exceeds --tokens {n_tokens}: the greedy prompt "
                                 f"is the start of the scored tokens")
    if greedy_tokens and prompt_tokens + greedy_tokens > ctx:
        raise AccuracyInputError(f"--prompt-tokens {prompt_tokens} + --greedy {greedy_tokens} exceed the model's "
                                 f"context of {ctx} tokens")
    ids = Tokenizer.from_vocab(model.vocab).encode(text, allow_special=False)
    if len(ids) < n_tokens:
        raise AccuracyInputError(f"text {text_name} is {len(ids)} tokens long, shorter than the {n_tokens} needed "
                                 f"(--tokens {n_tokens}, --prompt-tokens {prompt_tokens}): give a longer text or "
                                 f"fewer tokens")
    return ids[:n_tokens]


def evaluate(
    model: str | Path,
    *,
    text: str | Path | None = None,
    n_tokens: int = DEFAULT_TOKENS,
    ref: str | Path | Reference = "numpy",
    ref_model: str | Path | None = None,
    save_ref: str | Path | None = None,
    ref_storage: str = "auto",
    arch: str | None = None,
    module_dir: str | Path | None = None,
    engine: Any = None,
    thresholds: Thresholds = Thresholds(),
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    greedy_tokens: int = DEFAULT_GREEDY_TOKENS,
    reference_only: bool = False,
    prefill_chunk: int | None = None,
    log: Log | None = None,
) -> AccuracyReport | Reference:
    """The accuracy gate of `model` (a GGUF path) on `n_tokens` of `text` (a file; None: the
    shipped held-out text).

    ref: "numpy" (the numpy forward of `ref_model`, default `model` itself), a file saved by
    `save_ref` earlier, or a `Reference`. engine: an Engine-like object to score instead of
    loading `Engine(model, arch=arch, module_dir=module_dir)`. reference_only: stop after the
    reference (and `save_ref`) and return it. prefill_chunk: the engine's only T-token step
    (`Engine`'s prefill_chunk), so that a short text gates a long chunk's step.
    """
    from sparkinfer.gguf_file import GGUFModel

    log = log or (lambda message: None)
    m = GGUFModel.open(model)
    content, text_info = read_text(text)
    tokens = tokens_of(m, content, n_tokens, text_info["source"], prompt_tokens=prompt_tokens,
                       greedy_tokens=greedy_tokens)
    text_info["n_tokens"] = len(tokens)

    t0 = time.perf_counter()
    if isinstance(ref, Reference):
        reference, where = ref, "a reference given by the caller"
        check_reference(reference, "given", model=m, tokens=tokens, prompt_tokens=prompt_tokens,
                        greedy_tokens=greedy_tokens, text_name=text_info["source"])
    elif str(ref) == "numpy":
        rm = m if ref_model is None else GGUFModel.open(ref_model)
        if rm.config.hparams_hash() != m.config.hparams_hash():
            raise AccuracyInputError(f"--ref-model {rm.path} is another model than {m.path} (hparams hash "
                                     f"{rm.config.hparams_hash()} vs {m.config.hparams_hash()})")
        if vocab_hash(rm.vocab) != vocab_hash(m.vocab):
            raise AccuracyInputError(f"--ref-model {rm.path} has another vocabulary than {m.path}")
        reference = compute_reference(rm, tokens, prompt_tokens=prompt_tokens, greedy_tokens=greedy_tokens,
                                      text=dict(text_info), log=log)
        where = f"numpy float32 forward of {rm.path}"
    else:
        if ref_model is not None:
            raise AccuracyInputError("--ref-model names the model whose numpy forward is the reference: it goes "
                                     "with --ref numpy, not with a saved reference file")
        reference = load_reference(ref)
        check_reference(reference, str(ref), model=m, tokens=tokens, prompt_tokens=prompt_tokens,
                        greedy_tokens=greedy_tokens, text_name=text_info["source"])
        saved = reference.meta.get("reference_model", {})
        where = f"{ref} (saved: numpy forward of {saved.get('file', '?')}, {reference.storage})"
    ref_seconds = time.perf_counter() - t0
    if save_ref is not None:
        stored = save_reference(reference, save_ref, ref_storage)
        log(f"reference saved to {save_ref} ({stored.storage}, {Path(save_ref).stat().st_size / 2**20:.1f} MiB)")
    if reference_only:
        return reference

    own_engine = engine is None
    if not own_engine and prefill_chunk is not None:
        raise AccuracyInputError("prefill_chunk picks a step of the engine evaluate loads; the engine given has its own")
    if own_engine:
        from sparkinfer.runtime.engine import Engine

        engine = Engine(m, arch=arch, module_dir=module_dir, log=log, prefill_chunk=prefill_chunk)
    try:
        summary, greedy, per_position, checks, timings = score(engine, reference, thresholds, log=log)
        describe = engine.describe() if hasattr(engine, "describe") else {}
    finally:
        if own_engine:
            engine.close()
    return AccuracyReport(
        model=str(m.path),
        reference={"description": where, "storage": reference.storage, "model": reference.meta.get("reference_model"),
                   "ref_file": None if isinstance(ref, Reference) or str(ref) == "numpy" else str(ref)},
        engine={"arch": describe.get("arch", getattr(engine, "arch", None)), "device": describe.get("device"),
                "module": describe.get("module"), "model": model_identity(m)},
        text=text_info,
        metrics=summary,
        greedy=greedy,
        thresholds=asdict(thresholds),
        checks=checks,
        per_position=per_position,
        timings={"reference_s": round(ref_seconds, 3), **timings},
    )


def write_json(report: AccuracyReport, path: str | Path) -> None:
    try:
        Path(path).write_text(json.dumps(report.to_json(), indent=1) + "\n")
    except OSError as e:
        raise SparkInferError(f"cannot write the report to {path}: {e.strerror}") from None


__all__ = ["AccuracyInputError", "AccuracyReport", "CHECKS", "DEFAULT_GREEDY_TOKENS", "DEFAULT_PROMPT_TOKENS",
           "DEFAULT_TOKENS", "GATE_FAILED_EXIT", "Thresholds", "evaluate", "judge", "read_text", "score",
           "tokens_of", "write_json"]
