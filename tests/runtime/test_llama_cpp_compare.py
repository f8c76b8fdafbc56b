"""`sparkinfer bench --compare llama.cpp`: llama-bench's recorded JSON (parsed, matched, tabled),
a llama-bench binary's invocations, the error paths, and llama-cpp-python's binding where it is
installed.

tests/runtime/data/llama-bench-real.json is `llama-bench -o json` output recorded on this
repository's tiny real test model (tests/runtime/conftest.py's write_real_model), two calls
joined into one list: `-t 2 --repack 0 -p 8 -n 0 -r 2` and `-t 2 --repack 0 -p 0 -n 4 -d 8 -r 2`,
llama-bench built from the llama.cpp (0c1e570) that llama-cpp-python 0.3.36 vendors, on a
development machine shared with other builds (hence its odd, noisy figures).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from sparkinfer.errors import LlamaCppError
from sparkinfer.runtime import llama_cpp_compare as llama
from tests.runtime.conftest import REPO

FIXTURE = Path(__file__).parent / "data" / "llama-bench-real.json"
BENCH_ARGS = ["--prompts", "8", "--depths", "8", "--gen", "4", "--reps", "2"]


def bench(model: Path, module: Path, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPARKINFER_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "sparkinfer.cli", "bench", str(model), "--arch", "cpu", "--module", str(module),
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cache, timeout=600)


def test_recorded_llama_bench_json_parses() -> None:
    records = json.loads(FIXTURE.read_text())
    parsed = llama.parse_llama_bench_json(FIXTURE.read_text(), "recorded")
    assert [t["test"] for t in parsed["tests"]] == ["pp8", "tg4 @ d8"]
    for record, test in zip(records, parsed["tests"]):
        assert (test["n_prompt"], test["n_gen"], test["n_depth"]) == (record["n_prompt"], record["n_gen"],
                                                                      record["n_depth"])
        assert test["tok_s"] == record["samples_ts"]
        assert test["tok_s_median"] == statistics.median(record["samples_ts"])
    assert parsed["source"].startswith(f"llama-bench build {records[0]['build_commit']}")
    assert parsed["n_batch"] == 2048 and parsed["reps"] == 2


@pytest.mark.parametrize(("text", "message"), [
    ("not json", "recorded is not llama-bench `-o json` output: Expecting value"),
    ("{}", "recorded is not llama-bench `-o json` output: expected a non-empty list of tests"),
    ('[{"n_prompt": 8, "n_gen": 0}]', "recorded: test 0 has no n_depth, samples_ts (not llama-bench `-o json` output?)"),
    ('[{"n_prompt": 0, "n_gen": 4, "n_depth": 8, "samples_ts": []}]', "recorded: test 0 (tg4 @ d8) has no samples"),
])
def test_unreadable_llama_bench_json_is_named(text: str, message: str) -> None:
    with pytest.raises(LlamaCppError) as e:
        llama.parse_llama_bench_json(text, "recorded")
    assert str(e.value).startswith(message)


def test_side_by_side_matches_tests_and_takes_the_ratio() -> None:
    ours = {"prefill": [{"tokens": 8, "tok_s_median": 40.0}, {"tokens": 16, "tok_s_median": 30.0}],
            "decode": [{"gen": 4, "depth": 8, "tok_s_median": 20.0}]}
    theirs = llama.parse_llama_bench_json(FIXTURE.read_text(), "recorded")
    pp8, tg = (t["tok_s_median"] for t in theirs["tests"])
    rows = llama.side_by_side(ours, theirs)
    assert [r["test"] for r in rows] == ["pp8", "pp16", "tg4 @ d8"]
    assert rows[0]["ratio"] == pytest.approx(40.0 / pp8) and rows[0]["llama_cpp_ms"] == pytest.approx(8e3 / pp8)
    assert rows[0]["sparkinfer_ms"] == pytest.approx(200.0)  # the whole 8-token prompt
    assert rows[1]["llama_cpp_tok_s"] is None and rows[1]["ratio"] is None  # llama.cpp did not run pp16
    assert rows[2]["ratio"] == pytest.approx(20.0 / tg) and rows[2]["sparkinfer_ms"] == pytest.approx(50.0)
    lines = llama.compare_table(ours, theirs).splitlines()
    assert lines[0].startswith("llama.cpp: llama-bench build") and "median of 2 reps" in lines[0]
    assert lines[1].split()[:4] == ["test", "SparkInfer", "tok/s", "llama.cpp"]
    assert lines[3].split() == ["pp16", "30.0", "-", "-", "533.333", "-"]
    assert lines[4].split()[:4] == ["tg4", "@", "d8", "20.0"]


def test_bench_compare_with_recorded_json(real_model: Path, real_cpu_module: Path, tmp_path: Path) -> None:
    proc = bench(real_model, real_cpu_module, tmp_path, *BENCH_ARGS, "--compare", "llama.cpp",
                 "--llama-bench", str(FIXTURE), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    rows = report["llama_cpp"]["side_by_side"]
    assert [r["test"] for r in rows] == ["pp8", "tg4 @ d8"]
    assert rows[0]["sparkinfer_tok_s"] == report["prefill"][0]["tok_s_median"]
    assert rows[1]["sparkinfer_tok_s"] == report["decode"][0]["tok_s_median"]
    for row, test in zip(rows, report["llama_cpp"]["tests"]):
        assert row["ratio"] == pytest.approx(row["sparkinfer_tok_s"] / test["tok_s_median"])


def _fake_llama_bench(path: Path, calls: Path, rc: int = 0) -> Path:
    """An executable answering like llama-bench -o json with the fixture's records of the tests
    it is asked for, and appending its arguments to `calls`."""
    path.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
with open({str(calls)!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
if {rc}:
    print("main: error: failed to load model", file=sys.stderr)
    sys.exit({rc})
get = lambda flag: [int(v) for v in args[args.index(flag) + 1].split(",")] if flag in args else [0]
records = json.load(open({str(FIXTURE)!r}))
print(json.dumps([r for r in records if r["n_prompt"] in get("-p") and r["n_gen"] in get("-n")
                  and r["n_depth"] in get("-d")]))
""")
    path.chmod(0o755)
    return path


def test_llama_bench_binary_runs_prefill_and_decode_apart(tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    binary = _fake_llama_bench(tmp_path / "llama-bench", calls)
    model = tmp_path / "m.gguf"
    got = llama.run_llama_bench(binary, model, llama.wanted_tests([8], [8], 4), 2, threads=3)
    assert [t["test"] for t in got["tests"]] == ["pp8", "tg4 @ d8"]
    common = ["-m", str(model), "-r", "2", "-t", "3", "-o", "json"] + ([] if llama.extra_buffers_ok() else
                                                                        ["--repack", "0"])
    assert [json.loads(line) for line in calls.read_text().splitlines()] == [
        common + ["-p", "8", "-n", "0"], common + ["-p", "0", "-n", "4", "-d", "8"]]


def test_extra_buffers_off_on_a_cpu_with_amx_tiles(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n")
    assert not llama.extra_buffers_ok(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert llama.extra_buffers_ok(cpuinfo)
    assert llama.extra_buffers_ok(tmp_path / "absent")


def test_llama_bench_failures_are_named(tmp_path: Path) -> None:
    tests = llama.wanted_tests([8], [8], 4)
    failing = _fake_llama_bench(tmp_path / "llama-bench", tmp_path / "calls.jsonl", rc=1)
    with pytest.raises(LlamaCppError, match=r"exited with 1: main: error: failed to load model$"):
        llama.run_llama_bench(failing, tmp_path / "m.gguf", tests, 2)
    with pytest.raises(LlamaCppError, match=r"^--llama-bench .*nowhere: no such file$"):
        llama.run_llama_bench(tmp_path / "nowhere", tmp_path / "m.gguf", tests, 2)
    plain = tmp_path / "notes.txt"
    plain.write_text("x")
    with pytest.raises(LlamaCppError, match=r"notes.txt is neither executable nor a .json file of its output$"):
        llama.run_llama_bench(plain, tmp_path / "m.gguf", tests, 2)


def test_missing_binding_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    with pytest.raises(LlamaCppError, match=r"^--compare llama.cpp: llama-cpp-python is not installed: install "
                       r"llama-cpp-python \(`pip install llama-cpp-python`"):
        llama.import_binding()


def test_bench_compare_argument_errors(tmp_path: Path) -> None:
    env = {**os.environ, "SPARKINFER_CACHE": str(tmp_path), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "sparkinfer.cli", "bench", "--arch", "cpu", "--llama-bench", str(FIXTURE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == "error: --llama-bench PATH is llama.cpp for --compare llama.cpp: give both\n"


def test_llama_cpp_python_is_imported_only_for_compare() -> None:
    code = "import sys, sparkinfer.cli, sparkinfer.runtime.bench; print('llama_cpp' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (pip install llama-cpp-python builds llama.cpp here)")
def test_bench_compare_through_the_binding(real_model: Path, real_cpu_module: Path, tmp_path: Path) -> None:
    proc = bench(real_model, real_cpu_module, tmp_path, *BENCH_ARGS, "--compare", "llama.cpp", "--json")
    assert proc.returncode == 0, proc.stderr
    theirs = json.loads(proc.stdout)["llama_cpp"]
    assert theirs["source"].startswith("llama-cpp-python ") and theirs["threads"] == llama.cores()
    assert (theirs["n_batch"], theirs["n_ubatch"], theirs["reps"]) == (2048, 512, 2)
    assert theirs["extra_buffers"] == llama.extra_buffers_ok()
    assert [t["test"] for t in theirs["tests"]] == ["pp8", "tg4 @ d8"]
    for row, test in zip(theirs["side_by_side"], theirs["tests"]):
        assert len(test["tok_s"]) == 2 and all(t > 0 for t in test["tok_s"])
        assert row["ratio"] == pytest.approx(row["sparkinfer_tok_s"] / test["tok_s_median"])
    assert "llama.cpp pp8:" in proc.stderr and "llama.cpp tg4 @ d8:" in proc.stderr
