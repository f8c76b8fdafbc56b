"""One worker thread runs the generations, one at a time, in the order they were accepted.

The event loop only validates, tokenizes and enqueues (`Worker.submit`, which refuses with
`QueueFull` once `queue_size` requests wait), then awaits the job's events: text deltas and a
final `Completion` (or an error), handed over with `loop.call_soon_threadsafe`. A job whose
client went away is cancelled (`Job.cancel`): skipped if it has not started, ended after the
current token if it has.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sparkinfer.api import LLM, Completion, TextStream

log = logging.getLogger("sparkinfer.server")


class QueueFull(Exception):
    pass


@dataclass
class JobRecord:
    """What became of a job (kept for /health and for tests)."""

    id: str
    seq: int  # arrival order: the n-th request accepted
    finish_reason: str  # stop | length | cancelled | error
    prompt_tokens: int
    completion_tokens: int
    queued_s: float
    run_s: float


@dataclass
class Job:
    id: str
    prompt: list[int]
    max_tokens: int
    options: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    accepted: float = field(default_factory=time.perf_counter)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _stream: TextStream | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    finished: bool = False
    seq: int = -1

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """From any thread: stop after the current token (or never start)."""
        with self._lock:
            self._cancelled.set()
            if self._stream is not None:
                self._stream.cancel()

    def attach(self, stream: TextStream) -> None:
        with self._lock:
            self._stream = stream
            if self._cancelled.is_set():
                stream.cancel()

    def emit(self, kind: str, value: Any) -> None:
        """Hand an event to the request's coroutine ("delta" (text, [TokenLogprob]), "done"
        Completion, "error" exc)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancel()


class Worker:
    def __init__(self, llm: LLM, queue_size: int = 16, history: int = 256) -> None:
        self.llm = llm
        self.queue_size = queue_size
        self._queue: queue.Queue[Job | None] = queue.Queue()  # bounded by `submit` (maxsize=0 is unbounded)
        self._thread: threading.Thread | None = None
        self.running: Job | None = None
        self.history: collections.deque[JobRecord] = collections.deque(maxlen=history)
        self.counts = collections.Counter()
        self._outstanding = 0  # accepted and not finished: waiting + running
        self._count_lock = threading.Lock()

    # -- lifetime ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="sparkinfer-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is running and waiting, then end the thread."""
        if self._thread is None:
            return
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                self._finish(job, "cancelled", None, time.perf_counter())
                job.emit("done", None)
        running = self.running
        if running is not None:
            running.cancel()
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    def cancel_all(self) -> None:
        """Cancel the running job and every waiting one (they end at once, their streams with
        [DONE]); safe from a signal handler."""
        for job in list(self._queue.queue):
            if job is not None:
                job.cancel()
        running = self.running
        if running is not None:
            running.cancel()

    # -- the queue --------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        """Enqueue `job`, or QueueFull when one runs and `queue_size` already wait."""
        with self._count_lock:
            if self._outstanding >= 1 + self.queue_size:
                self.counts["rejected"] += 1
                raise QueueFull(
                    f"the server is busy: one request is running and {self._outstanding - 1} are waiting "
                    f"(the queue holds {self.queue_size}); retry later")
            self._outstanding += 1
            job.seq = self.counts["accepted"]
            self.counts["accepted"] += 1
            self._queue.put_nowait(job)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self.running = job
            try:
                self._run(job)
            except BaseException as e:  # never let one request end the worker
                log.exception("generation %s failed", job.id)
                self._finish(job, "error", None, time.perf_counter())
                job.emit("error", e)
            finally:
                self.running = None

    def _run(self, job: Job) -> None:
        started = time.perf_counter()
        if job.cancelled:
            self._finish(job, "cancelled", None, started)
            job.emit("done", None)
            return
        stream = self.llm.start(job.prompt, job.max_tokens, **job.options)
        job.attach(stream)
        sent = 0  # logprobs entries handed over: each delta carries those of its tokens
        for delta in stream:
            entries = stream.logprobs[sent:]
            sent += len(entries)
            job.emit("delta", (delta, entries))
        completion = stream.completion
        assert completion is not None
        self._finish(job, completion.finish_reason, completion, started)
        job.emit("done", completion)

    def _finish(self, job: Job, reason: str, completion: Completion | None, started: float) -> None:
        if job.finished:
            return
        job.finished = True
        if self.running is job:  # before the job's last event, so a client told "done" never sees busy
            self.running = None
        with self._count_lock:
            self._outstanding -= 1
        self.counts[reason] += 1
        self.counts["finished"] += 1
        self.history.append(JobRecord(
            id=job.id, seq=job.seq, finish_reason=reason, prompt_tokens=len(job.prompt),
            completion_tokens=completion.completion_tokens if completion else 0,
            queued_s=started - job.accepted, run_s=time.perf_counter() - started))
