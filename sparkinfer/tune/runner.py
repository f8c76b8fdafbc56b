"""Time the candidates of a tuning bundle on this machine: `python -m sparkinfer.tune.runner DIR`.

The measuring half of two-phase tuning (`sparkinfer tune --emit DIR` builds the bundle where
the compiler is, this runs where the device is, `--ingest DIR` records the results), and the
measuring step of one-phase tuning (`sparkinfer tune`), which calls `run_bundle` on its own
bundles. Imports nothing from TVM's compiler half, so it runs with runtime-only TVM.

Bundle (written by sparkinfer/tune/bundle.py): `index.json` lists the kernels (an .npz of one
valid input set each, in parameter order) and the candidates (a library each, exporting
"main"); this adds `results.json`: per candidate the per-call times in microseconds (one per
sample) or the error that stopped it, plus the device and versions that measured.

How a candidate is timed: the input set is copied until what the calls on the copies read (a
kernel's `read_bytes`, or its whole input set) adds up to at least the bundle's `rotate_bytes`
(the device's last-level cache, so a call does not find its operands left in cache by the
previous one; at most `MAX_COPIES`, and at most `MAX_COPY_BYTES` in all); after `WARMUP` calls, each of `samples`
samples times `calls` consecutive calls, each on the next copy, and divides. CUDA: events on
one stream around the calls (sparkinfer/runtime/cudart.py); cpu: the host clock. The number
of calls per sample is chosen so a sample lasts about `SAMPLE_SECONDS`. The median sample is
the candidate's time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sparkinfer.errors import SparkInferError

INDEX, RESULTS = "index.json", "results.json"
FORMAT = "sparkinfer-tune-bundle/1"
WARMUP = 3
SAMPLES = 7
SAMPLE_SECONDS = 2e-3
MAX_CALLS = 1000
MAX_COPIES = 64
MAX_COPY_BYTES = 4 << 30
# An input array bigger than this (a full-size model's expert weights, its LM head, a long KV
# cache) travels as its leading rows and is tiled back to its shape where it is timed: the
# bundle stays small enough to carry, and every value is still one the input maker made.
SAMPLE_BYTES = 1 << 16

Log = Callable[[str], None]


def versions() -> dict[str, str]:
    """The TVM and SparkInfer versions of this process (runtime-only TVM reports its own)."""
    import tvm

    import sparkinfer

    return {"tvm": str(tvm.__version__), "sparkinfer": sparkinfer.__version__}


def read_index(directory: Path) -> dict[str, Any]:
    path = directory / INDEX
    if not path.is_file():
        raise SparkInferError(f"{directory} is not a tuning bundle: it has no {INDEX}")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise SparkInferError(f"{path} is not a {FORMAT} index (format {index.get('format')!r})")
    return index


class _Timer:
    """Times `calls` calls of `step(i)`; host clock on the CPU, CUDA events on a GPU."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.cuda = device.is_cuda
        if self.cuda:
            from sparkinfer.runtime.cudart import EVENT_DEFAULT, cudart

            self.rt = cudart()
            self.rt.set_device(device.index)
            self.stream = device.tvm_device.create_raw_stream()
            device.tvm_device.set_raw_stream(self.stream)
            self.start = self.rt.event_create(EVENT_DEFAULT)
            self.end = self.rt.event_create(EVENT_DEFAULT)

    @property
    def name(self) -> str:
        return "cuda-events" if self.cuda else "host-clock"

    def seconds(self, step: Callable[[int], None], calls: int) -> float:
        if self.cuda:
            self.rt.event_record(self.start, self.stream)
            for i in range(calls):
                step(i)
            self.rt.event_record(self.end, self.stream)
            self.rt.event_synchronize(self.end)
            return self.rt.event_elapsed_ms(self.start, self.end) / 1e3 / calls
        begin = time.perf_counter()
        for i in range(calls):
            step(i)
        return (time.perf_counter() - begin) / calls

    def sync(self) -> None:
        if self.cuda:
            self.rt.stream_synchronize(self.stream)


def copy_count(arrays: list[np.ndarray], rotate_bytes: int, read_bytes: int | None = None) -> int:
    """How many copies of the input set `arrays` a candidate is timed on: enough that the
    calls on them read `rotate_bytes` (`read_bytes` a call; None: all of `arrays`)."""
    size = max(1, sum(a.nbytes for a in arrays))
    read = max(1, read_bytes or size)
    return max(1, min(MAX_COPIES, -(-rotate_bytes // read), MAX_COPY_BYTES // size))


def _copies(arrays: list[np.ndarray], count: int, tvm_device: Any) -> list[list[Any]]:
    import tvm

    return [[tvm.runtime.tensor(a, tvm_device) for a in arrays] for _ in range(count)]


def sample_inputs(arrays: list[np.ndarray]) -> tuple[list[np.ndarray], dict[str, list[int]]]:
    """What a bundle stores of an input set: each array over `SAMPLE_BYTES` cut to its leading
    innermost rows (whole rows: quantized blocks stay whole; a vector of floats, such as
    logits, to its leading elements; integer vectors, ids and counts, stay whole), and the full
    shapes of the cut ones by argument name (`expand_inputs` undoes it)."""
    stored, tiled = [], {}
    for j, a in enumerate(arrays):
        if (a.ndim >= 2 or a.dtype.kind == "f") and a.nbytes > SAMPLE_BYTES:
            rows = a.reshape(-1, a.shape[-1]) if a.ndim >= 2 else a  # innermost rows: one expert is ~1 MB
            stored.append(np.ascontiguousarray(rows[: max(1, SAMPLE_BYTES // (rows[0].nbytes or 1))]))
            tiled[f"arg{j}"] = list(a.shape)
        else:
            stored.append(a)
    return stored, tiled


def expand_inputs(stored: list[np.ndarray], tiled: dict[str, list[int]]) -> list[np.ndarray]:
    """The input set of a bundle's kernel: each cut array repeated, row after row, to its full shape."""
    return [np.resize(a, tiled[f"arg{j}"]) if f"arg{j}" in tiled else a for j, a in enumerate(stored)]


def load_inputs(directory: Path, kernel: dict[str, Any]) -> list[np.ndarray]:
    with np.load(directory / kernel["inputs"]) as npz:
        stored = [npz[f"arg{i}"] for i in range(len(npz.files))]
    return expand_inputs(stored, kernel.get("tiled", {}))


def time_candidate(library: Path, arrays: list[np.ndarray], timer: _Timer, rotate_bytes: int,
                   samples: int = SAMPLES, read_bytes: int | None = None) -> list[float]:
    """Per-call seconds of `library`'s "main", one per sample (see the module docstring)."""
    import tvm

    func = tvm.runtime.load_module(str(library))["main"]
    sets = _copies(arrays, copy_count(arrays, rotate_bytes, read_bytes), timer.device.tvm_device)

    def step(i: int) -> None:
        func(*sets[i % len(sets)])

    for i in range(WARMUP):
        step(i)
    timer.sync()
    estimate = max(timer.seconds(step, 1), 1e-7)
    calls = int(min(MAX_CALLS, max(len(sets), SAMPLE_SECONDS / estimate)))
    return [timer.seconds(step, calls) for _ in range(samples)]


def run_bundle(directory: str | Path, *, samples: int = SAMPLES, log: Log | None = None) -> dict[str, Any]:
    """Time every candidate that built; writes and returns results.json's content."""
    from sparkinfer.runtime.device import open_device

    directory = Path(directory)
    log = log or (lambda message: None)
    index = read_index(directory)
    device = open_device(index["arch"])
    timer = _Timer(device)
    inputs: dict[str, list[np.ndarray]] = {}
    results: dict[str, dict[str, Any]] = {}
    kernels = {k["key"]: k for k in index["kernels"]}
    for candidate in index["candidates"]:
        key = candidate["kernel"]
        if candidate.get("build_error"):
            results[candidate["id"]] = {"times_us": None, "error": f"build: {candidate['build_error']}"}
            continue
        if key not in inputs:
            inputs[key] = load_inputs(directory, kernels[key])
        try:
            secs = time_candidate(directory / candidate["library"], inputs[key], timer, int(index["rotate_bytes"]),
                                  samples, kernels[key].get("read_bytes"))
            results[candidate["id"]] = {"times_us": [s * 1e6 for s in secs], "error": None}
            log(f"{candidate['id']}: {statistics.median(secs) * 1e6:.2f} us")
        except Exception as e:  # a candidate that fails to load or run is a result, not a crash
            results[candidate["id"]] = {"times_us": None, "error": f"{type(e).__name__}: {e}"}
            log(f"{candidate['id']}: failed: {type(e).__name__}: {e}")
    out = {"device": device.name, "timer": timer.name, "samples": samples, "made_by": versions(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": results}
    (directory / RESULTS).write_text(json.dumps(out, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparkinfer.tune.runner",
                                     description="time a tuning bundle's candidates on this machine")
    parser.add_argument("bundle", type=Path, help="a directory written by `sparkinfer tune --emit`")
    parser.add_argument("--samples", type=int, default=SAMPLES, help=f"timed samples per candidate (default {SAMPLES})")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        out = run_bundle(args.bundle, samples=args.samples, log=None if args.quiet else print)
    except SparkInferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    failed = sum(r["error"] is not None for r in out["results"].values())
    print(f"{args.bundle}: timed {len(out['results']) - failed} candidates on {out['device']}, {failed} failed; "
          f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
