"""The build pipeline: targets per arch, AOT fatbins, compiled modules and their manifests.

`compile_model` and `find_compiled` are imported lazily: `sparkinfer.compiler.manifest`
(and `find_compiled`) need no TVM, the pipeline needs the full TVM compiler.
"""

from typing import Any

__all__ = ["compile_model", "find_compiled"]


def __getattr__(name: str) -> Any:
    if name == "compile_model":
        from sparkinfer.compiler.pipeline import compile_model

        return compile_model
    if name == "find_compiled":
        from sparkinfer.compiler.manifest import find_compiled

        return find_compiled
    raise AttributeError(f"module 'sparkinfer.compiler' has no attribute {name!r}")
