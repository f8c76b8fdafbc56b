"""What the runtime reads from a compiled module's `manifest.json` (written by
`sparkinfer.compiler`): the arch, the step's geometry, and the ordered inputs of `decode`.

The runtime depends only on this file and the library beside it, never on the compiler, so
modules compiled elsewhere load with runtime-only TVM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from sparkinfer.errors import CompiledModuleError

MANIFEST = "manifest.json"
N_PAGES = "n_pages"  # the symbolic dim of the KV caches
ROLES = ("state", "kv", "weight")
STATE_NAMES = ("token", "pos", "page_table", "sample_params", "rng")
# Library file names tried when the manifest names none.
_LIBRARY_NAMES = ("model.so", "decode.so", "model.tar", "decode.tar")


@dataclass(frozen=True)
class Input:
    """One parameter of `decode`: shape of ints and, for KV caches, "n_pages"."""

    name: str
    role: str
    dtype: str
    shape: tuple[int | str, ...]
    tensor: str | None = None  # GGUF tensor name (weights)
    ggml_type: str | None = None

    def concrete_shape(self, n_pages: int | None = None) -> tuple[int, ...]:
        out = []
        for d in self.shape:
            if isinstance(d, str):
                if d != N_PAGES or n_pages is None:
                    raise CompiledModuleError(f"input '{self.name}' has symbolic dim {d!r} with no value")
                out.append(int(n_pages))
            else:
                out.append(int(d))
        return tuple(out)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Input:
        tensor = obj.get("tensor", obj.get("gguf", obj.get("gguf_tensor")))
        shape = tuple(d if isinstance(d, str) else int(d) for d in obj["shape"])
        return cls(str(obj["name"]), str(obj["role"]), str(obj["dtype"]), shape, tensor, obj.get("ggml_type"))


@dataclass(frozen=True)
class Manifest:
    path: Path  # the manifest file
    arch: str
    inputs: tuple[Input, ...]
    page_size: int
    max_pages: int
    n_splits: int | None = None
    tvm_version: str | None = None
    hparams_hash: str | None = None
    library: Path | None = None
    entry: str = "decode"
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def directory(self) -> Path:
        return self.path.parent

    def by_role(self, role: str) -> list[Input]:
        return [i for i in self.inputs if i.role == role]

    @property
    def weights(self) -> list[Input]:
        return self.by_role("weight")

    @property
    def kv(self) -> list[Input]:
        return self.by_role("kv")

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CompiledModuleError(f"no compiled module at {path.parent}: {path.name} is missing") from None
        except (OSError, ValueError) as e:
            raise CompiledModuleError(f"cannot read {path}: {e}") from e
        try:
            inputs = tuple(Input.from_json(i) for i in raw["inputs"])
            manifest = cls(
                path=path,
                arch=str(raw["arch"]),
                inputs=inputs,
                page_size=int(raw["page_size"]),
                max_pages=int(raw["max_pages"]),
                n_splits=int(raw["n_splits"]) if raw.get("n_splits") is not None else None,
                tvm_version=raw.get("tvm_version"),
                hparams_hash=raw.get("hparams_hash"),
                library=_library(path.parent, raw),
                entry=str(raw.get("entry", "decode")),
                raw=raw,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CompiledModuleError(f"{path} is not a valid module manifest: {type(e).__name__} {e}") from e
        manifest.validate()
        return manifest

    def validate(self) -> None:
        names = [i.name for i in self.inputs]
        for role in {i.role for i in self.inputs} - set(ROLES):
            raise CompiledModuleError(f"{self.path}: unknown input role {role!r}")
        missing = [n for n in STATE_NAMES if n not in names]
        if missing:
            raise CompiledModuleError(f"{self.path}: the step has no input {', '.join(missing)}")
        for i in self.weights:
            if not i.tensor:
                raise CompiledModuleError(f"{self.path}: weight input '{i.name}' names no GGUF tensor")
        if self.library is None or not self.library.is_file():
            raise CompiledModuleError(f"no compiled module at {self.directory}: the library is missing")


def _library(directory: Path, raw: Mapping[str, Any]) -> Path | None:
    for key in ("library", "lib", "module"):
        if isinstance(raw.get(key), str):
            return directory / raw[key]
    for name in _LIBRARY_NAMES:
        if (directory / name).is_file():
            return directory / name
    found = sorted(directory.glob("*.so")) + sorted(directory.glob("*.tar"))
    return found[0] if found else None
