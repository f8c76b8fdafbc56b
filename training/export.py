"""Export a training checkpoint (``training/train.py``) to GGUF, and check the export.

Goes through SparkInfer's float-weights writer (``sparkinfer.gguf_file.write_model``), so
the files carry exactly the layout, metadata and K-quant blocks the runtime reads.

Name mapping (HF ``Qwen3MoeForCausalLM`` -> GGUF, shapes in numpy order, H hidden,
E experts, I expert width, q = heads x head_dim, kv = kv_heads x head_dim):

  model.embed_tokens.weight                  [V, H]      token_embd.weight
  model.layers.N.input_layernorm.weight      [H]         blk.N.attn_norm.weight
  model.layers.N.self_attn.q_proj.weight     [q, H]      blk.N.attn_q.weight
  model.layers.N.self_attn.k_proj.weight     [kv, H]     blk.N.attn_k.weight
  model.layers.N.self_attn.v_proj.weight     [kv, H]     blk.N.attn_v.weight
  model.layers.N.self_attn.o_proj.weight     [H, q]      blk.N.attn_output.weight
  model.layers.N.self_attn.q_norm.weight     [hd]        blk.N.attn_q_norm.weight
  model.layers.N.self_attn.k_norm.weight     [hd]        blk.N.attn_k_norm.weight
  model.layers.N.post_attention_layernorm    [H]         blk.N.ffn_norm.weight
  model.layers.N.mlp.gate.weight             [E, H]      blk.N.ffn_gate_inp.weight (router, F32)
  model.layers.N.mlp.experts.gate_up_proj    [E, 2I, H]  rows [:I] -> blk.N.ffn_gate_exps.weight [E, I, H]
                                                         rows [I:] -> blk.N.ffn_up_exps.weight   [E, I, H]
  model.layers.N.mlp.experts.down_proj       [E, H, I]   blk.N.ffn_down_exps.weight [E, H, I]
  model.norm.weight                          [H]         output_norm.weight
  lm_head.weight                             [V, H]      output.weight

transformers 5.x keeps the experts fused in memory (``gate_up_proj``: gate first, then up,
as its forward's ``chunk(2)`` reads them); the per-expert layout of older checkpoints
(``mlp.experts.K.{gate,up,down}_proj.weight``) is accepted too.

RoPE: Q and K are NOT permuted. Qwen3 uses NEOX RoPE (rotate halves) in both transformers
and llama.cpp, so llama.cpp's convert_hf_to_gguf copies q_proj / k_proj as they are (the
interleave permutation is only for LLaMA-style models). ``check`` verifies it twice: HF
loading the GGUF agrees with the checkpoint, and SparkInfer's numpy reference forward
(written from llama.cpp's qwen3moe graph, NEOX RoPE) agrees with the checkpoint too.

    python -m training.export --checkpoint training/runs/demo/checkpoint --out training/runs/demo/gguf --check
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

DEFAULT_NAME = "sparkinfer-demo-qwen3moe-stdlib"
FILE_TYPES = ("f16", "q4_k_m")
FILE_SUFFIX = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}

_PER_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
}
_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


def model_config(hf_config, vocab_size: int | None = None):
    """``sparkinfer.gguf_file.ModelConfig`` of a ``Qwen3MoeConfig``; refuses what qwen3moe
    GGUF cannot express (shared experts, dense layers, biases, tied embeddings, unnormalised top-k)."""
    from sparkinfer.gguf_file import ModelConfig

    c = hf_config
    problems = []
    if getattr(c, "mlp_only_layers", []):
        problems.append(f"mlp_only_layers={c.mlp_only_layers}")
    if getattr(c, "decoder_sparse_step", 1) != 1:
        problems.append(f"decoder_sparse_step={c.decoder_sparse_step}")
    if getattr(c, "attention_bias", False):
        problems.append("attention_bias=True")
    if not getattr(c, "norm_topk_prob", True):
        problems.append("norm_topk_prob=False")
    if getattr(c, "tie_word_embeddings", False):
        problems.append("tie_word_embeddings=True")
    if getattr(c, "shared_expert_intermediate_size", 0):
        problems.append("a shared expert")
    if problems:
        raise ValueError("checkpoint does not fit qwen3moe GGUF: " + ", ".join(problems))
    rope = getattr(c, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {rope} is not supported")
    return ModelConfig(
        arch="qwen3moe",
        n_layers=c.num_hidden_layers,
        hidden=c.hidden_size,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        vocab_size=vocab_size or c.vocab_size,
        context_length=c.max_position_embeddings,
        rms_eps=c.rms_norm_eps,
        rope_theta=float(rope_theta),
        n_experts=c.num_experts,
        n_experts_used=c.num_experts_per_tok,
        expert_ffn=c.moe_intermediate_size,
    )


def _np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu", torch.float32).numpy()
    return np.asarray(t, dtype=np.float32)


def gguf_weights(state_dict: Mapping[str, "torch.Tensor"], n_layers: int, n_experts: int, expert_ffn: int) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array (numpy order) from an HF Qwen3-MoE state dict.
    Every state-dict entry must be used (rotary buffers aside): an unknown name is an error."""
    out: dict[str, np.ndarray] = {}
    per_expert: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    unused = []
    for name, value in state_dict.items():
        if name in _GLOBAL:
            out[_GLOBAL[name]] = _np(value)
            continue
        m = _LAYER_RE.match(name)
        if not m:
            if "rotary_emb" not in name:
                unused.append(name)
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest in _PER_LAYER:
            out[f"blk.{i}.{_PER_LAYER[rest]}"] = _np(value)
        elif rest == "mlp.experts.gate_up_proj":
            w = _np(value)  # [E, 2I, H]: gate rows first, then up (Qwen3MoeExperts.forward: chunk(2))
            if w.shape[:2] != (n_experts, 2 * expert_ffn):
                raise ValueError(f"{name} has shape {w.shape}, expected [{n_experts}, {2 * expert_ffn}, H]")
            out[f"blk.{i}.ffn_gate_exps.weight"] = np.ascontiguousarray(w[:, :expert_ffn, :])
            out[f"blk.{i}.ffn_up_exps.weight"] = np.ascontiguousarray(w[:, expert_ffn:, :])
        elif rest == "mlp.experts.down_proj":
            out[f"blk.{i}.ffn_down_exps.weight"] = _np(value)  # [E, H, I]
        elif (e := _EXPERT_RE.match(rest)) is not None:
            per_expert.setdefault((i, e.group(2)), {})[int(e.group(1))] = _np(value)
        elif "rotary_emb" not in rest:
            unused.append(name)
    for (i, which), experts in per_expert.items():
        if sorted(experts) != list(range(n_experts)):
            raise ValueError(f"layer {i}: {which}_proj of experts {sorted(experts)}, expected 0..{n_experts - 1}")
        out[f"blk.{i}.ffn_{which}_exps.weight"] = np.stack([experts[k] for k in range(n_experts)])
    if unused:
        raise ValueError(f"state dict entries with no GGUF tensor: {unused[:8]}")
    for i in range(n_layers):
        if f"blk.{i}.attn_q.weight" not in out:
            raise ValueError(f"no weights for layer {i}")
    return out


def load_checkpoint(ckpt_dir: Path | str):
    """(HF model in float32, eval mode; vocab_spec dict) from a checkpoint folder."""
    from transformers import Qwen3MoeForCausalLM

    ckpt_dir = Path(ckpt_dir)
    model = Qwen3MoeForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32)
    model.eval()
    spec = json.loads((ckpt_dir / "vocab_spec.json").read_text(encoding="utf-8"))
    return model, spec


def export_model(model, spec: dict, out_dir: Path | str, file_types=FILE_TYPES, name: str = DEFAULT_NAME) -> dict[str, Path]:
    """Write one GGUF per file type into ``out_dir``; returns file type -> path."""
    from sparkinfer.gguf_file import write_model
    from training.train_tokenizer import to_vocab_spec

    cfg = model_config(model.config, len(spec["tokens"]))
    if model.config.vocab_size != len(spec["tokens"]):
        raise ValueError(f"model vocab {model.config.vocab_size} != tokenizer vocab {len(spec['tokens'])}")
    weights = gguf_weights(model.state_dict(), cfg.n_layers, cfg.n_experts, cfg.expert_ffn)
    vocab = to_vocab_spec(spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for ft in file_types:
        path = out_dir / f"{name}-{FILE_SUFFIX[ft]}.gguf"
        write_model(path, cfg, weights, vocab, ft, name=name)
        paths[ft] = path
    return paths


# ---------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------


def load_gguf_in_transformers(path: Path | str):
    """transformers' own GGUF loader (dequantizes to float32)."""
    from transformers import AutoModelForCausalLM

    from sparkinfer.gguf_file import GGUFModel, transformers_overrides

    path = Path(path)
    cfg = GGUFModel.open(path).config
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, **transformers_overrides(cfg)
    )
    model.eval()
    return model


@torch.no_grad()
def logits_of(model, windows: torch.Tensor) -> torch.Tensor:
    return model(input_ids=windows).logits.float()


def compare_logits(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """max |Δ| of logits, top-1 agreement and mean KL(ref || got) in nats."""
    ref = ref.reshape(-1, ref.shape[-1]).double()
    got = got.reshape(-1, got.shape[-1]).double()
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return {
        "max_abs_diff": (ref - got).abs().max().item(),
        "logit_range": (ref.max() - ref.min()).item(),
        "top1_agreement": (ref.argmax(-1) == got.argmax(-1)).double().mean().item(),
        "mean_kl": kl.mean().item(),
        "max_kl": kl.max().item(),
        "n_positions": ref.shape[0],
    }


def rounded_to_file_types(model, cfg, file_type: str):
    """A copy of ``model`` whose weights hold what a float file of ``file_type`` stores
    (F16-rounded where the type map says F16), for an exact comparison."""
    import copy

    from sparkinfer.gguf_file import type_map
    from gguf import GGMLQuantizationType as T

    types = type_map(cfg, file_type)
    f16_names = {n for n, t in types.items() if t == T.F16}
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if name in _GLOBAL:
                targets = [_GLOBAL[name]]
            else:
                m = _LAYER_RE.match(name)
                rest = m.group(2) if m else ""
                i = m.group(1) if m else ""
                if rest in _PER_LAYER:
                    targets = [f"blk.{i}.{_PER_LAYER[rest]}"]
                elif rest == "mlp.experts.gate_up_proj":
                    targets = [f"blk.{i}.ffn_gate_exps.weight", f"blk.{i}.ffn_up_exps.weight"]
                elif rest == "mlp.experts.down_proj":
                    targets = [f"blk.{i}.ffn_down_exps.weight"]
                else:
                    raise ValueError(f"no GGUF tensor for {name}")
            if all(t in f16_names for t in targets):
                p.copy_(p.half().float())
            elif any(t in f16_names for t in targets):
                raise ValueError(f"{name} maps to tensors of different types")
    return twin


def heldout_windows(spec: dict, n_windows: int, seq_len: int, corpus_tar=None) -> torch.Tensor:
    """``[n, seq_len]`` token windows from the held-out corpus files (falls back to this
    module's own source when no corpus tarball is present)."""
    from training.corpus import CorpusError, load_corpus
    from training.train_tokenizer import ENDOFTEXT

    try:
        texts = [d.text for d in load_corpus(corpus_tar).heldout]
    except (CorpusError, FileNotFoundError):
        texts = [Path(__file__).read_text(encoding="utf-8")]
    from sparkinfer.tokenizer import Tokenizer

    from training.train_tokenizer import to_vocab_spec

    tok = Tokenizer.from_vocab(to_vocab_spec(spec))
    eot = spec["tokens"].index(ENDOFTEXT)
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t) + [eot]
        if len(ids) >= n_windows * seq_len:
            break
    n = min(n_windows, len(ids) // seq_len)
    if n == 0:
        raise ValueError("not enough held-out text for one window")
    return torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)


# Tolerances (float32 everywhere; logits of the demo model span ~30-40 nats):
# - HF from the F16 file vs the checkpoint with the same weights rounded to f16: only summation
#   order differs, so the logits agree to float32 round-off.
STRICT_MAX_ABS = 2e-3
# - HF from the F16 file vs the float32 checkpoint: f16 rounding of the weights (rel 2^-11).
F16_MIN_TOP1 = 0.99
F16_MAX_MEAN_KL = 1e-3
# - SparkInfer's numpy reference on the F16 file vs the f16-rounded checkpoint (independent
#   implementation, its own RoPE): a Q/K permutation error would show as O(1) differences.
REFERENCE_MAX_ABS = 2e-2
# - Q4_K_M (any quantized file) vs the checkpoint, mean KL in nats: a trained demo model shows
#   ~0.02, an untrained one ~1e-4; a broken quantizer / type map shows as a collapse (> 1).
#   Top-1 agreement is reported but not judged: near-uniform (untrained) logits tie everywhere.
QUANTIZED_MAX_MEAN_KL = 0.05


def check(model, spec: dict, paths: Mapping[str, Path], n_windows: int = 4, seq_len: int = 256,
          corpus_tar=None, reference_tokens: int = 64,
          quantized_max_mean_kl: float | None = QUANTIZED_MAX_MEAN_KL) -> dict:
    """Compare the exported files against the checkpoint ``model`` on held-out text. Returns a
    report dict with ``ok``; see the tolerance constants above. ``quantized_max_mean_kl=None``
    only reports on quantized files (random weights amplify quantization noise past any bound)."""
    cfg = model_config(model.config, len(spec["tokens"]))
    windows = heldout_windows(spec, n_windows, seq_len, corpus_tar)
    ref = logits_of(model, windows)
    report: dict = {"windows": list(windows.shape), "checkpoint_loss": _next_token_loss(ref, windows), "tolerances": {
        "strict_max_abs": STRICT_MAX_ABS, "f16_min_top1": F16_MIN_TOP1, "f16_max_mean_kl": F16_MAX_MEAN_KL,
        "reference_max_abs": REFERENCE_MAX_ABS, "quantized_max_mean_kl": quantized_max_mean_kl}}
    ok = True
    for ft, path in paths.items():
        hf = load_gguf_in_transformers(path)
        got = logits_of(hf, windows)
        entry = {"file": str(path), "loss": _next_token_loss(got, windows), "vs_checkpoint": compare_logits(ref, got)}
        if ft in ("f16", "f32"):
            twin = rounded_to_file_types(model, cfg, ft)
            twin_logits = logits_of(twin, windows)
            entry["vs_rounded_checkpoint"] = compare_logits(twin_logits, got)
            ok &= entry["vs_rounded_checkpoint"]["max_abs_diff"] <= STRICT_MAX_ABS
            ok &= entry["vs_checkpoint"]["top1_agreement"] >= F16_MIN_TOP1
            ok &= entry["vs_checkpoint"]["mean_kl"] <= F16_MAX_MEAN_KL
            ref_entry = _reference_check(path, windows[0, :reference_tokens], twin_logits[0, :reference_tokens])
            if ref_entry is not None:
                entry["sparkinfer_reference_vs_rounded_checkpoint"] = ref_entry
                ok &= ref_entry["max_abs_diff"] <= REFERENCE_MAX_ABS
        elif quantized_max_mean_kl is not None:
            ok &= entry["vs_checkpoint"]["mean_kl"] <= quantized_max_mean_kl
        report[ft] = entry
    report["ok"] = bool(ok)
    return report


def _next_token_loss(logits: torch.Tensor, windows: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) of ``logits`` on the windows they were computed on."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), windows[:, 1:].reshape(-1)
    ).item()


def _reference_check(path: Path, tokens: torch.Tensor, want: torch.Tensor) -> dict | None:
    try:
        from sparkinfer.gguf_file import GGUFModel
        from sparkinfer.reference import ReferenceModel
    except ImportError:
        return None
    g = GGUFModel.open(path)
    logits = ReferenceModel(g.config, g).prefill([int(t) for t in tokens])
    return compare_logits(want, torch.from_numpy(np.asarray(logits)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder written by training.train")
    ap.add_argument("--out", type=Path, required=True, help="folder for the GGUF files")
    ap.add_argument("--name", default=DEFAULT_NAME)
    ap.add_argument("--types", default=",".join(FILE_TYPES), help="comma list of f32, f16, q8_0, q4_k_m")
    ap.add_argument("--check", action="store_true", help="check the files against the checkpoint")
    ap.add_argument("--check-windows", type=int, default=4)
    ap.add_argument("--check-seq-len", type=int, default=256)
    ap.add_argument("--corpus", type=Path, default=None, help="corpus tarball for held-out text")
    args = ap.parse_args(argv)

    model, spec = load_checkpoint(args.checkpoint)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    paths = export_model(model, spec, args.out, types, args.name)
    for ft, p in paths.items():
        print(f"{ft}: {p} ({p.stat().st_size / 2**20:.2f} MiB)")
    if args.check:
        report = check(model, spec, paths, args.check_windows, args.check_seq_len, args.corpus)
        (args.out / "export_check.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(json.dumps(report, indent=1))
        if not report["ok"]:
            print("EXPORT CHECK FAILED", file=sys.stderr)
            return 1
        print("export check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
