"""`sparkinfer export` on the CPU: the folder runs with the compiler hidden (a Python that sees
only the folder, numpy, tokenizers and jinja2) and generates the tokens `sparkinfer run` does."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparkinfer.cli import main
from sparkinfer.export import Bundle, export_bundle
from tests.server.tiny import tiny_paths

PROMPT = "hello world, the model"
# What the target machine has installed: the launcher's promise.
TARGET_PACKAGES = ("numpy", "tokenizers", "jinja2", "markupsafe")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    model, module = tiny_paths()
    return export_bundle(tmp_path_factory.mktemp("export") / "bundle", model, "cpu", module_dir=module)


@pytest.fixture(scope="module")
def target_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site-packages holding only TARGET_PACKAGES (links to this machine's copies)."""
    site = tmp_path_factory.mktemp("target-site")
    for name in TARGET_PACKAGES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations, name
        src = Path(list(spec.submodule_search_locations)[0])
        for path in (src, src.with_name(f"{name}.libs")):  # wheels keep vendored libraries beside the package
            if path.exists():
                (site / path.name).symlink_to(path)
    return site


def on_target(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Python without its site-packages (-S), seeing only `site`, outside the repository."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TVM_", "SPARKINFER_"))}
    env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, "-S", *args], capture_output=True, text=True, env=env, cwd=site)


def test_the_folder_holds_the_runtime_only(bundle: Bundle) -> None:
    files = {p.relative_to(bundle.directory).as_posix() for p in bundle.directory.rglob("*") if p.is_file()}
    assert {"run.py", "bundle.json", "module/manifest.json", "module/model.so", bundle.model.name} <= files
    assert "site/tvm/lib/libtvm_runtime.so" in files
    assert not [f for f in files if "libtvm_compiler" in f or f.startswith(("site/tvm/relax/", "site/tvm/s_tir/"))]
    assert not [f for f in files if f.startswith(("site/sparkinfer/kernels/", "site/sparkinfer/schedule/",
                                                  "site/sparkinfer/compiler/pipeline"))]
    assert bundle.runtime_bytes < 30 * 2**20
    info = json.loads((bundle.directory / "bundle.json").read_text())
    assert info["arch"] == "cpu" and info["model"] == bundle.model.name and info["module"] == "module"


def test_on_the_target_tvm_is_runtime_only_and_sparkinfer_is_the_folders(bundle: Bundle, target_site: Path) -> None:
    site = bundle.directory / "site"
    code = (f"import os, sys; sys.path.insert(0, {str(site)!r}); os.environ['TVM_USE_RUNTIME_LIB'] = '1'\n"
            "import tvm, sparkinfer.runtime.engine\n"
            "print(tvm.base._RUNTIME_ONLY, tvm.__file__, sparkinfer.__file__)\n"
            "try:\n    import tvm.relax\nexcept ImportError:\n    print('no relax')\n")
    result = on_target(target_site, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", str(site / "tvm/__init__.py"), str(site / "sparkinfer/__init__.py"),
                                     "no", "relax"]


def test_run_py_generates_what_sparkinfer_run_does(bundle: Bundle, target_site: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    model, module = tiny_paths()
    flags = ["-p", PROMPT, "-n", "12", "--json"]
    assert main(["run", str(model), "--arch", "cpu", "--module", str(module), *flags]) == 0
    want = json.loads(capsys.readouterr().out)
    result = on_target(target_site, str(bundle.directory / "run.py"), *flags)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["generated_ids"] == want["generated_ids"] and len(got["generated_ids"]) > 0
    assert got["text"] == want["text"] and got["arch"] == "cpu"


def test_run_py_refuses_another_python(bundle: Bundle, target_site: Path, tmp_path: Path) -> None:
    info_path = bundle.directory / "bundle.json"
    saved = info_path.read_text()
    try:
        info_path.write_text(json.dumps({**json.loads(saved), "python": "3.99"}))
        result = on_target(target_site, str(bundle.directory / "run.py"), "-p", "x")
    finally:
        info_path.write_text(saved)
    assert result.returncode == 1
    vi = sys.version_info
    assert result.stderr.startswith(f"error: this folder was exported for Python 3.99 on {os.uname().machine}, "
                                    f"this is Python {vi.major}.{vi.minor}")


def test_a_folder_without_the_model_asks_for_it(tmp_path: Path, target_site: Path) -> None:
    model, module = tiny_paths()
    bundle = export_bundle(tmp_path / "b", model, "cpu", module_dir=module, include_model=False)
    assert bundle.model is None and not list(bundle.directory.glob("*.gguf"))
    result = on_target(target_site, str(bundle.directory / "run.py"), "-p", "x")
    assert result.returncode == 1
    assert result.stderr == ("error: this folder was exported without its model: give the .gguf file, "
                             "python run.py MODEL.gguf -p ...\n")
    result = on_target(target_site, str(bundle.directory / "run.py"), str(model), "-p", PROMPT, "-n", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["generated_ids"]) == 2


def test_export_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, module = tiny_paths()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["export", str(tmp_path / "full"), str(model), "--arch", "cpu", "--module", str(module)]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'full'} already exists: export into a new or empty folder\n"
    assert main(["export", str(tmp_path / "b"), str(model), "--arch", "sm_80"]) == 1
    assert capsys.readouterr().err == "error: unknown arch 'sm_80': SparkInfer targets sm_90, sm_120, sm_121, cpu\n"
    other = tmp_path / "other.gguf"
    assert main(["synth", str(other), "--preset", "tiny"]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "c"), str(other), "--arch", "cpu", "--module", str(module)]) == 1
    assert capsys.readouterr().err == (f"error: the module at {module} does not fit {other}: "
                                       "built for other hyper-parameters\n")
    assert not (tmp_path / "c").exists()


def test_a_module_for_another_kind_of_cpu_is_refused() -> None:
    from sparkinfer.errors import SparkInferError
    from sparkinfer.export.bundle import _check_host

    here = os.uname().machine
    other = "aarch64" if here == "x86_64" else "x86_64"
    with pytest.raises(SparkInferError, match=f"the sm_121 module's host code is for {other}-linux-gnu, this machine "
                                              f"is {here}: the folder's TVM would not load it. Export on a {other} "
                                              "machine \\(give it this module with --module\\)"):
        _check_host({"kind": "cuda", "host": {"mtriple": f"{other}-linux-gnu"}}, "sm_121")
    _check_host({"kind": "cuda", "host": {"mtriple": f"{here}-linux-gnu"}}, "sm_90")
    _check_host({"kind": "llvm", "mcpu": "native"}, "cpu")  # no triple: built for this machine
