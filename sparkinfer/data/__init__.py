"""Package data: the small trained model `sparkinfer run` uses when given none, its F16
original (the accuracy reference), and a held-out text to score them on.

- `default.gguf`: a Qwen3-MoE trained on the Python standard library (4 layers, hidden 256,
  16 experts top-4, vocabulary 4096, context 1024; 16.0 M parameters), Q4_K_M, 9.6 MiB. Its
  greedy text reads as Python.
- `default-f16.gguf`: the same weights in F16 (30.7 MiB), exactly as trained (the checkpoint
  was saved in float16): the reference `sparkinfer accuracy` scores the Q4_K_M file against.
- `heldout-genericpath.txt`: CPython 3.11.7's `Lib/genericpath.py`, a file of the corpus's
  held-out split (never trained on), 1422 tokens: the accuracy gate's default text.
- `LICENSE-PSF.txt`: the licence of that text and of the training corpus.
- `default_training_report.json`, `default_export_check.json`: the training run's report and
  the export check of the two GGUF files, as the training scripts wrote them.
- `schedules/<arch>.json`: the schedule knobs each kernel gets on an arch, tuned or transferred
  (sparkinfer/schedule/schedules.py reads them; `sparkinfer compile` applies them).

Provenance (training and export commands, corpus, measured losses and gate numbers):
`README.md` beside this file.
"""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent


def default_model_path() -> Path:
    """The embedded default model: the trained stdlib Qwen3-MoE at Q4_K_M."""
    return DATA_DIR / "default.gguf"


def default_reference_path() -> Path:
    """The default model's F16 original, the reference of the accuracy gate."""
    return DATA_DIR / "default-f16.gguf"


def default_text_path() -> Path:
    """Held-out text (PSF-licensed stdlib source the model never saw) for the accuracy gate."""
    return DATA_DIR / "heldout-genericpath.txt"
