"""`sparkinfer chat`: a terminal chat with the model's chat template, streaming replies.

Each turn resends the whole history (rendered by the template) and the engine keeps the K/V
of the longest common prefix with what it has cached, so only the new turn's tokens run
(`reused` in the line after each reply). Commands: /reset (forget the conversation), /exit
(or Ctrl-D). Ctrl-C during a reply stops it and keeps what was said; at the prompt it exits.
`chat_loop` is the loop without the terminal, driven by any `read` function (tests script it).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, TextIO

HELP = "commands: /reset forgets the conversation, /exit (or Ctrl-D) quits"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sparkinfer.server.cli import add_model_arguments

    add_model_arguments(p)
    p.add_argument("-s", "--system", help="a system prompt, first in every conversation")
    p.add_argument("-n", "--max-tokens", type=int, default=512, help="tokens per reply at most (default: 512)")
    p.add_argument("--temp", type=float, default=0.7, help="sampling temperature; 0 is greedy (default: 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold (default: 0.95)")
    p.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens; 0: all (default: 40)")
    p.add_argument("--seed", type=int, help="sampling seed (default: random)")


def run(args: argparse.Namespace) -> int:
    from sparkinfer.sampling_params import check_max_tokens, check_sampling
    from sparkinfer.server.cli import load_model

    check_sampling(temperature=args.temp, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    check_max_tokens(args.max_tokens)
    llm = load_model(args)
    try:
        interactive = sys.stdin.isatty()
        if interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
        print(f"{llm.name} on {llm.engine.arch}, context {llm.context} tokens. {HELP}", file=sys.stderr, flush=True)
        return chat_loop(llm, read=lambda: input("> " if interactive else ""), out=sys.stdout, info=sys.stderr,
                         system=args.system, max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p,
                         top_k=args.top_k, seed=args.seed)
    finally:
        llm.close()


def chat_loop(
    llm: Any,
    *,
    read: Callable[[], str],
    out: TextIO,
    info: TextIO | None = None,
    system: str | None = None,
    max_tokens: int = 512,
    temperature: float = 0.7,
    top_p: float = 0.95,
    top_k: int = 40,
    seed: int | None = None,
) -> int:
    """Read a line with `read` (EOFError ends), stream the reply to `out`, a stats line to
    `info` (default `out`). Returns 0. The history is `messages` of the conversation so far."""
    info = info or out
    base = [{"role": "system", "content": system}] if system else []
    messages: list[dict[str, str]] = list(base)
    turn = 0
    while True:
        try:
            line = read()
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=info)
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(base)
            print("[conversation reset]", file=info, flush=True)
            continue
        if text.startswith("/") and " " not in text:
            print(f"[unknown command {text}; {HELP}]", file=info, flush=True)
            continue
        messages.append({"role": "user", "content": line})
        dropped = _fit(llm, messages, base, max_tokens)
        if dropped < 0:
            print(f"[this message alone is too long for the context of {llm.context} tokens; not sent]",
                  file=info, flush=True)
            messages.pop()
            continue
        if dropped:
            print(f"[dropped the {dropped} oldest messages to fit the context of {llm.context} tokens]", file=info,
                  flush=True)
        n_prompt = len(llm.prompt_tokens(messages))
        budget = min(max_tokens, llm.context - n_prompt)
        stream = llm.start(messages, budget, temperature=temperature, top_p=top_p, top_k=top_k,
                           seed=None if seed is None else seed + turn)
        interrupted = False
        try:
            for delta in stream:
                out.write(delta)
                out.flush()
        except KeyboardInterrupt:
            stream.close()
            interrupted = True
        c = stream.completion
        out.write("\n")
        out.flush()
        reply = c.text if c is not None else ""
        messages.append({"role": "assistant", "content": reply})
        turn += 1
        if c is not None:
            print(_stats_line(c, interrupted), file=info, flush=True)
    return 0


def _fit(llm: Any, messages: list[dict[str, str]], base: list[dict[str, str]], max_tokens: int) -> int:
    """Drop the oldest exchanges (never the system prompt or the new message) until the
    prompt leaves room for a reply; how many messages went, -1 if it cannot fit."""
    room = min(max_tokens, 16) if max_tokens > 0 else 1
    dropped = 0
    while len(llm.prompt_tokens(messages)) + room > llm.context:
        if len(messages) - len(base) <= 1:
            return -1
        del messages[len(base)]
        dropped += 1
    return dropped


def _stats_line(c: Any, interrupted: bool) -> str:
    how = "interrupted" if interrupted else {"stop": "end of reply", "length": "max tokens"}.get(c.finish_reason,
                                                                                                c.finish_reason)
    return (f"[{c.completion_tokens} tokens, {c.decode_tokens_per_s:.1f} tok/s, first token "
            f"{c.time_to_first_token_s * 1e3:.0f} ms, {c.reused_tokens}/{c.prompt_tokens} prompt tokens reused; {how}]")


__all__ = ["add_arguments", "chat_loop", "run"]
