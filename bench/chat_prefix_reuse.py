"""Time to first token of chat turns with and without KV prefix reuse.

A chat resends its whole history each turn; `LLM.generate` keeps the cached K/V of the longest
common prefix (`Engine.generate(reuse_prefix=True)`) so turn n only runs what is new. This runs a
fixed conversation (greedy) and, for each turn, measures the time to the first token:
  - reuse: the turn as `sparkinfer chat` runs it, the cache holding the previous turns;
  - cold:  the same prompt after `kv.reset()` (what every turn would cost without reuse).
TTFT = template + tokenize (`prep`) + engine time to the first token on the host. Medians over
--repeats runs of the conversation, after one warm-up.

    python bench/chat_prefix_reuse.py                             # default model, GPU if any else CPU
    python bench/chat_prefix_reuse.py model.gguf --arch sm_90 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYSTEM = "You are a helpful assistant. Answer in a few sentences, plainly, without lists."
TURNS = [
    "I have a small Python script that reads a CSV file of temperatures, one row per day, and prints the "
    "average for each month. It works, but it is slow on a file with ten years of data. What should I look at first?",
    "Good idea. The script opens the file once, then for every month it loops over all the rows again to "
    "find the ones in that month. How would you restructure that loop?",
    "That makes sense. Could I also use the csv module's DictReader instead of splitting lines by hand, "
    "and would that change the speed much?",
    "Last question: the file sometimes has empty lines and a header in the middle. How do I skip those safely?",
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", type=Path, help="a .gguf file (default: the model shipped in the package)")
    p.add_argument("--arch", help="sm_90, sm_120, sm_121 or cpu (default: the GPU found, else cpu)")
    p.add_argument("--ctx", type=int, help="KV cache tokens (default: the model's context)")
    p.add_argument("--module", type=Path, help="a compiled module directory")
    p.add_argument("--turns", type=int, default=len(TURNS), help=f"turns of the conversation (max {len(TURNS)})")
    p.add_argument("-n", "--max-tokens", type=int, default=48, help="tokens per reply (default 48)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = p.parse_args()

    import sparkinfer

    llm = sparkinfer.load(args.model, arch=args.arch, context=args.ctx, module_dir=args.module,
                          log=lambda m: print(m, file=sys.stderr))
    turns = TURNS[: args.turns]
    llm.generate("warm up", max_tokens=4)
    turns = fitting(llm, turns, args.max_tokens)
    runs = [conversation(llm, turns, args.max_tokens) for _ in range(args.repeats)]
    rows = []
    for t in range(len(turns)):
        per = [r[t] for r in runs]
        rows.append({
            "turn": t + 1,
            "prompt_tokens": per[0]["prompt_tokens"],
            "reused_tokens": per[0]["reused_tokens"],
            "reply_tokens": per[0]["reply_tokens"],
            "ttft_reuse_ms": statistics.median(r["ttft_reuse_ms"] for r in per),
            "ttft_cold_ms": statistics.median(r["ttft_cold_ms"] for r in per),
            "prep_ms": statistics.median(r["prep_ms"] for r in per),
        })
    info = llm.engine.describe()
    report = {"model": llm.name, "path": str(llm.engine.model.path), "arch": llm.engine.arch, "device": info["device"],
              "cuda_graph": info["cuda_graph"], "context": llm.context, "max_tokens": args.max_tokens,
              "repeats": args.repeats, "turns": rows}
    llm.close()
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{report['model']} on {report['arch']} ({report['device']}{', CUDA graph' if report['cuda_graph'] else ''})"
          f", context {report['context']}, {args.max_tokens} tokens a reply, median of {args.repeats}")
    print(f"{'turn':>4} {'prompt':>7} {'reused':>7} {'TTFT reuse':>11} {'TTFT cold':>10} {'speed-up':>9} {'prep':>7}")
    for r in rows:
        speedup = r["ttft_cold_ms"] / r["ttft_reuse_ms"] if r["ttft_reuse_ms"] else 0.0
        print(f"{r['turn']:>4} {r['prompt_tokens']:>7} {r['reused_tokens']:>7} {r['ttft_reuse_ms']:>8.1f} ms "
              f"{r['ttft_cold_ms']:>7.1f} ms {speedup:>8.1f}x {r['prep_ms']:>4.1f} ms")
    return 0


def fitting(llm: Any, turns: list[str], max_tokens: int) -> list[str]:
    """The turns whose prompt, with the replies before, leaves room for a reply in the context."""
    messages = [{"role": "system", "content": SYSTEM}]
    for i, text in enumerate(turns):
        messages.append({"role": "user", "content": text})
        n = len(llm.prompt_tokens(messages))
        if n + max_tokens > llm.context:
            print(f"turn {i + 1} and later do not fit the context of {llm.context} tokens ({n} prompt tokens + "
                  f"{max_tokens}): {i} turns", file=sys.stderr)
            return turns[:i]
        reply = llm.generate(messages, max_tokens)
        messages.append({"role": "assistant", "content": reply})
    return turns


def conversation(llm: Any, turns: list[str], max_tokens: int) -> list[dict[str, Any]]:
    """One run of the chat from an empty cache; per turn the reuse and cold TTFTs."""
    messages = [{"role": "system", "content": SYSTEM}]
    out = []
    llm.engine.kv.reset()
    replies = []
    for text in turns:
        messages.append({"role": "user", "content": text})
        t0 = time.perf_counter()
        stream = llm.start(messages, max_tokens, temperature=0.0)
        prep = time.perf_counter() - t0
        reply = stream.text()
        c = stream.completion
        replies.append(c)
        out.append({"prompt_tokens": c.prompt_tokens, "reused_tokens": c.reused_tokens, "reply_tokens": len(c.tokens),
                    "ttft_reuse_ms": (prep + c.time_to_first_token_s) * 1e3, "prep_ms": prep * 1e3})
        messages.append({"role": "assistant", "content": reply})
    # Cold: each turn's prompt again, from an empty cache (same greedy history).
    history = [{"role": "system", "content": SYSTEM}]
    for i, text in enumerate(turns):
        history.append({"role": "user", "content": text})
        llm.engine.kv.reset()
        t0 = time.perf_counter()
        stream = llm.start(history, 1, temperature=0.0)
        prep = time.perf_counter() - t0
        stream.text()
        assert stream.completion.reused_tokens == 0
        out[i]["ttft_cold_ms"] = (prep + stream.completion.time_to_first_token_s) * 1e3
        history.append({"role": "assistant", "content": replies[i].text})
    return out


if __name__ == "__main__":
    sys.exit(main())
