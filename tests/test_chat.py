"""`sparkinfer chat`: the loop driven by scripted input, and the command end to end."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from typing import Iterator

import pytest

from sparkinfer.api import LLM
from sparkinfer.chat import chat_loop
from tests.runtime.conftest import REPO
from tests.server.tiny import load_tiny, tiny_paths

STATS = re.compile(r"\[(\d+) tokens, [\d.]+ tok/s, first token \d+ ms, (\d+)/(\d+) prompt tokens reused; ([^\]]+)\]")


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    with load_tiny() as model:
        yield model


def script(*lines: str):  # noqa: ANN201
    it = iter(lines)

    def read() -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def run_chat(llm: LLM, *lines: str, **options: object) -> tuple[str, list[tuple[int, int, int, str]], str]:
    out, info = io.StringIO(), io.StringIO()
    options = {"max_tokens": 8, "temperature": 0.0, **options}
    assert chat_loop(llm, read=script(*lines), out=out, info=info, **options) == 0
    stats = [(int(a), int(b), int(c), d) for a, b, c, d in STATS.findall(info.getvalue())]
    return out.getvalue(), stats, info.getvalue()


def test_turns_stream_replies_and_reuse_the_cached_history(llm: LLM) -> None:
    llm.engine.kv.reset()
    out, stats, info = run_chat(llm, "Hello there.", "", "And then?", "/reset", "Hello there.", "/exit", "never read",
                                system="Be brief.")
    assert len(stats) == 3
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there."}]
    first = llm.complete(messages, 8)
    cached = llm.prompt_tokens(messages) + first.tokens[:-1]  # the last token read is never fed
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And then?"}]
    second_reply = llm.generate(messages, 8)
    # /reset: the third turn is the first one again.
    assert out == f"{first.text}\n{second_reply}\n{first.text}\n"
    assert "[conversation reset]" in info
    (n1, reused1, prompt1, _), (_, reused2, prompt2, _), _ = stats
    assert n1 == 8 and prompt2 > prompt1 and reused1 == 0
    # Turn 2 resends the history: the K/V of its longest prefix in common with what turn 1 cached
    # (the whole first prompt, and the reply as far as its text re-tokenizes to the same ids) is kept.
    second = llm.prompt_tokens(messages)
    common = next(i for i, (a, b) in enumerate(zip(cached + [-1], second)) if a != b)
    assert reused2 == common >= prompt1


def test_commands_and_a_message_too_long(llm: LLM) -> None:
    out, stats, info = run_chat(llm, "/help", "word " * 400, "ok", "/quit")
    assert "[unknown command /help; commands: /reset forgets the conversation, /exit (or Ctrl-D) quits]" in info
    assert "this message alone is too long for the context of 256 tokens; not sent" in info
    assert len(stats) == 1


def test_old_turns_are_dropped_to_fit_the_context(llm: LLM) -> None:
    long = "the sea and the sky " * 12
    out, stats, info = run_chat(llm, long, long, long, max_tokens=20)
    assert "oldest messages to fit the context of 256 tokens" in info
    assert len(stats) == 3 and all(p + 20 <= 256 for _, _, p, _ in stats)


def test_the_command_end_to_end(llm: LLM) -> None:
    model, module = tiny_paths()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "sparkinfer.cli", "chat", str(model), "--arch", "cpu", "--module", str(module),
         "--temp", "0", "-n", "6"],
        input="hello\n/reset\nhi there\n/exit\n", capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "context 256 tokens. commands: /reset" in proc.stderr
    assert len(STATS.findall(proc.stderr)) == 2 and "[conversation reset]" in proc.stderr
    assert proc.stdout.startswith(llm.generate([{"role": "user", "content": "hello"}], 6) + "\n")
