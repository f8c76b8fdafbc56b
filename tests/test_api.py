"""The Python API (`sparkinfer.load` -> `LLM`) on the CPU with the tiny decisive model: text in,
text out, streaming, stop strings, scoring, and the errors a caller can cause."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from sparkinfer.api import LLM, StopMatcher
from sparkinfer.errors import ContextLengthError, InvalidParameterError, SparkInferError, UnsupportedDeviceError
from tests.runtime.conftest import REPO
from tests.server.tiny import load_tiny
from tests.test_sampling_params import BAD
from tests.test_sampling_params import IDS as BAD_IDS

PROMPT = "hello world, the model"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def llm() -> LLM:
    with load_tiny() as model:
        yield model


def test_import_stays_light() -> None:
    heavy = "('tvm', 'numpy', 'tokenizers', 'gguf', 'fastapi', 'uvicorn')"
    code = ("import sys, sparkinfer; sparkinfer.LLM; import sparkinfer.api, sparkinfer.chat, sparkinfer.server; "
            f"print(sorted(m for m in {heavy} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]"


def test_generate_is_the_engines_greedy_tokens_as_text(llm: LLM) -> None:
    ids = llm.tokenize(PROMPT)
    want = list(llm.engine.generate(ids, 12))
    text = llm.generate(PROMPT, max_tokens=12)
    assert isinstance(text, str)
    assert text == llm.detokenize(want, skip_special=True)
    c = llm.complete(PROMPT, 12)
    assert c.text == text and c.tokens == want
    assert c.usage == {"prompt_tokens": len(ids), "completion_tokens": 12, "total_tokens": len(ids) + 12}
    assert c.finish_reason == "length" and c.time_to_first_token_s > 0


def test_stream_yields_deltas_that_add_up(llm: LLM) -> None:
    whole = llm.generate(PROMPT, max_tokens=20)
    stream = llm.generate(PROMPT, max_tokens=20, stream=True)
    deltas = list(stream)
    assert len(deltas) > 1 and all(d for d in deltas)
    assert "".join(deltas) == whole == stream.completion.text
    assert stream.completion.completion_tokens == 20


def test_messages_go_through_the_chat_template(llm: LLM) -> None:
    rendered = llm.apply_chat_template(CHAT)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert llm.prompt_tokens(CHAT) == llm.tokenize(rendered)
    assert llm.generate(CHAT, max_tokens=10) == llm.generate(rendered, max_tokens=10)


def test_token_ids_are_a_prompt_too(llm: LLM) -> None:
    ids = llm.tokenize(PROMPT)
    assert llm.generate(ids, max_tokens=8) == llm.generate(PROMPT, max_tokens=8)


def test_stop_strings_cut_the_text_and_never_leak(llm: LLM) -> None:
    whole = llm.generate(PROMPT, max_tokens=30)
    stop = whole[10:14]
    assert whole.find(stop) == 10, "pick a stop string that first occurs at 10"
    c = llm.complete(PROMPT, 30, stop=[stop, "never-there"])
    assert c.text == whole[:10] and c.finish_reason == "stop"
    assert c.completion_tokens < 30
    stream = llm.generate(PROMPT, max_tokens=30, stop=stop, stream=True)
    emitted = ""
    for delta in stream:
        emitted += delta
        assert whole[:10].startswith(emitted)  # never a character of the stop string
    assert emitted == whole[:10] and stream.completion.finish_reason == "stop"


def test_stop_matcher_holds_back_only_possible_starts() -> None:
    m = StopMatcher(["END", "xyz"])
    assert m.push("abcE") == ("abc", False)  # "E" may start "END"
    assert m.push("N") == ("", False)
    assert m.push("Dtail") == ("", True)  # "END" completed across three pieces
    m = StopMatcher(["END"])
    assert m.push("aEN") == ("a", False)
    assert m.push("x") == ("ENx", False)  # not a stop after all: released
    assert m.push("EN") == ("", False) and m.flush() == "EN"
    m = StopMatcher(["bc", "abcd"])
    assert m.push("zabcd") == ("z", True)  # the earliest match wins ("abcd" at 1, not "bc" at 2)
    assert StopMatcher([]).push("anything") == ("anything", False)


def test_a_stop_token_ends_with_finish_reason_stop(llm: LLM) -> None:
    tokens = llm.complete(PROMPT, 10).tokens
    c = llm.complete(PROMPT, 10, stop_tokens=[tokens[3]])
    assert c.tokens == tokens[: tokens.index(tokens[3])] and c.finish_reason == "stop"


def test_score_is_teacher_forced_log_softmax(llm: LLM) -> None:
    ids = llm.tokenize(PROMPT)
    scores = llm.score(ids)
    logits = llm.engine.forward(ids).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = logp[np.arange(len(ids) - 1), ids[1:]]
    assert scores.shape == (len(ids) - 1,) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
    assert np.all(scores <= 0)
    np.testing.assert_allclose(llm.score(PROMPT), scores)  # text is tokenized first
    # Greedy continuations are each position's most likely token.
    gen = llm.complete(ids, 6).tokens
    full = ids + gen
    best = logp_max(llm, full)
    np.testing.assert_allclose(llm.score(full)[len(ids) - 1:], best[len(ids) - 1:], rtol=1e-5, atol=1e-5)
    assert llm.score([ids[0]]).shape == (0,)


def logp_max(llm: LLM, ids: list[int]) -> np.ndarray:
    logits = llm.engine.forward(ids[:-1]).astype(np.float64)
    m = logits.max(-1)
    return m - (m + np.log(np.exp(logits - m[:, None]).sum(-1)))


def test_tokenize_and_detokenize(llm: LLM) -> None:
    text = "hello <|im_end|> world"
    ids = llm.tokenize(text)
    assert llm.detokenize(ids) == text
    im_end = llm.tokenizer.eos_id
    assert im_end in ids and im_end not in llm.tokenize(text, special=False)
    assert llm.detokenize(ids, skip_special=True) == "hello  world"


def test_generations_reuse_the_cached_prefix(llm: LLM) -> None:
    first = llm.complete(CHAT, 8)
    history = CHAT + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "More."}]
    second = llm.complete(history, 8)
    assert second.reused_tokens >= first.prompt_tokens
    # Reuse changes nothing in the tokens: a cold cache gives the same reply.
    llm.engine.kv.reset()
    cold = llm.complete(history, 8)
    assert cold.reused_tokens == 0 and cold.tokens == second.tokens


def test_seeded_sampling_is_reproducible(llm: LLM) -> None:
    a = llm.complete(PROMPT, 16, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    b = llm.complete(PROMPT, 16, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    assert a.tokens == b.tokens and a.seed == 7
    texts = {llm.generate(PROMPT, 16, temperature=1.0, seed=s) for s in range(4)}
    assert len(texts) > 1
    assert llm.complete(PROMPT, 4, temperature=1.0).seed != llm.complete(PROMPT, 4, temperature=1.0).seed


def test_cancel_ends_a_stream_after_the_current_token(llm: LLM) -> None:
    stream = llm.generate(PROMPT, max_tokens=50, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            stream.cancel()
    c = stream.completion
    assert c.finish_reason == "cancelled" and c.completion_tokens < 50
    # The cache is consistent afterwards.
    assert llm.engine.kv.n_tokens == int(llm.engine.kv.arrays["pos"].numpy()[0])
    assert llm.generate(PROMPT, 5) == llm.generate(PROMPT, 5)


def test_a_new_generation_ends_an_open_stream(llm: LLM) -> None:
    old = llm.generate(PROMPT, max_tokens=40, stream=True)
    next(old)
    assert llm.generate("other text", max_tokens=5) == llm.generate("other text", max_tokens=5)
    assert list(old) == [] and old.completion.finish_reason == "cancelled"


@pytest.mark.parametrize("args, flags, message", BAD, ids=BAD_IDS)
def test_sampling_and_length_errors_are_the_shared_ones(llm: LLM, args: dict[str, Any], flags: list[str],
                                                        message: str) -> None:
    with pytest.raises(InvalidParameterError) as e:
        llm.generate(PROMPT, **{"max_tokens": 4, **args})
    assert str(e.value) == message


@pytest.mark.parametrize(
    "prompt, message",
    [
        (123, "a prompt is a string, a list of chat messages (dicts with 'role' and 'content') or a list of token "
              "ids, got int"),
        ([1, "a"], "a prompt is a string, a list of chat messages (dicts with 'role' and 'content') or a list of "
                   "token ids, got a list holding int, str"),
        (None, "a prompt is a string, a list of chat messages (dicts with 'role' and 'content') or a list of token "
               "ids, got NoneType"),
    ],
    ids=["int", "mixed-list", "none"],
)
def test_a_prompt_of_the_wrong_type_is_named(llm: LLM, prompt: Any, message: str) -> None:
    with pytest.raises(InvalidParameterError) as e:
        llm.generate(prompt, max_tokens=4)
    assert str(e.value) == message and e.value.param == "prompt"


def test_load_checks_its_arguments_before_loading() -> None:
    import sparkinfer

    with pytest.raises(InvalidParameterError, match="model must be a path to a .gguf file or None, got int"):
        sparkinfer.load(123)
    with pytest.raises(UnsupportedDeviceError, match="unknown arch 'sm_80': SparkInfer targets sm_90, sm_120, "
                                                     "sm_121, cpu"):
        sparkinfer.load("absent.gguf", arch="sm_80")


def test_errors_name_the_problem(llm: LLM) -> None:
    with pytest.raises(SparkInferError, match="the prompt is empty"):
        llm.generate("", max_tokens=4)
    with pytest.raises(ContextLengthError, match=r"prompt \(\d+ tokens\) \+ max_tokens \(300\) = \d+ tokens exceeds "
                                                 r"the context of 256 tokens"):
        llm.generate(PROMPT, max_tokens=300)
    with pytest.raises(ContextLengthError, match="leaves no room for max_tokens"):
        llm.generate([5] * 256)
    with pytest.raises(SparkInferError, match="max_tokens must be an integer >= 0, got -1"):
        llm.generate(PROMPT, max_tokens=-1)
    with pytest.raises(SparkInferError, match="token id 9999 is outside the vocabulary of 512 tokens"):
        llm.generate([1, 9999])
    with pytest.raises(SparkInferError, match="top_p must be in"):
        llm.generate(PROMPT, 4, top_p=1.5)
    with pytest.raises(SparkInferError, match="stop must be a string or a list of strings, got \\[3\\]"):
        llm.generate(PROMPT, 4, stop=[3])
    with pytest.raises(SparkInferError, match="stop must be a string or a list of strings, got 5"):
        llm.generate(PROMPT, 4, stop=5)
    with pytest.raises(ContextLengthError, match="300 tokens to score exceed the context of 256"):
        llm.score([5] * 300)
    # max_tokens None fills the context.
    c = llm.complete([5] * 250, stop_tokens=())
    assert c.completion_tokens == 6 and c.finish_reason == "length"


def test_the_public_namespace_is_what_all_lists() -> None:
    import sparkinfer

    assert dir(sparkinfer) == ["Completion", "LLM", "TextStream", "__version__", "load"] == sorted(sparkinfer.__all__)
