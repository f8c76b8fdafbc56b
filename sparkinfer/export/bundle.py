"""Write the folder `sparkinfer export` makes.

    DIR/run.py          the launcher (`launcher.py` of this package): `sparkinfer run`'s options
    DIR/bundle.json     arch, model file, and the Python and machine the folder was made for
    DIR/module/         the compiled module (manifest.json + library) for the arch
    DIR/<model>.gguf    the model (left out with include_model=False: give its path to run.py)
    DIR/site/           tvm and tvm_ffi without the compiler, gguf and what it imports, and the
                        SparkInfer runtime (the files below, nothing that builds kernels)

TVM's and tvm_ffi's Python parts hold compiled extensions, so the folder runs under the same
Python version on the same kind of machine (run.py checks both). The module's host code is
built for this machine's CPU too (for CUDA archs the kernels are fatbins for the GPU).
"""

from __future__ import annotations

import importlib.util
import json
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sparkinfer.errors import SparkInferError
from sparkinfer.gguf_file import GGUFModel
from sparkinfer.runtime.device import check_arch
from sparkinfer.runtime.engine import find_or_compile

BUNDLE_INFO = "bundle.json"
BUNDLE_FORMAT = 1
MODULE_DIR = "module"
SITE_DIR = "site"
LAUNCHER = Path(__file__).with_name("launcher.py")

# Packages copied into site/, each less the paths (relative to the package) only building
# needs. Without lib/libtvm_compiler.so, `import tvm` is runtime-only: Relax, TIR scheduling
# and TOPI are never imported, so they stay behind too.
_PACKAGES: dict[str, frozenset[str]] = {
    "tvm": frozenset({"lib/libtvm_compiler.so", "3rdparty", "src", "include", "cmake", "lib64", "web", "testing",
                      "exec", "relax", "s_tir", "topi", "contrib"}),
    "tvm_ffi": frozenset({"3rdparty", "src", "include", "cython", "stub", "share",
                          "testing", "CMakeLists.txt", "core.pyi"}),
    "typing_extensions": frozenset(),  # tvm_ffi imports it
    # gguf.GGUFReader (the weights loader) and the packages `import gguf` pulls in.
    "gguf": frozenset(),
    "yaml": frozenset(),
    "tqdm": frozenset(),
}

# The SparkInfer runtime: what `sparkinfer.runtime.cli_run` and `sparkinfer.load` import.
_SPARKINFER_FILES = (
    "__init__.py", "errors.py", "sampling_params.py", "grammar.py", "api.py",
    "compiler/__init__.py", "compiler/manifest.py",
    "data/__init__.py",
    "gguf_file", "model/__init__.py", "model/spec.py", "quant", "runtime", "tokenizer",
)

Log = Callable[[str], None]


@dataclass(frozen=True)
class Bundle:
    directory: Path
    arch: str
    model: Path | None  # the copied model, None when left out
    runtime_bytes: int  # everything but the model

    @property
    def model_bytes(self) -> int:
        return self.model.stat().st_size if self.model is not None else 0


def export_bundle(out: str | Path, model: str | Path, arch: str, *, module_dir: str | Path | None = None,
                  include_model: bool = True, log: Log | None = None) -> Bundle:
    """Write the folder for `model` on `arch` into `out` (which must not exist, or be empty).

    The module is found as `sparkinfer run` finds it (`module_dir`, else the up-to-date one
    in compiled/ or the cache, else compiled into the cache: needs full TVM, and nvcc for a
    CUDA arch)."""
    log = log or (lambda message: None)
    check_arch(arch)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SparkInferError(f"{out} already exists: export into a new or empty folder")
    gguf_model = GGUFModel.open(model)
    manifest = find_or_compile(gguf_model, arch, module_dir=module_dir, log=log)
    _check_host(manifest.target, arch)
    out.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(manifest.directory, out / MODULE_DIR,
                        ignore=lambda _, names: [n for n in names if n not in ("manifest.json", manifest.library.name)])
        site = out / SITE_DIR
        site.mkdir()
        for package, left_out in _PACKAGES.items():
            _copy_package(package, site, left_out)
        _copy_sparkinfer(site / "sparkinfer")
        shutil.copy2(LAUNCHER, out / "run.py")
        copied = None
        if include_model:
            copied = out / gguf_model.path.name
            log(f"copying {gguf_model.path} ({gguf_model.file_size / 2**20:.1f} MiB)")
            shutil.copy2(gguf_model.path, copied)
        _write_info(out, arch, copied, gguf_model.config.hparams_hash())
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    runtime = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p != copied)
    return Bundle(out, arch, copied, runtime)


def _check_host(target: dict, arch: str) -> None:
    """The module's host code must run on this machine's kind of CPU: the folder's TVM is this
    machine's (an sm_121 module holds aarch64 code for the DGX Spark's Arm cores)."""
    triple = (target.get("host") or target).get("mtriple")
    machine = platform.machine()
    if triple is not None and triple.split("-")[0] != machine:
        raise SparkInferError(
            f"the {arch} module's host code is for {triple}, this machine is {machine}: the folder's TVM would not "
            f"load it. Export on a {triple.split('-')[0]} machine (give it this module with --module)")


def _copy_package(package: str, site: Path, left_out: frozenset[str]) -> None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SparkInferError(f"cannot export: the package '{package}' is not installed here")
    if not spec.submodule_search_locations:  # a one-file module
        shutil.copy2(spec.origin, site / Path(spec.origin).name)
        return
    root = Path(list(spec.submodule_search_locations)[0])

    def ignore(directory: str, names: list[str]) -> list[str]:
        rel = Path(directory).relative_to(root)
        return [n for n in names if n == "__pycache__" or (rel / n).as_posix() in left_out]

    shutil.copytree(root, site / package, ignore=ignore)


def _copy_sparkinfer(dest: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    for rel in _SPARKINFER_FILES:
        src, target = root / rel, dest / rel
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def _write_info(out: Path, arch: str, model: Path | None, hparams_hash: str) -> None:
    from sparkinfer import __version__

    info = {
        "format": BUNDLE_FORMAT,
        "arch": arch,
        "model": model.name if model is not None else None,
        "hparams_hash": hparams_hash,
        "module": MODULE_DIR,
        "site": SITE_DIR,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "machine": platform.machine(),
        "sparkinfer_version": __version__,
    }
    (out / BUNDLE_INFO).write_text(json.dumps(info, indent=1) + "\n")


__all__ = ["BUNDLE_INFO", "Bundle", "export_bundle"]
