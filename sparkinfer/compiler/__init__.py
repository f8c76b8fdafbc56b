"""The build pipeline: targets per arch, AOT fatbins, compiled modules and their manifests.

`sparkinfer.compiler.manifest` (and so `find_compiled`) needs no TVM; `compile_model` is
imported lazily, as the pipeline needs the full TVM compiler.
"""

from typing import Any

from sparkinfer.compiler.manifest import find_compiled

__all__ = ["compile_model", "find_compiled"]


def __getattr__(name: str) -> Any:
    if name == "compile_model":
        from sparkinfer.compiler.pipeline import compile_model

        return compile_model
    raise AttributeError(f"module 'sparkinfer.compiler' has no attribute {name!r}")
