"""The CPU device's thread count: one TVM thread per physical core unless the user set it."""

import os

from sparkinfer.runtime.device import physical_cores, use_every_core


def test_physical_cores_counts_cores_this_process_may_use() -> None:
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= physical_cores() <= allowed


def test_every_core_unless_the_user_chose(monkeypatch) -> None:
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    use_every_core()
    assert os.environ["TVM_NUM_THREADS"] == str(physical_cores())
    monkeypatch.setenv("TVM_NUM_THREADS", "3")
    use_every_core()
    assert os.environ["TVM_NUM_THREADS"] == "3"
