"""`compiled/<arch>/<key>/manifest.json`: what a compiled decode step is and how to bind it.

The one definition of the manifest format, for the compiler (which writes it) and the
runtime (which reads it). It imports no TVM and nothing
of the build pipeline: the runtime reads a manifest with `Manifest.load`, loads `library`
with `tvm.runtime.load_module`, makes a `VirtualMachine` and binds the inputs of `entry` in
the listed order from the GGUF file's tensors, so modules compiled elsewhere load with
runtime-only TVM.

The key says which model a module is for: a digest of the hyper-parameters
(`ModelConfig.hparams_hash`), the per-tensor ggml types (`type_map_hash`) and the page size,
i.e. of what the compiled code depends on and of nothing else (never weight values, never
the context a user asks for: the KV caches' page count is a symbolic dim). The arch is the
directory above the key. Sources: a digest of the code that produced the module (kernels,
schedules, model, compiler, quant layouts, per-arch schedule choices and tuning logs);
`find_compiled` treats a module built from other sources as stale.

Manifest fields (format 2; binding needs only arch, inputs, page_size, max_pages and
library, and a manifest without "format" is read as format 2; format 1, before the T-token
step, is rebuilt):
  format, key, arch, target (TVM target as a dict), tvm_version, library (file name beside
  the manifest; ".tar" of objects for sm_121, whose host code is aarch64: TVM links it on
  load), library_sha256, entry ("decode"), hparams_hash, type_map_hash (also under model),
  model {arch, hparams (every ModelConfig field), hparams_hash, type_map_hash},
  page_size, max_pages, n_splits, kv_dtype, sources_hash,
  prefill_chunks: [T, ...] the T-token steps beside `decode` (ascending; [] for none): Relax
           functions `prefill_T` and `score_T` taking `chunk_inputs(T)` (tokens int32[T],
           n_valid int32[1]) and then `inputs`, returning (logits f32[V], next int32[1]) and
           (logits f32[T, V], pos int32[1]),
  inputs: [{name, role: state|kv|weight, dtype, shape ("n_pages" for the KV pages),
            tensor and ggml_type for weights, layout for a weight bound re-laid out
            ("q6_k_planar": model.spec.from_file; absent: the file's bytes)}] in call order,
  outputs: [{name, dtype, shape}] (logits, next),
  schedules: the schedules file the kernels' knobs came from (null: none, arch defaults),
  kernels: [{name, family, factory, args, schedule}] where schedule is {rule (module.class),
           source: "tuned" | "transferred" | "default" (the rule's arch default), knobs},
  fatbins: [{kind, arch}] of the library's embedded CUDA binary (CUDA archs),
  workspace_bytes: what the step's functions allocate beyond their inputs, all of them having
           run (pipeline.workspace_bytes); the runtime keeps it free beside the weights and the
           KV cache (0 or absent: a module built before it was recorded).
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

from sparkinfer.errors import CompiledModuleError
from sparkinfer.gguf_file.config import ModelConfig
from sparkinfer.model.spec import (
    ENTRY,
    KV_DTYPE,
    PAGE_SIZE,
    ROLE_KV,
    ROLE_STATE,
    ROLE_WEIGHT,
    STATE_INPUTS,
    StepInput,
    ggml_type,
)

MANIFEST_FORMAT = 2
MANIFEST_NAME = "manifest.json"
ROLES = (ROLE_STATE, ROLE_KV, ROLE_WEIGHT)
DEFAULT_ROOT = Path("compiled")

_PACKAGE = Path(__file__).resolve().parents[1]  # sparkinfer/
_REPO = _PACKAGE.parent
# Code that decides what a compiled module contains.
_SOURCE_DIRS = ("kernels", "schedule", "model", "compiler", "quant")


def type_map_hash(type_map: Mapping[str, Any]) -> str:
    """16 hex digits over every (tensor name, ggml type name), order-free."""
    canonical = json.dumps({k: ggml_type(v).name for k, v in sorted(type_map.items())}, separators=(",", ":"))
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


def sources_hash(arch: str, schedules: Path | None = None) -> str:
    """Digest of the code a module for `arch` is built from and of the schedules file it used
    (`schedules`; None: the package's for `arch`, if there is one), so that a new schedules
    file makes the module stale."""
    from sparkinfer.schedule.schedules import packaged_schedules_path

    digest = hashlib.sha256()
    for path in (p for d in _SOURCE_DIRS for p in sorted((_PACKAGE / d).rglob("*.py"))):
        digest.update(path.relative_to(_REPO).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    schedules = packaged_schedules_path(arch) if schedules is None else schedules
    if schedules.is_file():
        digest.update(b"schedules\0" + hashlib.sha256(schedules.read_bytes()).digest())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Output:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class Manifest:
    """A compiled module: its `manifest.json` and the library beside it. Only what binding
    the step needs is required (`arch`, `inputs`, `page_size`, `max_pages`, `library`); the
    rest describes the build, and `sparkinfer.compiler` always writes it."""

    arch: str
    inputs: list[StepInput]
    page_size: int
    max_pages: int
    library: Path  # the library file, beside manifest.json
    n_splits: int | None = None
    prefill_chunks: tuple[int, ...] = ()
    entry: str = ENTRY
    tvm_version: str | None = None
    model: dict[str, Any] = field(default_factory=dict)  # model_record(); at least the hashes
    key: str | None = None
    target: dict[str, Any] = field(default_factory=dict)
    library_sha256: str | None = None
    kv_dtype: str = KV_DTYPE
    sources_hash: str | None = None
    outputs: list[Output] = field(default_factory=list)
    schedules: str | None = None
    kernels: list[dict[str, Any]] = field(default_factory=list)
    fatbins: list[dict[str, str]] = field(default_factory=list)
    workspace_bytes: int = 0

    @property
    def directory(self) -> Path:
        return self.library.parent

    @property
    def path(self) -> Path:
        return self.directory / MANIFEST_NAME

    @property
    def hparams_hash(self) -> str | None:
        return self.model.get("hparams_hash")

    @property
    def type_map_hash(self) -> str | None:
        return self.model.get("type_map_hash")

    @property
    def config(self) -> ModelConfig:
        return ModelConfig(**self.model["hparams"])

    def by_role(self, role: str) -> list[StepInput]:
        return [i for i in self.inputs if i.role == role]

    @property
    def kv(self) -> list[StepInput]:
        return self.by_role(ROLE_KV)

    @property
    def weights(self) -> list[StepInput]:
        return self.by_role(ROLE_WEIGHT)

    # -- JSON ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """A fresh JSON-ready dict (editing it leaves the manifest as it was)."""
        return copy.deepcopy({
            "format": MANIFEST_FORMAT,
            "key": self.key,
            "arch": self.arch,
            "target": self.target,
            "tvm_version": self.tvm_version,
            "library": self.library.name,
            "library_sha256": self.library_sha256,
            "entry": self.entry,
            "hparams_hash": self.hparams_hash,
            "type_map_hash": self.type_map_hash,
            "model": self.model,
            "page_size": self.page_size,
            "max_pages": self.max_pages,
            "n_splits": self.n_splits,
            "prefill_chunks": list(self.prefill_chunks),
            "kv_dtype": self.kv_dtype,
            "sources_hash": self.sources_hash,
            "inputs": [i.to_json() for i in self.inputs],
            "outputs": [{"name": o.name, "dtype": o.dtype, "shape": list(o.shape)} for o in self.outputs],
            "schedules": self.schedules,
            "kernels": self.kernels,
            "fatbins": self.fatbins,
            "workspace_bytes": self.workspace_bytes,
        })

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], directory: Path) -> Manifest:
        """KeyError, TypeError or ValueError where a required field is missing or malformed."""
        # The hashes stand at the top level and under "model"; a minimal manifest has only the former.
        model = {k: obj[k] for k in ("hparams_hash", "type_map_hash") if obj.get(k) is not None}
        model.update(obj.get("model") or {})
        return cls(
            arch=str(obj["arch"]),
            inputs=[StepInput.from_json(i) for i in obj["inputs"]],
            page_size=int(obj["page_size"]),
            max_pages=int(obj["max_pages"]),
            library=Path(directory) / obj["library"],
            n_splits=int(obj["n_splits"]) if obj.get("n_splits") is not None else None,
            prefill_chunks=tuple(sorted(int(t) for t in obj.get("prefill_chunks", []))),
            entry=str(obj.get("entry", ENTRY)),
            tvm_version=obj.get("tvm_version"),
            model=model,
            key=obj.get("key"),
            target=dict(obj.get("target") or {}),
            library_sha256=obj.get("library_sha256"),
            kv_dtype=str(obj.get("kv_dtype", KV_DTYPE)),
            sources_hash=obj.get("sources_hash"),
            outputs=[Output(o["name"], o["dtype"], tuple(o["shape"])) for o in obj.get("outputs", [])],
            schedules=obj.get("schedules"),
            kernels=list(obj.get("kernels", [])),
            fatbins=list(obj.get("fatbins", [])),
            workspace_bytes=int(obj.get("workspace_bytes") or 0),
        )

    def validate(self) -> None:
        """CompiledModuleError unless the step can be bound from this manifest."""
        for role in {i.role for i in self.inputs} - set(ROLES):
            raise CompiledModuleError(f"{self.path}: unknown input role {role!r}")
        missing = [n for n in STATE_INPUTS if n not in {i.name for i in self.inputs}]
        if missing:
            raise CompiledModuleError(f"{self.path}: the step has no input {', '.join(missing)}")
        for i in self.weights:
            if not i.tensor:
                raise CompiledModuleError(f"{self.path}: weight input '{i.name}' names no GGUF tensor")

    # -- files --------------------------------------------------------------------------

    def write(self) -> Path:
        """Write manifest.json beside the library (atomically); returns its path."""
        path = self.path
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        """The manifest in directory `path` (or the file `path`), validated; CompiledModuleError
        where it is missing, unreadable or invalid. Its library need not be there (`load`)."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise CompiledModuleError(f"no compiled module at {path.parent}: {path.name} is missing") from None
        except (OSError, ValueError) as e:
            raise CompiledModuleError(f"cannot read {path}: {e}") from e
        if isinstance(obj, dict) and obj.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT:
            raise CompiledModuleError(f"{path}: manifest format {obj['format']!r} is not {MANIFEST_FORMAT}: "
                                      f"recompile the model")
        try:
            manifest = cls.from_json(obj, path.parent)
        except (KeyError, TypeError, ValueError) as e:
            raise CompiledModuleError(f"{path} is not a valid module manifest: {type(e).__name__} {e}") from e
        manifest.validate()
        return manifest

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """`read`, and the library must be there: a module ready to load."""
        manifest = cls.read(path)
        if not manifest.library.is_file():
            raise CompiledModuleError(f"no compiled module at {manifest.directory}: the library is missing")
        return manifest


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
                 *, check_sources: bool = True, schedules: Path | None = None) -> str | None:
    """Why this compiled module cannot serve this model (None: it can): the one staleness check,
    for `find_compiled` and for a module the user names (`Engine(module_dir=...)`, which skips
    the sources). What a manifest does not record (only binding fields are required) is not
    checked; binding itself checks each weight's type (`runtime.weights.check_types`)."""
    if manifest.arch != arch:
        return f"built for {manifest.arch}, not {arch}"
    if manifest.hparams_hash is not None and manifest.hparams_hash != config.hparams_hash():
        return "built for other hyper-parameters"
    if manifest.type_map_hash is not None and manifest.type_map_hash != type_map_hash(type_map):
        return "built for other tensor types"
    if manifest.tvm_version is not None and manifest.tvm_version != tvm_version():
        return f"built with TVM {manifest.tvm_version}, this is {tvm_version()}"
    if check_sources and manifest.sources_hash != sources_hash(arch, schedules):
        return "built from other sources (kernels, schedules or compiler changed)"
    if not manifest.library.is_file():
        return f"{manifest.library.name} is missing"
    return None


def find_compiled(
    config: ModelConfig,
    type_map: Mapping[str, Any],
    arch: str,
    root: str | Path = DEFAULT_ROOT,
    *,
    page_size: int = PAGE_SIZE,
    n_splits: int | None = None,
    prefill_chunks: tuple[int, ...] | None = None,
    check_sources: bool = True,
    schedules: Path | None = None,
) -> Manifest | None:
    """The compiled module for this model and arch under `root`, or None if there is none
    or it is stale (other TVM, other sources, or asked for other n_splits or prefill chunks)."""
    directory = compiled_dir(config, type_map, arch, root, page_size)
    if not (directory / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = Manifest.read(directory)
    except CompiledModuleError:
        return None
    if stale_reason(manifest, config, type_map, arch, check_sources=check_sources,
                    schedules=schedules) is not None:
        return None
    if n_splits is not None and manifest.n_splits != n_splits:
        return None
    if prefill_chunks is not None and manifest.prefill_chunks != tuple(sorted(prefill_chunks)):
        return None
    return manifest
