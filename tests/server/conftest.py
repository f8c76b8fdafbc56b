"""One server per test module: the tiny model on the CPU behind uvicorn, in a thread, on a free
loopback port. `slow` makes each decode step take a fixed time while a test needs generations
that last (cancellation); `paused` holds the running generation (queueing)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import httpx
import pytest

from tests.server.tiny import load_tiny

QUEUE_SIZE = 2


@dataclass
class Server:
    url: str
    llm: Any
    app: Any
    step_delay: list[float]
    gate: threading.Event

    @property
    def worker(self) -> Any:
        return self.app.state.worker

    @contextlib.contextmanager
    def slow(self, seconds_per_step: float) -> Iterator[None]:
        self.step_delay[0] = seconds_per_step
        try:
            yield
        finally:
            self.step_delay[0] = 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the generation that runs (in its next step) until the block ends."""
        self.gate.clear()
        try:
            yield
        finally:
            self.gate.set()

    def record(self, request_id: str, timeout: float = 10.0) -> Any:
        """The worker's record of a request once it has finished."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in list(self.worker.history):
                if r.id == request_id:
                    return r
            time.sleep(0.02)
        raise AssertionError(f"request {request_id} did not finish within {timeout} s")

    def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.worker.running is not None or self.worker.waiting:
            assert time.monotonic() < deadline, "the server stayed busy"
            time.sleep(0.02)


@contextlib.contextmanager
def serving(llm: Any) -> Iterator[Server]:
    """`llm` behind uvicorn in a thread on a free loopback port; closes `llm` at the end."""
    import uvicorn

    from sparkinfer.server import create_app

    delay = [0.0]
    gate = threading.Event()
    gate.set()
    backend = llm.engine._backend
    step = backend.step

    def slow_step() -> None:
        if delay[0]:
            time.sleep(delay[0])
        gate.wait(30)
        step()

    backend.step = slow_step
    app = create_app(llm, queue_size=QUEUE_SIZE)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield Server(f"http://127.0.0.1:{port}", llm, app, delay, gate)
    finally:
        srv.should_exit = True
        thread.join(15)
        sock.close()
        llm.close()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with serving(load_tiny()) as s:
        yield s


@pytest.fixture()
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client
    server.wait_idle()
