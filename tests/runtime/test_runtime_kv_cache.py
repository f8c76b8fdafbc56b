"""The runtime's step state: the attention's last-block counts (attention_merge="last_block")
start at zero, as the merged kernel needs (every launch leaves them at zero again)."""

from types import SimpleNamespace

import numpy as np
import tvm

from sparkinfer.gguf_file import preset_config, type_map
from sparkinfer.model.qwen3moe import decode_inputs
from sparkinfer.model.spec import ARRIVALS, ROUTER_ARRIVALS
from sparkinfer.runtime.kv_cache import KVCache, SyncWriter

TINY = preset_config("tiny")


class ZeroRecorder(SyncWriter):
    """SyncWriter that remembers which arrays it zeroed."""

    def __init__(self) -> None:
        self.zeroed: list[object] = []

    def zero(self, array: object) -> None:
        self.zeroed.append(array)
        super().zero(array)


def cache(attention_merge: str, router_merge: str = "separate") -> tuple[KVCache, ZeroRecorder]:
    inputs = decode_inputs(TINY, type_map(TINY, "q4_k_m"), attention_merge=attention_merge,
                           router_merge=router_merge)
    manifest = SimpleNamespace(page_size=64, max_pages=32, inputs=inputs,
                               kv=[i for i in inputs if i.role == "kv"])
    writer = ZeroRecorder()
    return KVCache(manifest, tvm.cpu(), context=128, model_context=TINY.context_length, writer=writer,
                   where="CPU"), writer


def test_the_counts_are_zeroed_at_allocation() -> None:
    kv, writer = cache("last_block")
    arrivals = kv.arrays[ARRIVALS]
    assert any(array is arrivals for array in writer.zeroed)
    np.testing.assert_array_equal(arrivals.numpy(), np.zeros(TINY.n_kv_heads, np.int32))


def test_the_routers_count_is_zeroed_at_allocation() -> None:
    kv, writer = cache("separate", router_merge="last_block")
    arrivals = kv.arrays[ROUTER_ARRIVALS]
    assert any(array is arrivals for array in writer.zeroed)
    np.testing.assert_array_equal(arrivals.numpy(), np.zeros(1, np.int32))
    assert ARRIVALS not in kv.arrays


def test_a_step_without_the_merge_has_no_counts() -> None:
    kv, _ = cache("separate")
    assert ARRIVALS not in kv.arrays and ROUTER_ARRIVALS not in kv.arrays
