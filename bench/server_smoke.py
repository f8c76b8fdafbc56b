"""End-to-end check of `sparkinfer serve` on this machine's GPU (or CPU): start the server on
a free loopback port, send one chat completion and one streamed completion with the standard
library's HTTP client, print what came back and the timings, stop the server.

    python bench/server_smoke.py [--arch sm_90] [MODEL.gguf]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict[str, Any]) -> urllib.request.Request:
    return urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})


def _wait_healthy(base: str, server: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode} before answering /health")
        try:
            with urllib.request.urlopen(base + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise SystemExit(f"no /health answer within {seconds:.0f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", help="a .gguf file (default: the model shipped in the package)")
    p.add_argument("--arch", help="sm_90, sm_120, sm_121 or cpu (default: the GPU found, else cpu)")
    args = p.parse_args()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "sparkinfer.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += [args.model] if args.model else []
    cmd += ["--arch", args.arch] if args.arch else []
    server = subprocess.Popen(cmd)
    try:
        _wait_healthy(base, server, 120)
        t0 = time.perf_counter()
        chat = {"messages": [{"role": "user", "content": "Write a Python function that adds two numbers."}],
                "max_tokens": 48, "temperature": 0}
        with urllib.request.urlopen(_post(base + "/v1/chat/completions", chat), timeout=60) as r:
            reply = json.load(r)
        print(f"chat: {time.perf_counter() - t0:.3f} s, usage {reply['usage']}, "
              f"finish {reply['choices'][0]['finish_reason']}: {reply['choices'][0]['message']['content']!r}")
        t0 = time.perf_counter()
        first = None
        pieces = []
        stream = {"prompt": "import os\n", "max_tokens": 48, "temperature": 0, "stream": True}
        with urllib.request.urlopen(_post(base + "/v1/completions", stream), timeout=60) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                first = first or time.perf_counter() - t0
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
        print(f"stream: first piece {1e3 * (first or 0):.1f} ms, {len(pieces)} events in "
              f"{time.perf_counter() - t0:.3f} s: {''.join(pieces)!r}")
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            print(f"health after: {json.load(r)}")
    finally:
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
