"""Package data: the small model `sparkinfer run` uses when given none."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent


def default_model_path() -> Path:
    """The embedded default model (for now the `tiny` synthetic preset at Q4_K_M, random
    weights: its text is gibberish; a small trained model will replace it)."""
    return DATA_DIR / "default.gguf"
