"""One set of sampling and length checks (`sparkinfer.sampling_params`): the same value is refused
with the same message by the `run` and `chat` commands (before any model loads), the Python API
and the server's request parser."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sparkinfer.cli import main
from sparkinfer.errors import InvalidParameterError
from sparkinfer.sampling_params import check_max_tokens, check_sampling
from sparkinfer.server import protocol

GOOD = {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 3}

# (API arguments, CLI flags, the message); the CLI gives the same values as flags.
BAD = [
    ({"temperature": -1.0}, ["--temp", "-1"], "temperature must be in [0, 2], got -1"),
    ({"temperature": 2.5}, ["--temp", "2.5"], "temperature must be in [0, 2], got 2.5"),
    ({"temperature": float("nan")}, ["--temp", "nan"], "temperature must be in [0, 2], got nan"),
    ({"top_p": 5.0}, ["--top-p", "5"], "top_p must be in [0, 1], got 5"),
    ({"top_p": -0.1}, ["--top-p", "-0.1"], "top_p must be in [0, 1], got -0.1"),
    ({"top_k": -3}, ["--top-k", "-3"], "top_k must be an integer >= 0 (0: no top-k cut), got -3"),
    ({"max_tokens": -5}, ["-n", "-5"], "max_tokens must be an integer >= 0, got -5"),
]
IDS = ["temp-negative", "temp-high", "temp-nan", "top-p-high", "top-p-negative", "top-k-negative", "n-negative"]


def _check(args: dict[str, Any]) -> None:
    values = {**GOOD, **args}
    max_tokens = values.pop("max_tokens", 16)
    check_sampling(**values)
    check_max_tokens(max_tokens)


@pytest.mark.parametrize("args, flags, message", BAD, ids=IDS)
def test_the_shared_checks(args: dict[str, Any], flags: list[str], message: str) -> None:
    with pytest.raises(InvalidParameterError) as e:
        _check(args)
    assert str(e.value) == message and e.value.param == next(iter(args))


@pytest.mark.parametrize("command", ["run", "chat"])
@pytest.mark.parametrize("args, flags, message", BAD, ids=IDS)
def test_the_commands_refuse_before_loading_the_model(command: str, args: dict[str, Any], flags: list[str],
                                                     message: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # A model that does not exist: the sampling check must come first.
    assert main([command, str(tmp_path / "absent.gguf"), *flags]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("args, flags, message", [b for b in BAD if "nan" not in b[1]],
                         ids=[i for i in IDS if i != "temp-nan"])  # JSON has no NaN
def test_the_server_refuses_with_the_same_message(args: dict[str, Any], flags: list[str], message: str) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], **args}).encode()
    with pytest.raises(protocol.APIError) as e:
        protocol.parse_request(body, protocol.ChatCompletionRequest)
    assert (e.value.status, e.value.message, e.value.param) == (400, message, next(iter(args)))


def test_the_server_checks_max_completion_tokens_too() -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}).encode()
    with pytest.raises(protocol.APIError) as e:
        protocol.parse_request(body, protocol.ChatCompletionRequest)
    assert (e.value.message, e.value.param) == ("max_completion_tokens must be an integer >= 0, got -1",
                                                "max_completion_tokens")


@pytest.mark.parametrize(
    "args, message",
    [
        ({"temperature": "hot"}, "temperature must be a number in [0, 2], got 'hot' (str)"),
        ({"temperature": True}, "temperature must be a number in [0, 2], got True"),
        ({"top_k": 2.5}, "top_k must be an integer >= 0 (0: no top-k cut), got 2.5"),
        ({"seed": 1.5}, "seed must be an integer or None, got 1.5"),
        ({"max_tokens": "10"}, "max_tokens must be an integer >= 0, got '10' (str)"),
    ],
    ids=["temp-str", "temp-bool", "top-k-float", "seed-float", "max-tokens-str"],
)
def test_wrong_types_are_named(args: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidParameterError) as e:
        _check(args)
    assert str(e.value) == message


def test_defaults_and_edges_pass() -> None:
    check_sampling(temperature=0, top_p=0.0, top_k=0, seed=None)
    check_sampling(temperature=2, top_p=1, top_k=10**6, seed=-7)
    check_max_tokens(None)
    check_max_tokens(0)


def test_prompt_tokens() -> None:
    from sparkinfer.sampling_params import check_prompt_tokens

    check_prompt_tokens([0, 511], 512)
    with pytest.raises(InvalidParameterError, match="^the prompt is empty: give at least one token$"):
        check_prompt_tokens([], 512)
    with pytest.raises(InvalidParameterError, match="^token id 512 is outside the vocabulary of 512 tokens$"):
        check_prompt_tokens([3, 512, -1], 512)
