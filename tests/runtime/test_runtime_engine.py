"""The decode driver on the CPU: tokens against numpy references, device state bookkeeping,
and the errors a user can cause (context, memory, missing module, architecture)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sparkinfer.errors import (
    CompiledModuleError,
    ContextLengthError,
    OutOfMemoryError,
    UnsupportedArchitectureError,
    UnsupportedDeviceError,
)
from sparkinfer.runtime.engine import Engine
from tests.runtime import toy_step
from tests.runtime.conftest import REAL_CONFIG, TOY_CONFIG

PROMPT = [5, 17, 99, 3, 250, 42]
GIB = 1 << 30


@pytest.fixture(scope="module")
def toy(toy_model: Path, toy_cpu_module: Path) -> Engine:
    return Engine(toy_model, arch="cpu", module_dir=toy_cpu_module)


@pytest.fixture(scope="module")
def toy_ref(toy_model: Path) -> toy_step.ToyReference:
    from sparkinfer.gguf_file import GGUFModel

    m = GGUFModel.open(toy_model)
    return toy_step.ToyReference(TOY_CONFIG, {n: m.tensor_f32(n) for n in ("token_embd.weight", "output.weight")})


def device_pos(engine: Engine) -> int:
    return int(engine.kv.arrays["pos"].numpy()[0])


# -- the toy step: the driver's mechanics --------------------------------------------------


def test_greedy_tokens_and_logits_match_the_toy_reference(toy: Engine, toy_ref: toy_step.ToyReference) -> None:
    want = toy_ref.greedy(PROMPT, 30)
    gen = toy.generate(PROMPT, 30, stop_tokens=())
    assert list(gen) == want
    assert gen.stats.stop_reason == "length"
    assert gen.stats.prompt_tokens == len(PROMPT) and gen.stats.decode_steps == 29
    assert gen.stats.prefill_s > 0 and len(gen.stats.decode_times) == 29
    # The device advanced pos itself: prompt + every generated token but the last was fed.
    assert device_pos(toy) == toy.kv.n_tokens == len(PROMPT) + 29
    assert toy.kv.tokens == PROMPT + want[:-1]

    toy_ref.reset()
    expected = np.stack([toy_ref.step(t) for t in PROMPT])
    np.testing.assert_allclose(toy.forward(PROMPT), expected, rtol=1e-5, atol=1e-5)


def test_bench_mode_gives_the_same_tokens(toy: Engine, toy_ref: toy_step.ToyReference) -> None:
    gen = toy.generate(PROMPT, 12, stream=False)
    assert list(gen) == toy_ref.greedy(PROMPT, 12)
    assert gen.stats.decode_steps == 11 and gen.stats.decode_s > 0 and gen.stats.prefill_s > 0


def test_a_stop_token_ends_generation_and_the_cache_stays_consistent(
        toy: Engine, toy_ref: toy_step.ToyReference) -> None:
    want = toy_ref.greedy(PROMPT, 10)
    stop = want[4]
    gen = toy.generate(PROMPT, 10, stop_tokens=[stop])
    got = list(gen)
    assert got == want[: want.index(stop)]
    assert gen.stats.stop_reason == "stop"
    # Steps launched ahead of the stop token are accounted for: host mirror == device pos.
    assert device_pos(toy) == toy.kv.n_tokens
    assert toy.kv.tokens == (PROMPT + want)[: toy.kv.n_tokens]


def test_breaking_out_of_the_loop_keeps_the_cache_consistent(toy: Engine) -> None:
    gen = toy.generate(PROMPT, 20, stop_tokens=())
    for i, _ in enumerate(gen):
        if i == 2:
            break
    gen.close()
    assert device_pos(toy) == toy.kv.n_tokens >= len(PROMPT) + 2


def test_prefix_reuse_runs_only_the_new_tokens(toy: Engine, toy_ref: toy_step.ToyReference) -> None:
    first = list(toy.generate(PROMPT, 5, stop_tokens=()))
    longer = PROMPT + first + [7, 8]
    gen = toy.generate(longer, 6, stop_tokens=(), reuse_prefix=True)
    assert list(gen) == toy_ref.greedy(longer, 6)
    assert gen.stats.reused_tokens == len(PROMPT) + 4  # the last generated token was never fed
    # A different prompt reuses nothing and still decodes from scratch.
    gen = toy.generate([9, 9, 9], 4, stop_tokens=(), reuse_prefix=True)
    assert list(gen) == toy_ref.greedy([9, 9, 9], 4) and gen.stats.reused_tokens == 0


def test_context_overflow_names_both_numbers(toy_model: Path, toy_cpu_module: Path) -> None:
    engine = Engine(toy_model, arch="cpu", module_dir=toy_cpu_module, context=40)
    assert engine.capacity == 40
    with pytest.raises(ContextLengthError, match=r"prompt \(6 tokens\) \+ max_tokens \(35\) = 41 tokens exceeds "
                                                 r"the context of 40 tokens \(the model's context_length is 128\)"):
        engine.generate(PROMPT, 35)
    assert list(engine.generate(PROMPT, 34, stop_tokens=()))  # exactly full is fine
    with pytest.raises(ContextLengthError, match="context 500 exceeds the model's context_length of 128 tokens"):
        Engine(toy_model, arch="cpu", module_dir=toy_cpu_module, context=500)


def test_out_of_memory_for_weights_says_needed_and_free(toy_model: Path, toy_cpu_module: Path) -> None:
    with pytest.raises(OutOfMemoryError) as e:
        Engine(toy_model, arch="cpu", module_dir=toy_cpu_module, memory_info=memory(200 << 20, total=8 * GIB))
    assert str(e.value) == (
        f"not enough host memory for the weights of {toy_model}: 150.00 KiB needed (+ 256.00 MiB kept for the "
        f"step's buffers), but only 200.00 MiB of 8.00 GiB is free"
    )


def memory(*free: int, total: int = GIB):
    """A memory_info double: the free bytes seen at each call (weights first, then the KV cache)."""
    calls = iter(free)
    return lambda: (next(calls), total)


def test_kv_cache_beyond_free_memory(toy_model: Path, toy_cpu_module: Path) -> None:
    reserve = 256 << 20
    # 2 layers x K,V x 16 tokens x 1 head x 32 dims x 2 bytes = 4 KiB a page; 128 tokens = 8 pages.
    with pytest.raises(OutOfMemoryError) as e:
        Engine(toy_model, arch="cpu", module_dir=toy_cpu_module, context=128,
               memory_info=memory(GIB, reserve + 7 * 4096))
    assert str(e.value) == (
        "not enough host memory for a KV cache of 128 tokens: 32.00 KiB needed (8 pages of 16 tokens, 4.00 KiB "
        "each, + 256.00 MiB kept for the step's buffers), but only 256.03 MiB of 1.00 GiB is free after the "
        "weights; at most 112 tokens fit"
    )
    # The default context (the model's 128) shrinks to what fits instead, and says so.
    said: list[str] = []
    engine = Engine(toy_model, arch="cpu", module_dir=toy_cpu_module, memory_info=memory(GIB, reserve + 5 * 4096 + 100),
                    log=said.append)
    assert engine.capacity == 5 * 16 and engine.kv.n_pages == 5
    assert said == ["KV cache: 80 tokens (20.00 KiB), not 128: that is what fits in free memory",
                    # the toy step has no T-token step, and the fallback says so
                    "the cpu module has no T-token step: prompts are prefilled token by token "
                    "(the decode step in a loop)"]
    with pytest.raises(ContextLengthError, match="exceeds the context of 80 tokens"):
        engine.generate(PROMPT, 75)


def test_the_module_workspace_is_kept_free_beside_the_kv_cache(toy_model: Path, toy_cpu_module: Path,
                                                                tmp_path: Path) -> None:
    """What the module's functions allocate (its manifest's workspace_bytes, the full-size
    model's 2048-token score alone 1.2 GiB) is reserved on top of the 256 MiB: a KV cache that
    fits only without it is refused, naming the larger reserve."""
    module = tmp_path / "toy-cpu"
    shutil.copytree(toy_cpu_module, module)
    manifest = json.loads((module / "manifest.json").read_text())
    manifest["workspace_bytes"] = 1 << 20
    (module / "manifest.json").write_text(json.dumps(manifest))
    reserve = 256 << 20
    with pytest.raises(OutOfMemoryError, match=r"\+ 257\.00 MiB kept for the step's buffers.*at most 0 tokens fit"):
        Engine(toy_model, arch="cpu", module_dir=module, context=128, memory_info=memory(GIB, reserve + 8 * 4096))
    engine = Engine(toy_model, arch="cpu", module_dir=module, context=128,
                    memory_info=memory(GIB, reserve + (1 << 20) + 8 * 4096))
    assert engine.capacity == 128


def test_no_module_and_no_compiler(real_model: Path, tmp_path: Path) -> None:
    empty = tmp_path / "compiled"
    empty.mkdir()
    with pytest.raises(CompiledModuleError) as e:
        Engine(real_model, arch="cpu", search_roots=[empty], cache=empty, compile=False)
    assert str(e.value) == (
        f"no compiled module for cpu at {empty / 'cpu'} and no TVM compiler to build one (compilation disabled): "
        f"run `sparkinfer compile ...` on a machine with full TVM"
    )


def test_a_module_for_another_model_is_refused(toy_model: Path, real_cpu_module: Path) -> None:
    with pytest.raises(CompiledModuleError, match="does not fit .*toy.gguf: built for other hyper-parameters"):
        Engine(toy_model, arch="cpu", module_dir=real_cpu_module)


def test_unsupported_model_architecture(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'llama': SparkInfer runs "
                                                           "qwen3moe, qwen3"):
        Engine(path, arch="cpu")


def test_unknown_or_absent_device_arch(toy_model: Path) -> None:
    with pytest.raises(UnsupportedDeviceError, match="unknown arch 'sm_89': SparkInfer targets sm_90, sm_120, "
                                                     "sm_121, cpu"):
        Engine(toy_model, arch="sm_89")
    from sparkinfer.runtime.device import cuda_available

    if not cuda_available():
        with pytest.raises(UnsupportedDeviceError, match="--arch sm_90 needs an NVIDIA GPU, and none was found"):
            Engine(toy_model, arch="sm_90")


def test_prompt_errors(toy: Engine) -> None:
    from sparkinfer.errors import SparkInferError

    with pytest.raises(SparkInferError, match="the prompt is empty"):
        toy.generate([], 4)
    with pytest.raises(SparkInferError, match="token id 300 is outside the vocabulary of 300 tokens"):
        toy.generate([1, 300], 4)
    gen = toy.generate(PROMPT, 0)
    assert list(gen) == [] and gen.stats.stop_reason == "length"


# -- the real step of a tiny decisive model -------------------------------------------------


def test_real_step_greedy_tokens_match_the_numpy_reference(real_model: Path, real_cpu_module: Path) -> None:
    from sparkinfer.gguf_file import GGUFModel
    from tests.runtime.conftest import f16_cache_reference

    model = GGUFModel.open(real_model)
    ref = f16_cache_reference(model.config, model)
    prompt = [11, 200, 37, 5, 480]
    want = ref.greedy_generate(prompt, 16)
    engine = Engine(model, arch="cpu", module_dir=real_cpu_module)
    assert engine.config == REAL_CONFIG
    assert list(engine.generate(prompt, 16, stop_tokens=())) == want
    ref.reset()
    np.testing.assert_allclose(engine.forward(prompt), ref.prefill(prompt), rtol=2e-3, atol=2e-3)
