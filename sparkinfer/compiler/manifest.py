"""`compiled/<arch>/<key>/manifest.json`: what a compiled decode step is and how to bind it.

This module needs neither TVM nor the compiler: the runtime reads a manifest, loads
`library` with `tvm.runtime.load_module`, makes a `VirtualMachine` and binds the inputs of
`entry` in the listed order from the GGUF file's tensors, with no import of the compiler.

The key says which model a module is for: a digest of the hyper-parameters
(`ModelConfig.hparams_hash`), the per-tensor ggml types (`type_map_hash`) and the page size,
i.e. of what the compiled code depends on and of nothing else (never weight values, never
the context a user asks for: the KV caches' page count is a symbolic dim). The arch is the
directory above the key. Sources: a digest of the code that produced the module (kernels,
schedules, model, compiler, quant layouts, per-arch schedule choices and tuning logs);
`find_compiled` treats a module built from other sources as stale.

Manifest fields (format 1):
  format, key, arch, target (TVM target as a dict), tvm_version, library (file name beside
  the manifest; ".tar" of objects for sm_121, whose host code is aarch64: TVM links it on
  load), library_sha256, entry ("decode"), hparams_hash, type_map_hash (also under model),
  model {arch, hparams (every ModelConfig field), hparams_hash, type_map_hash},
  page_size, max_pages, n_splits, kv_dtype, sources_hash,
  inputs: [{name, role: state|kv|weight, dtype, shape ("n_pages" for the KV pages),
            tensor and ggml_type for weights}] in call order,
  outputs: [{name, dtype, shape}] (logits, next),
  kernels: [{name, family, factory, args, schedule}] where schedule is "hand:<module.function>",
           "tuned:<log directory>", "dlight-fallback" or "unscheduled" (cpu),
  fatbins: [{kind, arch}] of the library's embedded CUDA binary (CUDA archs).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType

from sparkinfer.errors import SparkInferError
from sparkinfer.gguf_file.config import ModelConfig
from sparkinfer.model.spec import ENTRY, PAGE_SIZE, ROLE_KV, ROLE_STATE, ROLE_WEIGHT, StepInput

MANIFEST_FORMAT = 1
MANIFEST_NAME = "manifest.json"
DEFAULT_ROOT = Path("compiled")

_PACKAGE = Path(__file__).resolve().parents[1]  # sparkinfer/
_REPO = _PACKAGE.parent
# Code that decides what a compiled module contains.
_SOURCE_DIRS = ("kernels", "schedule", "model", "compiler", "quant")


def type_name(value: Any) -> str:
    if isinstance(value, str):
        return GGMLQuantizationType[value].name
    return GGMLQuantizationType(int(value)).name


def type_map_hash(type_map: Mapping[str, Any]) -> str:
    """16 hex digits over every (tensor name, ggml type name), order-free."""
    canonical = json.dumps({k: type_name(v) for k, v in sorted(type_map.items())}, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def module_key(config: ModelConfig, type_map: Mapping[str, Any], page_size: int = PAGE_SIZE) -> str:
    """The directory name of a compiled module: what its code depends on, nothing else."""
    canonical = json.dumps(
        {
            "format": MANIFEST_FORMAT,
            "hparams": config.hparams_hash(),
            "types": type_map_hash(type_map),
            "page_size": page_size,
        },
        sort_keys=True,
    )
    return f"{config.arch}-{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"


def tvm_version() -> str:
    try:
        return metadata.version("apache-tvm")
    except metadata.PackageNotFoundError:  # a source build of TVM
        import tvm

        return str(tvm.__version__)


def sources_hash(arch: str) -> str:
    """Digest of the code and per-arch data a module for `arch` is built from."""
    digest = hashlib.sha256()
    files = [p for d in _SOURCE_DIRS for p in sorted((_PACKAGE / d).rglob("*.py"))]
    for extra in (_REPO / "schedules", _REPO / "tuning_logs" / arch):
        if extra.is_dir():
            files += sorted(p for p in extra.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in files:
        digest.update(path.relative_to(_REPO).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Output:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class Manifest:
    key: str
    arch: str
    target: dict[str, Any]
    tvm_version: str
    library: str
    library_sha256: str
    model: dict[str, Any]
    page_size: int
    max_pages: int
    n_splits: int
    kv_dtype: str
    sources_hash: str
    inputs: list[StepInput]
    outputs: list[Output]
    kernels: list[dict[str, Any]]
    fatbins: list[dict[str, str]] = field(default_factory=list)
    entry: str = ENTRY
    format: int = MANIFEST_FORMAT
    directory: Path | None = None  # where it was read from (not written)

    # -- views the runtime wants --------------------------------------------------------

    def role(self, role: str) -> list[StepInput]:
        return [i for i in self.inputs if i.role == role]

    @property
    def state_inputs(self) -> list[StepInput]:
        return self.role(ROLE_STATE)

    @property
    def kv_inputs(self) -> list[StepInput]:
        return self.role(ROLE_KV)

    @property
    def weight_inputs(self) -> list[StepInput]:
        return self.role(ROLE_WEIGHT)

    @property
    def library_path(self) -> Path:
        if self.directory is None:
            raise ValueError("this manifest was not read from a directory")
        return self.directory / self.library

    @property
    def config(self) -> ModelConfig:
        return ModelConfig(**self.model["hparams"])

    # -- JSON ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """A fresh JSON-ready dict (editing it leaves the manifest as it was)."""
        return copy.deepcopy({
            "format": self.format,
            "key": self.key,
            "arch": self.arch,
            "target": self.target,
            "tvm_version": self.tvm_version,
            "library": self.library,
            "library_sha256": self.library_sha256,
            "entry": self.entry,
            "hparams_hash": self.model["hparams_hash"],
            "type_map_hash": self.model["type_map_hash"],
            "model": self.model,
            "page_size": self.page_size,
            "max_pages": self.max_pages,
            "n_splits": self.n_splits,
            "kv_dtype": self.kv_dtype,
            "sources_hash": self.sources_hash,
            "inputs": [i.to_json() for i in self.inputs],
            "outputs": [{"name": o.name, "dtype": o.dtype, "shape": list(o.shape)} for o in self.outputs],
            "kernels": self.kernels,
            "fatbins": self.fatbins,
        })

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], directory: Path | None = None) -> Manifest:
        if obj.get("format") != MANIFEST_FORMAT:
            raise SparkInferError(f"manifest format {obj.get('format')!r} is not {MANIFEST_FORMAT}: recompile the model")
        return cls(
            key=obj["key"],
            arch=obj["arch"],
            target=obj["target"],
            tvm_version=obj["tvm_version"],
            library=obj["library"],
            library_sha256=obj["library_sha256"],
            model=obj["model"],
            page_size=obj["page_size"],
            max_pages=obj["max_pages"],
            n_splits=obj["n_splits"],
            kv_dtype=obj["kv_dtype"],
            sources_hash=obj["sources_hash"],
            inputs=[StepInput.from_json(i) for i in obj["inputs"]],
            outputs=[Output(o["name"], o["dtype"], tuple(o["shape"])) for o in obj["outputs"]],
            kernels=list(obj["kernels"]),
            fatbins=list(obj.get("fatbins", [])),
            entry=obj.get("entry", ENTRY),
            directory=directory,
        )

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise SparkInferError(f"{directory} holds no compiled model ({MANIFEST_NAME} is missing)") from None
        except json.JSONDecodeError as e:
            raise SparkInferError(f"{path} is not valid JSON: {e}") from e
        return cls.from_json(obj, directory)


def model_record(config: ModelConfig, type_map: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "arch": config.arch,
        "hparams": dataclasses.asdict(config),
        "hparams_hash": config.hparams_hash(),
        "type_map_hash": type_map_hash(type_map),
    }


def compiled_dir(config: ModelConfig, type_map: Mapping[str, Any], arch: str,
                 root: str | Path = DEFAULT_ROOT, page_size: int = PAGE_SIZE) -> Path:
    return Path(root) / arch / module_key(config, type_map, page_size)


def stale_reason(manifest: Manifest, config: ModelConfig, type_map: Mapping[str, Any], arch: str,
                 *, check_sources: bool = True) -> str | None:
    """Why this compiled module cannot serve this model (None: it can)."""
    if manifest.arch != arch:
        return f"built for {manifest.arch}, not {arch}"
    if manifest.model.get("hparams_hash") != config.hparams_hash():
        return "built for other hyper-parameters"
    if manifest.model.get("type_map_hash") != type_map_hash(type_map):
        return "built for other tensor types"
    if manifest.tvm_version != tvm_version():
        return f"built with TVM {manifest.tvm_version}, this is {tvm_version()}"
    if check_sources and manifest.sources_hash != sources_hash(arch):
        return "built from other sources (kernels, schedules or compiler changed)"
    if manifest.directory is not None and not manifest.library_path.is_file():
        return f"{manifest.library} is missing"
    return None


def find_compiled(
    config: ModelConfig,
    type_map: Mapping[str, Any],
    arch: str,
    root: str | Path = DEFAULT_ROOT,
    *,
    page_size: int = PAGE_SIZE,
    n_splits: int | None = None,
    check_sources: bool = True,
    allow_stand_ins: bool = False,
) -> Manifest | None:
    """The compiled module for this model and arch under `root`, or None if there is none
    or it is stale (other TVM, other sources, or asked for other n_splits). A module built
    with a test's stand-in kernels counts only with `allow_stand_ins`."""
    directory = compiled_dir(config, type_map, arch, root, page_size)
    if not (directory / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = Manifest.read(directory)
    except (SparkInferError, KeyError, TypeError):
        return None
    if stale_reason(manifest, config, type_map, arch, check_sources=check_sources) is not None:
        return None
    if n_splits is not None and manifest.n_splits != n_splits:
        return None
    if not allow_stand_ins and any(k.get("stand_in") for k in manifest.kernels):
        return None
    return manifest
