"""Train SparkInfer's demo model: a small Qwen3-MoE on the Python standard library.

Reads the corpus tarball (``training/.corpus/``, see ``training/corpus.py``), trains (or
reuses) the byte-level BPE tokenizer, then trains ``transformers.Qwen3MoeForCausalLM``
with AdamW and a warmup + cosine schedule, evaluates held-out loss / perplexity, keeps the
best checkpoint by held-out loss, prints greedy samples and writes into ``--out``:

  checkpoint/             HF folder: config.json, model.safetensors, tokenizer.json,
                          tokenizer_config.json, vocab_spec.json (what export.py reads)
  tokenizer/              the tokenizer files alone
  train_log.jsonl         one line per logged step / evaluation
  training_report.json    steps, tokens, wall time, device, losses, versions, seed, samples

    python -m training.train --out training/runs/demo --device cuda --save-dtype float16   # ~1.5 min on an H100
    python -m training.train --out training/runs/demo --device cuda --minutes 5            # fill a time budget
    python -m training.train --out training/runs/smoke --steps 20 --vocab-size 512 --batch-size 4 --seq-len 128

The architecture defaults keep every matmul's input dimension a multiple of 256 (K-quant
blocks): hidden 256, 8 query heads x 64 = 512, expert width 256.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training import train_tokenizer as ttok
from training.corpus import MANIFEST_PATH, load_corpus, load_manifest

# Measured (H200, seed 1234, 32 x 1024 tokens a step, the corpus is ~2.3 M tokens): with residual
# dropout 0.1 the held-out loss bottoms out at the end of a 1000-step cosine (2.78); 2000 steps
# overfit (best 2.85, at step 800), no dropout gives 3.00, dropout 0.2 over 1200 steps 2.87.
DEFAULT_STEPS = 1000

PROMPTS = ("def ", "import os\n", "class ", "    def __init__(self")


@dataclasses.dataclass(frozen=True)
class Arch:
    """Model shape (what the GGUF will describe)."""

    n_layers: int = 4
    hidden: int = 256
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int = 64
    n_experts: int = 16
    n_experts_used: int = 4
    expert_ffn: int = 256
    context_length: int = 1024
    rope_theta: float = 1e6
    rms_eps: float = 1e-6


def hf_config(arch: Arch, vocab_size: int, eos_id: int, aux_coef: float = 0.01):
    """The ``transformers.Qwen3MoeConfig`` of the demo model: every layer sparse, no shared
    expert, routing weights renormalised over the top-k (as qwen3moe in llama.cpp)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=arch.hidden,
        intermediate_size=arch.expert_ffn * arch.n_experts_used,  # dense-MLP width; unused (no dense layers)
        num_hidden_layers=arch.n_layers,
        num_attention_heads=arch.n_heads,
        num_key_value_heads=arch.n_kv_heads,
        head_dim=arch.head_dim,
        hidden_act="silu",
        max_position_embeddings=arch.context_length,
        initializer_range=0.02,
        rms_norm_eps=arch.rms_eps,
        use_cache=True,
        tie_word_embeddings=False,
        rope_theta=arch.rope_theta,
        attention_bias=False,
        attention_dropout=0.0,
        decoder_sparse_step=1,
        moe_intermediate_size=arch.expert_ffn,
        num_experts_per_tok=arch.n_experts_used,
        num_experts=arch.n_experts,
        norm_topk_prob=True,
        output_router_logits=False,
        router_aux_loss_coef=aux_coef,
        mlp_only_layers=[],
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def tokenize_docs(tok, docs, eot_id: int) -> np.ndarray:
    """One token stream: each document's ids followed by <|endoftext|>."""
    parts = []
    for enc in tok.encode_batch([d.text for d in docs], add_special_tokens=False):
        parts.append(np.asarray(enc.ids, dtype=np.int32))
        parts.append(np.asarray([eot_id], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine down to ``min_ratio * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def add_residual_dropout(model, p: float) -> None:
    """Dropout on the output of every attention and MoE block (before the residual add), in
    training mode only: transformers' Qwen3-MoE has no hidden dropout of its own, and the corpus
    is small enough for the model to memorise it. Inference (and so the export) is unchanged."""
    if p <= 0:
        return

    def hook(module, args, output):
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, True), *output[1:])
        return F.dropout(output, p, True)

    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq_len: int, batch_size: int, max_tokens: int, device, amp: bool):
    """Mean next-token cross-entropy (nats) over non-overlapping windows of ``stream``,
    at most ``max_tokens`` predicted tokens (0: all). Returns (loss, n_predicted_tokens)."""
    model.eval()
    n_windows = (len(stream) - 1) // seq_len
    if max_tokens:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    total, count = 0.0, 0
    for b0 in range(0, n_windows, batch_size):
        idx = torch.arange(b0, min(n_windows, b0 + batch_size), device=stream.device)[:, None] * seq_len
        win = stream[idx + torch.arange(seq_len + 1, device=stream.device)[None, :]].to(device)
        with autocast(device, amp):
            logits = model(input_ids=win[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += win[:, 1:].numel()
    model.train()
    return total / max(1, count), count


@torch.no_grad()
def greedy(model, tok, prompt: str, n_new: int, device, eot_id: int) -> str:
    model.eval()
    ids = tok.encode(prompt, add_special_tokens=False).ids
    x = torch.tensor([ids], device=device)
    out = model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, do_sample=False,
        eos_token_id=eot_id, pad_token_id=eot_id,
    )
    model.train()
    return tok.decode(out[0].tolist(), skip_special_tokens=False)


PART_BYTES = 15 * 2**20


def pack_run(out: Path, dest: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """``out``'s checkpoint/, training_report.json and train_log.jsonl as one tar cut into
    ``dest/run.tar.part00``, ``part01``, ... (rejoin: ``cat run.tar.part* > run.tar``), plus a
    copy of training_report.json."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("checkpoint", "training_report.json", "train_log.jsonl"):
            if (out / name).exists():
                tar.add(out / name, arcname=name)
    data = buf.getvalue()
    dest.mkdir(parents=True, exist_ok=True)
    parts = []
    for k, i in enumerate(range(0, len(data), part_bytes)):
        p = dest / f"run.tar.part{k:02d}"
        p.write_bytes(data[i : i + part_bytes])
        parts.append(p)
    (dest / "training_report.json").write_bytes((out / "training_report.json").read_bytes())
    return parts


def versions() -> dict:
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
    }


def parse_args(argv=None):
    a = Arch()
    ap = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--manifest", type=Path, default=MANIFEST_PATH)
    ap.add_argument("--corpus", type=Path, default=None, help="corpus tarball (default training/.corpus/<archive>)")
    ap.add_argument("--tokenizer", type=Path, default=None, help="reuse a tokenizer folder instead of training one")
    ap.add_argument("--vocab-size", type=int, default=ttok.DEFAULT_VOCAB_SIZE)
    # architecture
    ap.add_argument("--layers", type=int, default=a.n_layers)
    ap.add_argument("--hidden", type=int, default=a.hidden)
    ap.add_argument("--heads", type=int, default=a.n_heads)
    ap.add_argument("--kv-heads", type=int, default=a.n_kv_heads)
    ap.add_argument("--head-dim", type=int, default=a.head_dim)
    ap.add_argument("--experts", type=int, default=a.n_experts)
    ap.add_argument("--experts-used", type=int, default=a.n_experts_used)
    ap.add_argument("--expert-ffn", type=int, default=a.expert_ffn)
    ap.add_argument("--context", type=int, default=a.context_length, help="context_length written to the GGUF")
    # optimisation
    ap.add_argument("--seq-len", type=int, default=None, help="training window (default: --context)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None,
                    help="optimizer steps (default 1000, or set from --minutes); the cosine schedule ends there")
    ap.add_argument("--minutes", type=float, default=None,
                    help="time budget: without --steps, the step count is set from the speed of the first "
                         "steps to fill it; with --steps, training also stops when the budget runs out")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--dropout", type=float, default=0.1, help="residual dropout on attention and MoE outputs")
    ap.add_argument("--aux-coef", type=float, default=0.01, help="router load-balancing loss weight")
    ap.add_argument("--no-amp", action="store_true", help="no bf16 autocast on cuda")
    ap.add_argument("--keep", choices=("best", "last"), default="best", help="checkpoint kept: best held-out or last")
    # logging / evaluation
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-tokens", type=int, default=0, help="held-out tokens per evaluation (0: all)")
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--sample-tokens", type=int, default=64)
    # output
    ap.add_argument("--save-dtype", choices=("float32", "float16"), default="float32",
                    help="checkpoint weights; float16 holds exactly what the F16 GGUF will (half the bytes)")
    ap.add_argument("--pack", type=Path, default=None,
                    help="also tar checkpoint + report + log into this folder as run.tar.partNN pieces of "
                         "at most 15 MiB (for copying back from a machine that returns small files)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = device.type == "cuda" and not args.no_amp
    seq_len = args.seq_len or args.context
    if seq_len > args.context:
        raise SystemExit(f"--seq-len {seq_len} exceeds --context {args.context}")
    seed_everything(args.seed)

    # corpus and tokenizer
    manifest = load_manifest(args.manifest)
    corpus = load_corpus(args.corpus, manifest)
    if args.tokenizer:
        tok, spec = ttok.load(args.tokenizer)
    else:
        tok = ttok.train_bpe((d.text for d in corpus.train), args.vocab_size)
        spec = ttok.save(tok, out / "tokenizer", model_max_length=args.context)
        tok, spec = ttok.load(out / "tokenizer")
    vocab_size = len(spec["tokens"])
    eot = spec["eos_id"]
    train_ids = tokenize_docs(tok, corpus.train, eot)
    held_ids = tokenize_docs(tok, corpus.heldout, eot)
    print(f"corpus: Python {manifest['python_version']} stdlib, {len(corpus.train)} train files "
          f"({len(train_ids)} tokens), {len(corpus.heldout)} held-out files ({len(held_ids)} tokens); "
          f"vocab {vocab_size}", flush=True)
    if len(train_ids) <= seq_len + 1:
        raise SystemExit("training stream shorter than one window")

    # model
    arch = Arch(args.layers, args.hidden, args.heads, args.kv_heads, args.head_dim, args.experts,
                args.experts_used, args.expert_ffn, args.context)
    from transformers import Qwen3MoeForCausalLM

    config = hf_config(arch, vocab_size, eot, args.aux_coef)
    seed_everything(args.seed)
    model = Qwen3MoeForCausalLM(config).to(device)
    add_residual_dropout(model, args.dropout)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    n_active = n_params - expert_params + expert_params * arch.n_experts_used // arch.n_experts
    print(f"model: {n_params / 1e6:.2f} M parameters ({n_active / 1e6:.2f} M active per token), "
          f"experts impl {model.config._experts_implementation}, device {device}"
          f"{' (bf16 autocast)' if amp else ''}", flush=True)

    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=device.type == "cuda")
    train_t = torch.from_numpy(train_ids.astype(np.int64)).to(device)
    held_t = torch.from_numpy(held_ids.astype(np.int64)).to(device)
    # a train-set slice as large as the held-out set, for a like-for-like train loss
    train_probe_t = train_t[: len(held_t)]
    rng = np.random.default_rng(args.seed)
    offsets = torch.arange(seq_len + 1, device=device)[None, :]

    budget_s = args.minutes * 60 if args.minutes else None
    total_steps = args.steps or (None if budget_s else DEFAULT_STEPS)
    calib_steps = 20
    log = open(out / "train_log.jsonl", "w", encoding="utf-8")
    best = {"loss": float("inf"), "step": -1, "state": None}
    history = []
    recent = []
    tokens_seen = 0
    t_train0 = time.time()
    t_calib = None
    eval_time = 0.0
    step = 0

    def run_eval(step: int) -> float:
        nonlocal eval_time
        te = time.time()
        loss, n = evaluate(model, held_t, seq_len, args.eval_batch_size, args.eval_tokens, device, amp)
        eval_time += time.time() - te
        rec = {"step": step, "heldout_loss": loss, "heldout_ppl": math.exp(loss), "heldout_tokens": n,
               "elapsed_s": round(time.time() - t_train0, 2)}
        history.append(rec)
        log.write(json.dumps({"eval": rec}) + "\n")
        log.flush()
        print(f"eval step {step}: held-out loss {loss:.4f}, ppl {math.exp(loss):.2f} ({n} tokens)", flush=True)
        if args.keep == "best" and loss < best["loss"]:
            best.update(loss=loss, step=step,
                        state={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
        return loss

    while True:
        if total_steps is not None and step >= total_steps:
            break
        if budget_s is not None and time.time() - t_train0 > budget_s:
            print(f"time budget of {args.minutes} min reached at step {step}", flush=True)
            break
        lr = lr_at(step, total_steps or 10**9, args.lr, args.warmup, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.from_numpy(rng.integers(0, len(train_ids) - seq_len - 1, size=args.batch_size)).to(device)
        win = train_t[starts[:, None] + offsets]
        with autocast(device, amp):
            outp = model(input_ids=win[:, :-1], output_router_logits=args.aux_coef > 0)
        ce = F.cross_entropy(outp.logits.float().reshape(-1, vocab_size), win[:, 1:].reshape(-1))
        aux = outp.aux_loss.float() if outp.aux_loss is not None else torch.zeros((), device=device)
        loss = ce + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        tokens_seen += win[:, 1:].numel()

        if step % args.log_every == 0 or step == 1 or step == total_steps:
            ce_v, aux_v, g_v = ce.item(), aux.item(), gnorm.item()
            recent.append(ce_v)
            el = time.time() - t_train0
            rec = {"step": step, "lr": lr, "train_loss": ce_v, "aux_loss": aux_v, "grad_norm": g_v,
                   "tokens": tokens_seen, "elapsed_s": round(el, 2)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(f"step {step}/{total_steps or '?'} loss {ce_v:.4f} aux {aux_v:.3f} lr {lr:.2e} "
                  f"gnorm {g_v:.2f} {tokens_seen / max(el, 1e-9):,.0f} tok/s {el:.0f}s", flush=True)

        if step == 5:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_calib = time.time()
        if total_steps is None and step == calib_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t_calib) / (calib_steps - 5)
            # leave ~12% of the budget for evaluations, sampling and saving
            total_steps = max(calib_steps + 1, int(0.88 * budget_s / per_step))
            print(f"{per_step * 1000:.1f} ms/step: planning {total_steps} steps for {args.minutes} min "
                  f"(rerun with --steps {total_steps} to repeat this schedule)", flush=True)
        if args.eval_every and step % args.eval_every == 0 and step != total_steps:
            run_eval(step)

    steps_done = step
    train_time = time.time() - t_train0
    final_loss = run_eval(steps_done)
    last_state = None
    if args.keep == "best" and best["state"] is not None and best["step"] != steps_done:
        last_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        model.load_state_dict(best["state"])
        print(f"keeping the checkpoint of step {best['step']} (held-out loss {best['loss']:.4f}; "
              f"last step {steps_done}: {final_loss:.4f})", flush=True)
    kept_step = best["step"] if args.keep == "best" and best["state"] is not None else steps_done
    held_loss, held_n = evaluate(model, held_t, seq_len, args.eval_batch_size, args.eval_tokens, device, amp)
    train_loss, train_n = evaluate(model, train_probe_t, seq_len, args.eval_batch_size, args.eval_tokens, device, amp)
    # bits per UTF-8 byte of held-out text: mean loss over bytes per token of the held-out stream
    held_bpb = held_loss / math.log(2) * len(held_ids) / max(1, corpus.heldout_bytes)

    # the model as the checkpoint will hold it
    f16_loss = None
    if args.save_dtype == "float16":
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
        f16_loss, _ = evaluate(model, held_t, seq_len, args.eval_batch_size, args.eval_tokens, device, amp)
        print(f"held-out loss with float16-rounded weights: {f16_loss:.4f}", flush=True)

    samples = {}  # greedy, from the weights as saved
    for p in PROMPTS:
        samples[p] = greedy(model, tok, p, args.sample_tokens, device, eot)
        print(f"--- greedy sample, prompt {p!r}:\n{samples[p]}\n---", flush=True)

    # checkpoint: HF folder + tokenizer files
    ckpt = out / "checkpoint"
    model.to("cpu").float()
    if args.save_dtype == "float16":
        model.half()
    model.save_pretrained(ckpt)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab_spec.json"):
        src = (Path(args.tokenizer) if args.tokenizer else out / "tokenizer") / name
        (ckpt / name).write_bytes(src.read_bytes())
    if last_state is not None:
        torch.save(last_state, out / "last_state_dict.pt")

    report = {
        "steps": steps_done,
        "planned_steps": total_steps,
        "kept_step": kept_step,
        "tokens_seen": tokens_seen,
        "epochs": tokens_seen / len(train_ids),
        "wall_time_s": round(time.time() - t_start, 1),
        "train_time_s": round(train_time, 1),
        "eval_time_s": round(eval_time, 1),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "bf16_autocast": amp,
        "seed": args.seed,
        "final_train_loss": train_loss,
        "final_train_ppl": math.exp(train_loss),
        "final_train_loss_tokens": train_n,
        "final_heldout_loss": held_loss,
        "final_heldout_ppl": math.exp(held_loss),
        "final_heldout_tokens": held_n,
        "heldout_bits_per_byte": held_bpb,
        "saved_dtype": args.save_dtype,
        "final_heldout_loss_saved_weights": f16_loss if f16_loss is not None else held_loss,
        "last_logged_train_batch_loss": recent[-1] if recent else None,
        "eval_history": history,
        "n_params": n_params,
        "n_active_params": n_active,
        "arch": dataclasses.asdict(arch),
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "batch_size": args.batch_size,
        "corpus": {
            "archive": manifest["archive"],
            "python_version": manifest["python_version"],
            "license": manifest["license"],
            "train_files": len(corpus.train),
            "heldout_files": len(corpus.heldout),
            "train_tokens": int(len(train_ids)),
            "heldout_tokens": int(len(held_ids)),
        },
        "versions": versions(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "samples": samples,
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    log.close()
    if args.pack:
        parts = pack_run(out, args.pack)
        print(f"packed into {len(parts)} part(s) under {args.pack}", flush=True)
    print(f"saved {ckpt} and {out / 'training_report.json'}: {steps_done} steps, {tokens_seen:,} tokens, "
          f"held-out loss {held_loss:.4f} (ppl {math.exp(held_loss):.2f}), train loss {train_loss:.4f}, "
          f"{report['wall_time_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
