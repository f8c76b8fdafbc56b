"""The training corpus: pure-Python sources of CPython's standard library.

Every machine with Python has them offline, and they are under the PSF License Agreement.
But each Python version's stdlib differs, so the exact list of files is pinned in
``training/corpus_manifest.json`` (relative path, size, sha256, split) together with the
Python version it was taken from, and ``pack`` tars those very files (plus the licence)
into the git-ignored ``training/.corpus/`` folder. Training reads that tarball only, never
the stdlib of the machine it runs on, so a GPU box with another Python trains on the same
bytes.

    python -m training.corpus manifest   # (re)write the manifest from this Python's stdlib
    python -m training.corpus pack       # tar the manifest's files into training/.corpus/
    python -m training.corpus verify     # check the tarball against the manifest

Selection (deterministic): every ``*.py`` under the stdlib folder, sorted by relative
POSIX path, leaving out test code (any folder named ``test``/``tests``, any
``test_*.py``), ``idlelib``, ``lib2to3``, ``site-packages``, generated data rather than
code (``encodings`` codec tables, ``pydoc_data`` topic texts, ``_sysconfigdata*``,
``config-*`` build folders) and any file that is not valid UTF-8. Split by file: the
20th, 40th, ... file of that sorted list is held out, the rest is training text.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import platform
import sys
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

TRAINING_DIR = Path(__file__).resolve().parent
MANIFEST_PATH = TRAINING_DIR / "corpus_manifest.json"
CORPUS_DIR = TRAINING_DIR / ".corpus"

HOLDOUT_EVERY = 20
LICENSE_NAME = "PSF License Agreement (Python Software Foundation License Version 2)"
LICENSE_FILE = "LICENSE.txt"  # the stdlib folder's copy of the licence; it travels in the tar

EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "encodings",  # generated codec tables (charmap dumps), not code people write
        "pydoc_data",  # one 750 KB string of documentation topics
    }
)
EXCLUDED_DIR_PREFIXES = ("config-",)  # config-3.11-x86_64-linux-gnu: build leftovers
EXCLUDED_FILE_PREFIXES = ("test_", "_test_", "_sysconfigdata")


def stdlib_dir() -> Path:
    """The standard library folder of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_selected(relpath: str) -> bool:
    """Whether a path relative to the stdlib folder belongs to the corpus (by name only)."""
    p = PurePosixPath(relpath)
    if p.suffix != ".py":
        return False
    for part in p.parts[:-1]:
        if part in EXCLUDED_DIRS or part.startswith(EXCLUDED_DIR_PREFIXES):
            return False
    return not p.name.startswith(EXCLUDED_FILE_PREFIXES)


def select_files(root: Path | str) -> list[str]:
    """Relative POSIX paths of the corpus files under ``root``, sorted; UTF-8 files only."""
    root = Path(root)
    chosen = []
    for path in root.rglob("*.py"):
        if not path.is_file() or path.is_symlink():
            continue
        rel = path.relative_to(root).as_posix()
        if not is_selected(rel):
            continue
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        chosen.append(rel)
    return sorted(chosen)


def split_of(index: int) -> str:
    """Split of the ``index``-th file (0-based) of the sorted selection."""
    return "heldout" if index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 else "train"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def archive_name(python_version: str) -> str:
    return f"python-stdlib-{python_version}.tar.gz"


def build_manifest(root: Path | str | None = None, python_version: str | None = None) -> dict:
    """The manifest of the corpus found under ``root`` (default: this Python's stdlib)."""
    root = Path(root) if root is not None else stdlib_dir()
    version = python_version or platform.python_version()
    files = []
    for i, rel in enumerate(select_files(root)):
        data = (root / rel).read_bytes()
        files.append({"path": rel, "size": len(data), "sha256": _sha256(data), "split": split_of(i)})
    lic = root / LICENSE_FILE
    license_entry = None
    if lic.is_file():
        data = lic.read_bytes()
        license_entry = {"path": LICENSE_FILE, "size": len(data), "sha256": _sha256(data)}
    n_held = sum(f["split"] == "heldout" for f in files)
    return {
        "name": "python-stdlib",
        "description": "Pure-Python sources of the CPython standard library, tests and generated data left out",
        "python_version": version,
        "python_implementation": platform.python_implementation(),
        "license": LICENSE_NAME,
        "license_file": license_entry,
        "archive": archive_name(version),
        "selection": {
            "glob": "**/*.py under the stdlib folder, sorted by relative POSIX path, valid UTF-8 only",
            "excluded_dirs": sorted(EXCLUDED_DIRS),
            "excluded_dir_prefixes": list(EXCLUDED_DIR_PREFIXES),
            "excluded_file_prefixes": list(EXCLUDED_FILE_PREFIXES),
            "holdout": f"file i (0-based, sorted) is held out when i % {HOLDOUT_EVERY} == {HOLDOUT_EVERY - 1}",
        },
        "n_files": len(files),
        "n_train_files": len(files) - n_held,
        "n_heldout_files": n_held,
        "total_bytes": sum(f["size"] for f in files),
        "train_bytes": sum(f["size"] for f in files if f["split"] == "train"),
        "heldout_bytes": sum(f["size"] for f in files if f["split"] == "heldout"),
        "files": files,
    }


def write_manifest(manifest: dict, path: Path | str = MANIFEST_PATH) -> Path:
    path = Path(path)
    path.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return path


def load_manifest(path: Path | str = MANIFEST_PATH) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


class CorpusError(RuntimeError):
    """The files on disk or in the tarball disagree with the manifest."""


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def pack(
    manifest: dict,
    root: Path | str | None = None,
    out_dir: Path | str = CORPUS_DIR,
) -> Path:
    """Tar the manifest's files (read from ``root``, checked against their sha256) into
    ``out_dir/<manifest["archive"]>``; deterministic bytes (sorted, mtime 0, no owner)."""
    root = Path(root) if root is not None else stdlib_dir()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = list(manifest["files"])
    if manifest.get("license_file"):
        entries.append(manifest["license_file"])
    bad = []
    blobs = {}
    for e in entries:
        p = root / e["path"]
        data = p.read_bytes() if p.is_file() else None
        if data is None or _sha256(data) != e["sha256"]:
            bad.append(e["path"])
        else:
            blobs[e["path"]] = data
    if bad:
        raise CorpusError(
            f"{len(bad)} file(s) under {root} differ from the manifest (made with Python "
            f"{manifest['python_version']}, this is {platform.python_version()}), e.g. {bad[:5]}; "
            "pack on a machine with that Python, or regenerate the manifest with `manifest`"
        )
    out = out_dir / manifest["archive"]
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
                _add_bytes(tar, "corpus_manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
                for e in sorted(entries, key=lambda e: e["path"]):
                    _add_bytes(tar, "files/" + e["path"], blobs[e["path"]])
    tmp.replace(out)
    return out


def default_tar_path(manifest: dict | None = None) -> Path:
    manifest = manifest or load_manifest()
    return CORPUS_DIR / manifest["archive"]


@dataclass(frozen=True)
class Document:
    path: str
    text: str


@dataclass(frozen=True)
class Corpus:
    manifest: dict
    train: list[Document]
    heldout: list[Document]

    @property
    def train_bytes(self) -> int:
        return sum(len(d.text.encode("utf-8")) for d in self.train)

    @property
    def heldout_bytes(self) -> int:
        return sum(len(d.text.encode("utf-8")) for d in self.heldout)


def load_corpus(tar_path: Path | str | None = None, manifest: dict | None = None) -> Corpus:
    """The documents of the tarball, in manifest order, each checked against its sha256.
    ``manifest`` defaults to the committed one; the tarball's own copy must agree with it."""
    manifest = manifest or load_manifest()
    tar_path = Path(tar_path) if tar_path is not None else default_tar_path(manifest)
    if not tar_path.is_file():
        raise CorpusError(f"no corpus tarball at {tar_path}: run `python -m training.corpus pack` "
                          "on a machine with Python " + manifest["python_version"])
    blobs = {}
    with tarfile.open(tar_path, mode="r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile():
                blobs[member.name] = tar.extractfile(member).read()
    inner = json.loads(blobs.get("corpus_manifest.json", b"{}"))
    if inner.get("files") != manifest["files"]:
        raise CorpusError(f"{tar_path} was packed from another manifest")
    train, heldout = [], []
    for e in manifest["files"]:
        data = blobs.get("files/" + e["path"])
        if data is None or _sha256(data) != e["sha256"]:
            raise CorpusError(f"{e['path']} is missing from {tar_path} or differs from the manifest")
        doc = Document(e["path"], data.decode("utf-8"))
        (heldout if e["split"] == "heldout" else train).append(doc)
    return Corpus(manifest, train, heldout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.corpus", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("manifest", help="write the manifest from a stdlib folder")
    m.add_argument("--stdlib", type=Path, default=None, help="default: this Python's stdlib")
    m.add_argument("--out", type=Path, default=MANIFEST_PATH)
    p = sub.add_parser("pack", help="tar the manifest's files into training/.corpus/")
    p.add_argument("--stdlib", type=Path, default=None)
    p.add_argument("--manifest", type=Path, default=MANIFEST_PATH)
    p.add_argument("--out-dir", type=Path, default=CORPUS_DIR)
    v = sub.add_parser("verify", help="check a tarball against the manifest")
    v.add_argument("--manifest", type=Path, default=MANIFEST_PATH)
    v.add_argument("--tar", type=Path, default=None)
    args = ap.parse_args(argv)

    if args.cmd == "manifest":
        man = build_manifest(args.stdlib)
        write_manifest(man, args.out)
        print(f"{args.out}: {man['n_files']} files ({man['n_train_files']} train, "
              f"{man['n_heldout_files']} held out), {man['total_bytes']} bytes, Python {man['python_version']}")
    elif args.cmd == "pack":
        man = load_manifest(args.manifest)
        out = pack(man, args.stdlib, args.out_dir)
        data = out.read_bytes()
        print(f"{out}: {len(data)} bytes, sha256 {_sha256(data)}")
    else:
        man = load_manifest(args.manifest)
        c = load_corpus(args.tar, man)
        print(f"ok: {len(c.train)} train files ({c.train_bytes} bytes), "
              f"{len(c.heldout)} held-out files ({c.heldout_bytes} bytes), Python {man['python_version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
