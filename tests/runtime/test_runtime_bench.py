"""`sparkinfer bench` on the CPU with the tiny real model: the table and the JSON object."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runtime.conftest import REPO


def bench(model: Path, module: Path, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPARKINFER_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "sparkinfer.cli", "bench", str(model), "--arch", "cpu", "--module", str(module),
           "--gen", "4", "--reps", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cache, timeout=300)


def test_bench_json_has_every_number(real_model: Path, real_cpu_module: Path, tmp_path: Path) -> None:
    proc = bench(real_model, real_cpu_module, tmp_path, "--prompts", "12,8", "--depths", "16,8", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["arch"] == "cpu" and report["card"].startswith("CPU")
    assert report["module_key"] == real_cpu_module.name and report["tvm_version"]
    assert report["mode"] == "device-loop" and report["timer"] == "host-clock" and report["cuda_graph"] is False
    assert (report["gen"], report["prompts"], report["reps"], report["warmup_reps"]) == (4, [8, 12], 2, 1)
    assert [pp["tokens"] for pp in report["prefill"]] == [8, 12]
    for pp in report["prefill"]:
        assert len(pp["ms"]) == len(pp["tok_s"]) == 2
        assert pp["tok_s_min"] <= pp["tok_s_median"] <= pp["tok_s_max"]
        assert abs(pp["ttft_ms_median"] * pp["tok_s_median"] - pp["tokens"] * 1e3) < 1e-6
    assert "llama_cpp" not in report
    assert [d["depth"] for d in report["decode"]] == [8, 16]
    for d in report["decode"]:
        assert d["gen"] == 4 and len(d["tok_s"]) == 2 and all(t > 0 for t in d["tok_s"])
        assert d["tok_s_min"] <= d["tok_s_median"] <= d["tok_s_max"]
        assert abs(d["ms_per_token_median"] * d["tok_s_median"] - 1e3) < 1e-6
        assert d["fill_ms"] > 0 and d["reused_tokens"] == [d["depth"] - 1] * 2


def test_bench_table_and_sync_every_token(real_model: Path, real_cpu_module: Path, tmp_path: Path) -> None:
    proc = bench(real_model, real_cpu_module, tmp_path, "--prompts", "8", "--depths", "8", "--sync-every-token")
    assert proc.returncode == 0, proc.stderr
    head, columns, pp, tg = proc.stdout.strip().splitlines()
    assert "| cpu |" in head and "sync-every-token, host-clock" in head and "median of 2 reps" in head
    assert columns.split() == ["test", "depth", "tok/s", "ms/token", "min", "tok/s", "max", "tok/s", "first-token", "ms"]
    assert pp.split()[:2] == ["pp8", "0"] and tg.split()[:2] == ["tg4", "8"]
    assert float(tg.split()[2]) > 0


def test_bench_errors_are_one_line(real_model: Path, real_cpu_module: Path, tmp_path: Path) -> None:
    proc = bench(real_model, real_cpu_module, tmp_path, "--prompts", "8", "--depths", "1000")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr == "error: --depths 1000: each depth + 5 tokens must fit in the model's context of 256 tokens\n"


def test_default_sizes_are_clipped_to_the_context_and_given_ones_refused() -> None:
    from sparkinfer.errors import SparkInferError
    from sparkinfer.runtime.bench import plan_sizes

    notes: list[str] = []
    assert plan_sizes(None, None, 128, 5, 1024, notes.append) == ([512], [128]) and notes == []
    assert plan_sizes(None, None, 4, 5, 256, notes.append) == ([], [128])
    assert notes == ["left out of the default tests: pp512 (the model's context holds 256 tokens)"]
    for prompts, depths, message in [
            ([1000, 8], None, "--prompts 1000: each prompt + 1 generated token must fit in the model's context of "
                              "256 tokens"),
            (None, [8, 300], "--depths 300: each depth + 5 tokens must fit in the model's context of 256 tokens"),
            ([0], None, "--prompts, --gen, --reps and every depth must be >= 1")]:
        with pytest.raises(SparkInferError) as e:
            plan_sizes(prompts, depths, 4, 5, 256, notes.append)
        assert str(e.value) == message
    with pytest.raises(SparkInferError, match=r"^the model's context of 256 tokens holds none of the default depths"):
        plan_sizes(None, None, 200, 5, 256, notes.append)
