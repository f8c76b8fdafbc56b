"""SparkInfer: batch-1 LLM/MoE inference compiled with Apache TVM.

    import sparkinfer
    llm = sparkinfer.load()          # or sparkinfer.load("model.gguf", arch="cpu", context=4096)
    print(llm.generate("Hello", max_tokens=32))

Importing the package is light: TVM, numpy and the tokenizer load with the first model
(`sparkinfer.api`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from pathlib import Path

    from sparkinfer.api import LLM, Completion, TextStream

_LAZY = {"LLM", "Completion", "TextStream"}


def load(model: str | Path | None = None, arch: str | None = None, context: int | None = None,
         **engine_options: Any) -> LLM:
    """Load a GGUF model (None: the one shipped in the package); see `sparkinfer.api.load`."""
    from sparkinfer.api import load as _load

    return _load(model, arch=arch, context=context, **engine_options)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from sparkinfer import api

        return getattr(api, name)
    raise AttributeError(f"module 'sparkinfer' has no attribute {name!r}")


__all__ = ["LLM", "Completion", "TextStream", "__version__", "load"]


def __dir__() -> list[str]:
    """The public names only (not the typing helpers this module imports)."""
    return sorted(__all__)
