"""The accuracy gate on the CPU path with a tiny model: the report, a broken engine and a
perturbed reference failing with the right message, saved references (round trip, top-k,
mismatches), and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sparkinfer.accuracy import (
    AccuracyInputError,
    GATE_FAILED_EXIT,
    Reference,
    ReferenceFileError,
    Thresholds,
    evaluate,
    load_reference,
    save_reference,
)
from sparkinfer.accuracy import metrics
from sparkinfer.cli import main
from sparkinfer.data import default_text_path
from sparkinfer.errors import SparkInferError
from tests.accuracy.conftest import SMALL, SMALL_FLAGS


def cli(model: Path, module: Path, *flags: str) -> list[str]:
    return ["accuracy", str(model), "--arch", "cpu", "--module", str(module), *SMALL_FLAGS, *flags]


# -- metrics --------------------------------------------------------------------------------


def test_metrics() -> None:
    rng = np.random.default_rng(0)
    a = metrics.log_softmax(rng.standard_normal((5, 50)) * 3)
    b = metrics.log_softmax(rng.standard_normal((5, 50)) * 3)
    np.testing.assert_allclose(metrics.kl_full(a, a), 0, atol=1e-9)
    full = metrics.kl_full(a, b)
    assert (full > 0).all()
    # two outcomes: KL([.5, .5] || [.9, .1]) = .5 log(.5/.9) + .5 log(.5/.1)
    two = metrics.kl_full(np.log([[0.5, 0.5]]), np.log([[0.9, 0.1]]))
    np.testing.assert_allclose(two, [0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(5.0)], rtol=1e-12)
    # top-k plus the whole tail as its "sample": exact
    order = np.argsort(-a, axis=-1)
    head, rest = order[:, :8], order[:, 8:]
    at = lambda ids: np.take_along_axis(a, ids, -1)  # noqa: E731
    np.testing.assert_allclose(metrics.kl_topk_tail(head, at(head), rest, at(rest), b), full, rtol=1e-6)  # float32 log-probs
    # a sampled tail: unbiased, so the mean over many draws of a 10-token sample is close
    rng = np.random.default_rng(1)
    draws = [metrics.kl_topk_tail(head, at(head), s, at(s), b)
             for s in (np.take_along_axis(rest, np.stack([rng.choice(42, 10, replace=False) for _ in range(5)]), -1)
                       for _ in range(2000))]
    np.testing.assert_allclose(np.mean(draws, axis=0), full, rtol=0.03)
    # a flat distribution and a nearly equal one: the estimate keeps the 1e-9-level KL (a sampled
    # sum of p log(p/q) alone would be off by the first-order terms, ~1e-6 here)
    rng = np.random.default_rng(2)
    flat = metrics.log_softmax(rng.standard_normal((4, 100_000)) * 0.9)
    near = metrics.log_softmax(flat.astype(np.float64) + rng.standard_normal(flat.shape) * 1e-4)
    exact = metrics.kl_full(flat, near)
    order = np.argsort(-flat, axis=-1)
    head, sample = order[:, :64], np.take_along_axis(order[:, 64:], rng.integers(0, 100_000 - 64, (4, 1024)), -1)
    est = metrics.kl_topk_tail(head, np.take_along_axis(flat, head, -1), sample,
                               np.take_along_axis(flat, sample, -1), near)
    assert (exact > 1e-9).all() and (exact < 2e-8).all(), exact
    np.testing.assert_allclose(est, exact, rtol=0.4)
    assert metrics.first_divergence([1, 2, 3], [1, 2, 4]) == 2 and metrics.first_divergence([1], [1, 2]) == 1
    np.testing.assert_allclose(metrics.perplexity([np.log(4.0)] * 3), 4.0)


# -- the report -----------------------------------------------------------------------------


def test_engine_against_its_own_numpy_forward(tiny_model: Path, tiny_engine) -> None:  # noqa: ANN001
    report = evaluate(tiny_model, engine=tiny_engine, **SMALL)
    assert report.ok, report.table()
    m, g = report.metrics, report.greedy
    assert m["positions"] == 63 and m["mean_kl"] < 1e-3 and m["top1_agreement"] == 1.0
    assert abs(m["ppl_ratio"] - 1) < 1e-3 and m["ppl_ref"] > 1
    assert g["match"] == 1.0 and g["prefix"] == 16 and g["ours_ids"] == g["ref_ids"] == g["forced_ids"]
    assert len(g["ref_ids"]) == 16 and g["prompt_tokens"] == 16
    out = report.to_json()
    assert out["ok"] is True and out["failed"] == []
    assert {c["name"] for c in out["checks"]} == {"max_mean_kl", "min_top1", "max_ppl_ratio", "min_greedy_match"}
    assert out["thresholds"] == {"max_mean_kl": 0.03, "min_top1": 0.85, "max_ppl_ratio": 1.05,
                                 "min_greedy_match": 0.6, "min_greedy_prefix": 0.0}
    assert out["text"]["source"] == "default (heldout-genericpath.txt)" and out["text"]["n_tokens"] == 64
    assert len(out["text"]["sha256"]) == 64
    assert {len(v) for v in out["per_position"].values()} == {63}
    assert out["reference"]["storage"] == "full" and out["reference"]["model"]["file"] == "tiny.gguf"
    assert out["engine"]["arch"] == "cpu"
    json.dumps(out)  # plain JSON


def test_cli_prints_the_table_and_writes_json(tiny_model: Path, tiny_module: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    assert main(cli(tiny_model, tiny_module, "--json", str(out), "--min-greedy-prefix", "1")) == 0
    text = capsys.readouterr().out
    assert "mean KL(ref || ours), nats" in text and "top-1 agreement" in text and "100.00 %" in text
    assert "16 of 16" in text and text.rstrip().endswith("PASS")
    report = json.loads(out.read_text())
    assert report["ok"] and report["greedy"]["prefix"] == 16
    assert "min_greedy_prefix" in [c["name"] for c in report["checks"]]
    assert main(cli(tiny_model, tiny_module, "--json", "-")) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["top1_agreement"] == 1.0


def test_cli_gates_through_one_step_of_the_module(tiny_model: Path, tiny_module: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # the CPU module's one T-token step (compiler/pipeline.py DEFAULT_PREFILL_CHUNKS) holds the
    # 64 tokens, padded; a size the module lacks is refused when the engine loads
    assert main(cli(tiny_model, tiny_module, "--prefill-chunk", "128")) == 0
    assert capsys.readouterr().out.rstrip().endswith("PASS")
    assert main(cli(tiny_model, tiny_module, "--prefill-chunk", "64")) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "error: prefill chunk 64 is not one of the module's T-token steps (128)"


def test_a_prefill_chunk_goes_with_the_engine_evaluate_loads(tiny_model: Path, tiny_engine) -> None:  # noqa: ANN001
    with pytest.raises(AccuracyInputError, match="^prefill_chunk picks a step of the engine evaluate loads; the "
                                                 "engine given has its own$"):
        evaluate(tiny_model, engine=tiny_engine, prefill_chunk=128, **SMALL)


# -- failing the gate -----------------------------------------------------------------------


class NoisyEngine:
    """The engine with its logits disturbed: what a broken kernel looks like to the gate."""

    def __init__(self, engine, scale: float) -> None:  # noqa: ANN001
        self.engine, self.scale = engine, scale
        self.rng = np.random.default_rng(0)

    def forward(self, tokens):  # noqa: ANN001, ANN201
        logits = self.engine.forward(tokens)
        return logits + self.scale * self.rng.standard_normal(logits.shape).astype(np.float32)

    def generate(self, prompt, n, stop_tokens=()):  # noqa: ANN001, ANN201
        return self.engine.generate(prompt, n, stop_tokens=stop_tokens)


def test_a_broken_engine_fails(tiny_model: Path, tiny_engine) -> None:  # noqa: ANN001
    report = evaluate(tiny_model, engine=NoisyEngine(tiny_engine, 8.0), **SMALL)
    assert not report.ok
    failed = {c["name"] for c in report.checks if not c["ok"]}
    assert {"max_mean_kl", "min_top1", "min_greedy_match"} <= failed
    message = report.failure_message()
    assert message.startswith("accuracy gate failed: mean KL(ref || ours) ")
    assert "> max 0.03000 (--max-kl)" in message and "< min 85.00 % (--min-top1)" in message
    assert "(--min-greedy-match)" in message
    # A little noise passes the default limits and fails tight ones.
    slight = evaluate(tiny_model, engine=NoisyEngine(tiny_engine, 0.02), **SMALL)
    assert slight.ok and 0 < slight.metrics["mean_kl"] < 1e-2
    strict = evaluate(tiny_model, engine=NoisyEngine(tiny_engine, 0.02), thresholds=Thresholds(max_mean_kl=1e-7),
                      **SMALL)
    assert [c["name"] for c in strict.checks if not c["ok"]] == ["max_mean_kl"]


def test_a_perturbed_reference_file_fails_with_exit_3(tiny_model: Path, tiny_module: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "ref.npz"
    ref = evaluate(tiny_model, save_ref=good, reference_only=True, **SMALL)
    # The reference's log-probs disturbed (and its argmax and target log-probs with them).
    rng = np.random.default_rng(1)
    lp = metrics.log_softmax(ref.logprobs + 4.0 * rng.standard_normal(ref.logprobs.shape).astype(np.float32))
    bad = Reference(tokens=ref.tokens, target_logprob=lp[np.arange(lp.shape[0]), ref.tokens[1:]],
                    top1=lp.argmax(-1).astype(np.int32), greedy_prompt=ref.greedy_prompt,
                    greedy_tokens=ref.greedy_tokens, logprobs=lp, meta=ref.meta)
    save_reference(bad, tmp_path / "bad.npz")
    assert main(cli(tiny_model, tiny_module, "--ref", str(tmp_path / "bad.npz"))) == GATE_FAILED_EXIT
    captured = capsys.readouterr()
    assert "FAIL" in captured.out
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith("accuracy gate failed: mean KL(ref || ours) ") and "(--max-kl)" in err
    assert "(--min-top1)" in err and "greedy" not in err  # the greedy tokens were left as they were
    assert main(cli(tiny_model, tiny_module, "--ref", str(good))) == 0


# -- saved references -----------------------------------------------------------------------


def test_save_ref_round_trip(tiny_model: Path, tiny_engine, tmp_path: Path) -> None:  # noqa: ANN001
    path = tmp_path / "ref.bin"  # any name: nothing is appended
    live = evaluate(tiny_model, save_ref=path, reference_only=True, **SMALL)
    loaded = load_reference(path)
    assert path.is_file() and not Path(str(path) + ".npz").exists()
    assert loaded.storage == "full-f16" and loaded.logprobs.dtype == np.float16
    for name in ("tokens", "target_logprob", "top1", "greedy_prompt", "greedy_tokens"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(live, name))
    np.testing.assert_allclose(loaded.logprobs.astype(np.float32), live.logprobs, atol=0.02, rtol=1e-3)
    meta = loaded.meta
    assert meta["hparams_hash"] == live.meta["hparams_hash"] and meta["n_tokens"] == 64
    assert meta["text"]["source"] == "default (heldout-genericpath.txt)" and meta["storage"] == "full-f16"
    assert meta["reference_model"]["file"] == "tiny.gguf" and "sparkinfer_version" in meta
    a = evaluate(tiny_model, engine=tiny_engine, **SMALL)
    b = evaluate(tiny_model, engine=tiny_engine, ref=path, **SMALL)
    assert b.reference["storage"] == "full-f16" and b.reference["ref_file"] == str(path)
    assert abs(a.metrics["mean_kl"] - b.metrics["mean_kl"]) < 1e-4
    for key in ("top1_agreement", "ppl_ref", "ppl_ours"):
        assert b.metrics[key] == pytest.approx(a.metrics[key], rel=1e-6)
    assert b.greedy == a.greedy


def test_topk_storage(tiny_model: Path, tiny_engine, tmp_path: Path) -> None:  # noqa: ANN001
    live = evaluate(tiny_model, reference_only=True, **SMALL)
    noisy_engine = NoisyEngine(tiny_engine, 1.0)
    full = evaluate(tiny_model, engine=noisy_engine, ref=live, **SMALL)
    save_reference(live, tmp_path / "topk.npz", storage="topk", k=16, tail=128)
    top = load_reference(tmp_path / "topk.npz")
    assert top.storage == "topk" and top.topk_ids.shape == (63, 16) and top.meta["topk"] == 16
    assert top.tail_ids.shape == (63, 128) and top.meta["tail_sample"] == 128
    for p in range(63):  # the sample: distinct ids, none of them in the top-k
        assert len(set(top.tail_ids[p])) == 128 and not set(top.tail_ids[p]) & set(top.topk_ids[p])
    noisy_engine.rng = np.random.default_rng(0)  # the same noise again
    est = evaluate(tiny_model, engine=noisy_engine, ref=tmp_path / "topk.npz", **SMALL)
    kl_full, kl_est = np.array(full.per_position["kl"]), np.array(est.per_position["kl"])
    assert (kl_est > 0).all()
    assert kl_est.mean() == pytest.approx(kl_full.mean(), rel=0.15)
    assert est.metrics["top1_agreement"] == full.metrics["top1_agreement"]
    assert est.metrics["ppl_ref"] == pytest.approx(full.metrics["ppl_ref"], rel=1e-6)


def test_mismatched_references_are_refused(tiny_model: Path, other_shape_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "ref.npz"
    evaluate(tiny_model, save_ref=path, reference_only=True, **SMALL)
    with pytest.raises(ReferenceFileError, match=r"was made for a model with hparams hash \w+ \(tiny.gguf\), "
                                                 r"other.gguf has \w+: they are different models"):
        evaluate(other_shape_model, ref=path, reference_only=True, **SMALL)
    other_text = tmp_path / "other.txt"
    other_text.write_text(default_text_path().read_text()[500:])
    with pytest.raises(ReferenceFileError, match=r"scores 64 tokens of default \(heldout-genericpath.txt\) "
                                                 r"\(sha256 [0-9a-f]{16}\), this run 64 tokens of .*other.txt, "
                                                 r"first different at token 0: pass the --text and --tokens"):
        evaluate(tiny_model, ref=path, text=other_text, reference_only=True, **SMALL)
    with pytest.raises(ReferenceFileError, match="this run 48 tokens of default .* first different at token 48"):
        evaluate(tiny_model, ref=path, reference_only=True, **{**SMALL, "n_tokens": 48})
    with pytest.raises(ReferenceFileError, match="pass --greedy 16 --prompt-tokens 16"):
        evaluate(tiny_model, ref=path, reference_only=True, **{**SMALL, "greedy_tokens": 8})
    with pytest.raises(SparkInferError, match="--ref-model .*other.gguf is another model than"):
        evaluate(tiny_model, ref_model=other_shape_model, reference_only=True, **SMALL)


def test_unreadable_reference_files(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ReferenceFileError, match=r"reference file .*missing.npz does not exist \(make one with"):
        load_reference(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_text("not a zip")
    with pytest.raises(ReferenceFileError, match="junk.npz is not a SparkInfer accuracy reference"):
        load_reference(junk)
    alien = tmp_path / "alien.npz"
    np.savez(alien, meta=np.array(json.dumps({"kind": "something else"})))
    with pytest.raises(ReferenceFileError, match="its meta has kind 'something else'"):
        load_reference(alien)
    with pytest.raises(ReferenceFileError, match="this SparkInfer reads format 2"):
        np.savez(alien, meta=np.array(json.dumps({"kind": "sparkinfer-accuracy-reference", "format": 99})))
        load_reference(alien)


def test_damaged_topk_references_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "topk.npz"
    save_reference(evaluate(tiny_model, reference_only=True, **SMALL), path, storage="topk", k=16, tail=32)
    with np.load(path) as z:
        arrays = {name: z[name] for name in z.files}
    damaged = tmp_path / "no-tail.npz"
    np.savez(damaged, **{n: a for n, a in arrays.items() if n != "tail_logprobs"})
    with pytest.raises(ReferenceFileError, match=r"no-tail.npz lacks logprobs or "
                                                 r"topk_ids\+topk_logprobs\+tail_ids\+tail_logprobs: it is damaged"):
        load_reference(damaged)
    damaged = tmp_path / "short-tail.npz"
    np.savez(damaged, **{**arrays, "tail_logprobs": arrays["tail_logprobs"][:, :8]})
    with pytest.raises(ReferenceFileError, match="short-tail.npz has arrays of inconsistent shapes: it is damaged"):
        load_reference(damaged)


# -- bad inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--text", "{tmp}/nope.txt"], "error: text file {tmp}/nope.txt does not exist"),
        (["--text", "{tmp}/short.txt"], "error: text {tmp}/short.txt is 2 tokens long, shorter than the 64 needed "
                                        "(--tokens 64, --prompt-tokens 16): give a longer text or fewer tokens"),
        (["--text", "{tmp}/latin1.txt"],
         "error: text file {tmp}/latin1.txt is not UTF-8 (invalid continuation byte at byte 3)"),
        (["--tokens", "1000"], "error: --tokens 1000 exceeds the model's context of 256 tokens"),
        (["--tokens", "1"], "error: --tokens must be at least 2 (one position scored), got 1"),
        (["--greedy", "250"], "error: --prompt-tokens 16 + --greedy 250 exceed the model's context of 256 tokens"),
        (["--prompt-tokens", "65"], "error: --prompt-tokens 65 exceeds --tokens 64: the greedy prompt is the start "
                                    "of the scored tokens"),
        (["--ref", "{tmp}/r.npz", "--ref-model", "{tmp}/x.gguf"],
         "error: --ref-model names the model whose numpy forward is the reference: it goes with --ref numpy"),
        (["--ref", "{tmp}/r.npz"], "error: reference file {tmp}/r.npz does not exist (make one with --save-ref)"),
        (["--ref-only"], "error: --ref-only makes a reference to save: give --save-ref FILE"),
    ],
    ids=["missing-text", "short-text", "not-utf8", "over-context", "one-token", "greedy-over-context", "prompt-over-tokens",
         "ref-file-and-ref-model", "missing-ref", "ref-only-unsaved"],
)
def test_bad_inputs(flags: list[str], message: str, tiny_model: Path, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "short.txt").write_text("def f")
    (tmp_path / "latin1.txt").write_bytes(b"abc\xe9 def")
    flags = [f.format(tmp=tmp_path) for f in flags]
    args = ["accuracy", str(tiny_model), *SMALL_FLAGS, *flags]
    assert main(args) == 1
    assert capsys.readouterr().err.startswith(message.format(tmp=tmp_path))


@pytest.mark.parametrize("prompt_tokens", [63, 64], ids=["all-but-last", "all"])
def test_greedy_prompt_up_to_all_scored_tokens(prompt_tokens: int, tiny_model: Path, tiny_engine) -> None:  # noqa: ANN001
    # The reference keeps the prompt's KV from the teacher-forced pass when the prompt is shorter
    # than the scored tokens; at the edges its greedy tokens must still be the plain greedy run's.
    from sparkinfer.gguf_file import GGUFModel
    from sparkinfer.reference import ReferenceModel

    sizes = {**SMALL, "prompt_tokens": prompt_tokens}
    report = evaluate(tiny_model, engine=tiny_engine, **sizes)
    ref = evaluate(tiny_model, reference_only=True, **sizes)
    model = GGUFModel.open(tiny_model)
    want = ReferenceModel(model.config, model).greedy_generate(ref.tokens[:prompt_tokens].tolist(), 16)
    assert ref.greedy_tokens.tolist() == want
    assert report.greedy["prompt_tokens"] == prompt_tokens and report.ok


def test_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["accuracy", str(tmp_path / "none.gguf")]) == 1
    assert capsys.readouterr().err == f"error: cannot read {tmp_path / 'none.gguf'}: No such file or directory\n"


# -- the shipped model ----------------------------------------------------------------------


@pytest.mark.slow
def test_shipped_model_passes_the_default_gate_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`sparkinfer accuracy` with no model: the shipped Q4_K_M against its F16 original, the
    numbers recorded in sparkinfer/data/README.md (a minute on 2 cores, compile included)."""
    from tests.runtime.conftest import can_compile

    if not can_compile():
        pytest.skip("runtime-only TVM: cannot build the CPU module here")
    monkeypatch.setenv("SPARKINFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SPARKINFER_COMPILED", raising=False)
    out = tmp_path / "report.json"
    assert main(["accuracy", "--arch", "cpu", "--json", str(out)]) == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    m = report["metrics"]
    assert report["reference"]["model"]["file"] == "default-f16.gguf" and m["positions"] == 511
    assert m["mean_kl"] == pytest.approx(0.00893, abs=5e-4)
    assert m["top1_agreement"] == pytest.approx(0.9452, abs=0.006)
    assert m["ppl_ratio"] == pytest.approx(1.0046, abs=0.002)
    assert report["greedy"]["match"] >= 0.85
