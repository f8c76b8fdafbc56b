"""`sparkinfer accuracy`: the accuracy gate from the command line (the parser is registered by
`sparkinfer.cli._add_accuracy`; this module holds the arguments and the handler)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparkinfer.accuracy.gate import (
    DEFAULT_GREEDY_TOKENS,
    DEFAULT_PROMPT_TOKENS,
    DEFAULT_TOKENS,
    GATE_FAILED_EXIT,
    Thresholds,
)

_T = Thresholds()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, nargs="?",
                   help="the .gguf file to check (default: the shipped model, against its shipped F16 original)")
    p.add_argument("--text", type=Path, help="UTF-8 text to score (default: the shipped held-out stdlib file)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                   help=f"tokens of the text scored teacher-forced (default {DEFAULT_TOKENS})")
    p.add_argument("--ref", default="numpy", metavar="numpy|FILE",
                   help="the reference: 'numpy' (the numpy float32 forward, of --ref-model) or a file saved "
                        "with --save-ref (default numpy)")
    p.add_argument("--ref-model", type=Path, metavar="REF.gguf",
                   help="the file whose numpy forward is the reference, e.g. the F16 original (default: MODEL)")
    p.add_argument("--save-ref", type=Path, metavar="FILE", help="save the reference (tokens, log-probs, greedy "
                   "tokens, model hash) to reuse with --ref FILE")
    p.add_argument("--ref-only", action="store_true", help="only make the reference (with --save-ref); no engine")
    p.add_argument("--json", metavar="OUT", help="write the full report as JSON to OUT ('-': stdout, no table)")
    p.add_argument("--arch", help="sm_90, sm_120, sm_121 or cpu (default: the GPU found, else cpu)")
    p.add_argument("--module", type=Path, help="a compiled module directory to use")
    p.add_argument("--prefill-chunk", type=int, metavar="T",
                   help="score and prefill through the module's T-token step only, the last chunk padded "
                        "(as llama.cpp's --ubatch-size; default: the engine's choice among its steps)")
    p.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS,
                   help=f"greedy check: prompt = the text's first P tokens (default {DEFAULT_PROMPT_TOKENS})")
    p.add_argument("--greedy", type=int, default=DEFAULT_GREEDY_TOKENS,
                   help=f"greedy check: tokens generated (default {DEFAULT_GREEDY_TOKENS}; 0: no greedy check)")
    g = p.add_argument_group("thresholds (fail, exit 3, when over one)")
    g.add_argument("--max-kl", type=float, default=_T.max_mean_kl, help=f"max mean KL(ref||ours), nats "
                   f"(default {_T.max_mean_kl})")
    g.add_argument("--min-top1", type=float, default=_T.min_top1,
                   help=f"min top-1 agreement, a fraction (default {_T.min_top1})")
    g.add_argument("--max-ppl-ratio", type=float, default=_T.max_ppl_ratio,
                   help=f"max perplexity ours / reference (default {_T.max_ppl_ratio})")
    g.add_argument("--min-greedy-match", type=float, default=_T.min_greedy_match,
                   help=f"min fraction of the reference's greedy tokens our argmax picks along them "
                        f"(default {_T.min_greedy_match})")
    g.add_argument("--min-greedy-prefix", type=float, default=_T.min_greedy_prefix,
                   help="min fraction of free-running greedy tokens equal to the reference's before the first "
                        "difference (default 0: reported only; 1 for a model against its own numpy forward)")


def run(args: argparse.Namespace) -> int:
    from sparkinfer.accuracy.gate import evaluate, write_json
    from sparkinfer.data import default_model_path, default_reference_path
    from sparkinfer.errors import SparkInferError

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.ref_only and args.save_ref is None:
        raise SparkInferError("--ref-only makes a reference to save: give --save-ref FILE")
    model, ref_model = args.model, args.ref_model
    if model is None:
        model = default_model_path()
        if args.ref == "numpy" and ref_model is None:
            ref_model = default_reference_path()
    thresholds = Thresholds(max_mean_kl=args.max_kl, min_top1=args.min_top1, max_ppl_ratio=args.max_ppl_ratio,
                            min_greedy_match=args.min_greedy_match, min_greedy_prefix=args.min_greedy_prefix)
    result = evaluate(model, text=args.text, n_tokens=args.tokens, ref=args.ref, ref_model=ref_model,
                      save_ref=args.save_ref, arch=args.arch, module_dir=args.module, thresholds=thresholds,
                      prompt_tokens=args.prompt_tokens, greedy_tokens=args.greedy, reference_only=args.ref_only,
                      prefill_chunk=args.prefill_chunk, log=log)
    if args.ref_only:
        return 0
    report = result
    if args.json == "-":
        print(json.dumps(report.to_json()))
    else:
        print(report.table())
        if args.json:
            write_json(report, args.json)
    if not report.ok:
        log(report.failure_message())
        return GATE_FAILED_EXIT
    return 0


__all__ = ["add_arguments", "run"]
