"""The corpus selection is deterministic, leaves tests and generated data out, and the
packed tarball carries exactly the manifest's bytes."""

import hashlib
import platform

import pytest

from training import corpus as C


@pytest.mark.parametrize(
    "path",
    [
        "test/test_os.py",
        "test/support/__init__.py",
        "ctypes/test/test_python_api.py",
        "distutils/tests/support.py",
        "unittest/test/test_case.py",
        "tkinter/test/widget_tests.py",
        "idlelib/editor.py",
        "lib2to3/pytree.py",
        "site-packages/numpy/__init__.py",
        "encodings/cp037.py",
        "pydoc_data/topics.py",
        "config-3.11-x86_64-linux-gnu/python-config.py",
        "_sysconfigdata__linux_x86_64-linux-gnu.py",
        "test_foo.py",
        "__pycache__/os.cpython-311.py",
        "os.pyc",
        "LICENSE.txt",
    ],
)
def test_excluded(path):
    assert not C.is_selected(path)


@pytest.mark.parametrize("path", ["os.py", "json/decoder.py", "asyncio/tasks.py", "email/mime/base.py", "testing.py"])
def test_included(path):
    assert C.is_selected(path)


def test_split_every_20th():
    splits = [C.split_of(i) for i in range(60)]
    assert [i for i, s in enumerate(splits) if s == "heldout"] == [19, 39, 59]


def _fake_stdlib(root):
    files = {
        "os.py": "import sys\n",
        "b.py": "x = 1\n",
        "pkg/__init__.py": "",
        "pkg/mod.py": "def f():\n    return 2\n",
        "pkg/test/test_mod.py": "assert True\n",
        "tests/helper.py": "pass\n",
        "idlelib/run.py": "pass\n",
        "encodings/cp1.py": "table = ()\n",
        "notes.txt": "not python\n",
    }
    for i in range(25):
        files[f"gen/m{i:02d}.py"] = f"VALUE = {i}\n"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    (root / "latin1.py").write_bytes(b"s = '\xe9'\n")  # not UTF-8: left out
    (root / C.LICENSE_FILE).write_text("PSF LICENSE AGREEMENT\n")
    return root


def test_selection_deterministic_and_sorted(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    a = C.select_files(root)
    assert a == C.select_files(root) == sorted(a)
    assert "os.py" in a and "pkg/mod.py" in a
    assert not any("test" in p.split("/")[:-1] or p.startswith(("idlelib", "encodings")) for p in a)
    assert "latin1.py" not in a and "tests/helper.py" not in a


def test_manifest_pack_load_roundtrip(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    man = C.build_manifest(root, python_version="3.99.0")
    assert man["license"].startswith("PSF License Agreement")
    assert man["license_file"]["path"] == C.LICENSE_FILE
    assert [f["path"] for f in man["files"]] == C.select_files(root)
    assert man["n_heldout_files"] == sum(f["split"] == "heldout" for f in man["files"]) == 1
    tar1 = C.pack(man, root, tmp_path / "out1")
    tar2 = C.pack(man, root, tmp_path / "out2")
    assert tar1.name == "python-stdlib-3.99.0.tar.gz"
    assert tar1.read_bytes() == tar2.read_bytes()  # byte-reproducible

    # the reader never looks at the stdlib: remove it
    for p in sorted(root.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    corpus = C.load_corpus(tar1, man)
    assert len(corpus.train) + len(corpus.heldout) == man["n_files"]
    assert [d.path for d in corpus.heldout] == [f["path"] for f in man["files"] if f["split"] == "heldout"]
    assert dict((d.path, d.text) for d in corpus.train)["pkg/mod.py"] == "def f():\n    return 2\n"


def test_pack_refuses_changed_files(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    man = C.build_manifest(root)
    (root / "os.py").write_text("import os  # changed\n")
    with pytest.raises(C.CorpusError, match="differ from the manifest"):
        C.pack(man, root, tmp_path / "out")


def test_load_refuses_other_manifest(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    man = C.build_manifest(root)
    tar = C.pack(man, root, tmp_path / "out")
    other = dict(man, files=[dict(f, sha256="0" * 64) if f["path"] == "os.py" else f for f in man["files"]])
    with pytest.raises(C.CorpusError):
        C.load_corpus(tar, other)


def test_committed_manifest_is_consistent():
    man = C.load_manifest()
    paths = [f["path"] for f in man["files"]]
    assert paths == sorted(paths) and len(paths) == man["n_files"] > 300
    assert all(C.is_selected(p) for p in paths)
    assert [f["split"] for f in man["files"]] == [C.split_of(i) for i in range(len(paths))]
    assert man["total_bytes"] == sum(f["size"] for f in man["files"])
    assert man["license"].startswith("PSF License Agreement")
    assert man["archive"] == C.archive_name(man["python_version"])


def test_committed_manifest_matches_this_stdlib():
    man = C.load_manifest()
    if platform.python_version() != man["python_version"]:
        pytest.skip(f"manifest is of Python {man['python_version']}, this is {platform.python_version()}")
    root = C.stdlib_dir()
    assert C.select_files(root) == [f["path"] for f in man["files"]]
    for f in man["files"][:: 25]:
        assert hashlib.sha256((root / f["path"]).read_bytes()).hexdigest() == f["sha256"]
