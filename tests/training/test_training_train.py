"""train.py end to end on a tiny fake corpus (two steps of a tiny model), and its schedule."""

import json
import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from training import corpus as C  # noqa: E402
from training import train as TR  # noqa: E402


def test_lr_schedule():
    lrs = [TR.lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert max(lrs) == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert TR.lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)


def _fake_corpus(tmp_path):
    root = tmp_path / "lib"
    for i in range(40):
        p = root / f"m{i:02d}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"import os\n\n\ndef f{i}(x):\n    return x + {i}  # add\n\n\nclass C{i}:\n    pass\n" * 3)
    man = C.build_manifest(root, python_version="3.99.0")
    C.write_manifest(man, tmp_path / "manifest.json")
    return tmp_path / "manifest.json", C.pack(man, root, tmp_path / "corpus")


def test_train_tiny_end_to_end(tmp_path):
    manifest, tar = _fake_corpus(tmp_path)
    out = tmp_path / "run"
    args = ["--out", str(out), "--manifest", str(manifest), "--corpus", str(tar), "--vocab-size", "300",
            "--layers", "1", "--experts", "4", "--experts-used", "2", "--context", "64", "--seq-len", "32",
            "--batch-size", "2", "--steps", "3", "--warmup", "1", "--eval-every", "2", "--log-every", "1",
            "--sample-tokens", "4", "--save-dtype", "float16", "--pack", str(tmp_path / "packed")]
    assert TR.main(args) == 0
    report = json.loads((out / "training_report.json").read_text())
    assert report["steps"] == 3 and report["tokens_seen"] == 3 * 2 * 32
    assert report["final_heldout_ppl"] == pytest.approx(math.exp(report["final_heldout_loss"]))
    assert report["seed"] == 1234 and report["device"] == "cpu"
    assert set(report["samples"]) == set(TR.PROMPTS)
    assert report["versions"]["torch"] and report["versions"]["transformers"]
    ckpt = out / "checkpoint"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab_spec.json", "tokenizer_config.json"):
        assert (ckpt / name).is_file(), name
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe"
    assert cfg.get("num_experts", cfg.get("num_local_experts")) == 4
    assert cfg["tie_word_embeddings"] is False and cfg["norm_topk_prob"] is True
    assert sorted(p.name for p in (tmp_path / "packed").iterdir()) == ["run.tar.part00", "training_report.json"]
