"""Programmatic dependent launch (sparkinfer/compiler/dependent_launch.py) on a small chain of
kernels: the launch tag in every kernel's launch params and in the built library, griddepcontrol
at every kernel's entry in the CUDA source, nvcc for every arch, and on a GPU and in the CUDA
emulator (the `gpu` fixture) the chain against numpy; on a GPU also replayed from a CUDA graph
(on GPU machines the library comes prebuilt: `python -m tests.gpu_prebuild`). One kernel of the
chain has a weight to prefetch (PREFETCH_PIPELINE): its blocks' shares cover the weight once, and
its prefetch comes before its wait; with WEIGHTS_PIPELINE (GPU_PIPELINE, which the `gpu` fixture
builds with) it alone is launched programmatically, after plain launches that only let it start."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import s_tir, te, tirx

from sparkinfer.compiler import targets
from sparkinfer.compiler.dependent_launch import (
    LAUNCH_TAG,
    PREFETCH_ATTR,
    PREFETCH_PIPELINE,
    TIR_PIPELINE,
    WEIGHTS_PIPELINE,
    mark_kernel,
)

from cuda_emulator import kernel_definition
from cuda_testutil import CUDA_ARCHS, Gpu, assert_nvcc_compiles, cuda_source, gpu_fixture, gpu_only, main, module, needs_nvcc

N, THREADS = 4096, 128
# mirror_scaled's weight: 4000 bytes, not a multiple of the N / THREADS = 32 blocks' 16-byte shares
WEIGHTS = 1000
LAUNCH_PARAMS = "tirx.kernel_launch_params"
# The kernels `kernels_module` lowers to: mirror's, mirror_twice's two and mirror_scaled's.
KERNELS = ("mirror_kernel", "mirror_twice_kernel", "mirror_twice_kernel_1", "mirror_scaled_kernel")
UNMARKED = ("mirror_twice_kernel", "mirror_twice_kernel_1")  # no PREFETCH_ATTR
# The pipeline of the `gpu` fixture and of the library tests/gpu_prebuild.py makes for it.
GPU_PIPELINE = WEIGHTS_PIPELINE


def mirror_reference(x: np.ndarray) -> np.ndarray:
    return (x[::-1] * np.float32(0.5) + np.float32(1.0)).astype(np.float32)


def _mirrored(src: te.Tensor, name: str) -> te.Tensor:
    return te.compute((N,), lambda i: src[N - 1 - i] * tirx.const(0.5, "float32") + tirx.const(1.0, "float32"),
                      name=name)


def _bound(func: tirx.PrimFunc, blocks: tuple[str, ...], symbol: str) -> tirx.PrimFunc:
    """Each block a kernel of N / THREADS blocks of THREADS threads."""
    sch = s_tir.Schedule(func)
    for block in blocks:
        (i,) = sch.get_loops(sch.get_sblock(block))
        bx, tx = sch.split(i, [None, THREADS])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    return sch.mod["main"].with_attr("global_symbol", symbol)


def mirror() -> tirx.PrimFunc:
    """y[i] = x[N-1-i] / 2 + 1: block b reads what the last block but b of the launch before wrote.
    Marked as a decode step's kernel with no weights to prefetch (an empty PREFETCH_ATTR)."""
    x = te.placeholder((N,), "float32", name="x")
    return _bound(te.create_prim_func([x, _mirrored(x, "y")]), ("y",), "mirror").with_attr(PREFETCH_ATTR, [])


def mirror_twice() -> tirx.PrimFunc:
    """y = mirror(x), z = mirror(y): one call, two launches, the second reading the first's output.
    Not marked: as a kernel only the T-token steps call, which the prefetch pipelines leave plain."""
    x = te.placeholder((N,), "float32", name="x")
    y = _mirrored(x, "y")
    return _bound(te.create_prim_func([x, y, _mirrored(y, "z")]), ("y", "z"), "mirror_twice")


def mirror_scaled() -> tirx.PrimFunc:
    """y[i] = mirror(x)[i] * w[i % WEIGHTS], w marked for the L2 prefetch (as
    `dependent_launch.mark_weight_prefetch` marks a step's weights)."""
    x = te.placeholder((N,), "float32", name="x")
    w = te.placeholder((WEIGHTS,), "float32", name="w")
    y = te.compute((N,), lambda i: _mirrored(x, "m")[i] * w[i % WEIGHTS], name="y")
    func = te.create_prim_func([x, w, y])
    sch = s_tir.Schedule(func)
    sch.compute_inline(sch.get_sblock("m"))
    return _bound(sch.mod["main"], ("y",), "mirror_scaled").with_attr(PREFETCH_ATTR, ["w"])


def mirror_scaled_reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (mirror_reference(x) * np.resize(w, N)).astype(np.float32)


def kernels_module() -> tvm.IRModule:
    return module(mirror(), mirror_twice(), mirror_scaled())


def lowered_kernels(tir_pipeline: str) -> dict[str, tirx.PrimFunc]:
    """kernels_module's device kernels as `tir_pipeline` lowers them for sm_90."""
    lower, _, _ = tvm.tirx.get_tir_pipeline(tir_pipeline)
    mod = lower(tvm.tirx.transform.BindTarget(targets.target_for("sm_90"))(kernels_module()))
    return {gv.name_hint: f for gv, f in mod.functions.items() if f.attrs is not None and LAUNCH_PARAMS in f.attrs}


def test_every_kernel_gets_the_launch_tag_only_through_the_pipeline() -> None:
    marked = lowered_kernels(TIR_PIPELINE)
    assert sorted(marked) == sorted(KERNELS)
    for kernel in marked.values():
        assert list(kernel.attrs[LAUNCH_PARAMS]) == ["blockIdx.x", "threadIdx.x", LAUNCH_TAG]
    plain = lowered_kernels("default")
    assert all(list(k.attrs[LAUNCH_PARAMS]) == ["blockIdx.x", "threadIdx.x"] for k in plain.values())


def test_the_tag_goes_before_dynamic_shared_memory_and_marking_twice_changes_nothing() -> None:
    """TVM's CUDA runtime wants the dynamic-shared-memory tag last of a kernel's launch params."""
    kernel = tirx.PrimFunc([], tirx.Evaluate(0)).with_attr(
        LAUNCH_PARAMS, ["blockIdx.x", "threadIdx.x", "tirx.use_dyn_shared_memory"])
    marked = mark_kernel(kernel)
    assert list(marked.attrs[LAUNCH_PARAMS]) == ["blockIdx.x", "threadIdx.x", LAUNCH_TAG, "tirx.use_dyn_shared_memory"]
    assert mark_kernel(marked).same_as(marked)


@pytest.fixture(scope="module")
def source() -> str:
    return cuda_source(kernels_module(), "sm_90", TIR_PIPELINE)


def test_each_kernel_waits_then_lets_its_dependents_launch_before_anything_else(source: str) -> None:
    assert 'asm volatile("griddepcontrol.wait;"' in source
    assert 'asm volatile("griddepcontrol.launch_dependents;"' in source
    for name in KERNELS:
        body = kernel_definition(source, name)
        statements = body[body.index("{") + 1 :].split(";")
        assert [s.strip() for s in statements[:2]] == [
            "tvm_builtin_ptx_griddepcontrol_wait()", "tvm_builtin_ptx_griddepcontrol_launch_dependents()"], name
    assert "griddepcontrol" not in cuda_source(kernels_module(), "sm_90")
    assert "prefetch" not in source  # TIR_PIPELINE ignores the prefetch mark


def _prefetches(stmt: tirx.Stmt) -> list[tuple[tirx.Expr, tirx.Expr, tirx.Expr]]:
    """(guard, byte offset, bytes) of each bulk L2 prefetch in a lowered kernel's statements."""
    if isinstance(stmt, tirx.IfThenElse) and isinstance(stmt.then_case, tirx.Evaluate):
        call = stmt.then_case.value
        if isinstance(call, tvm.ir.Call) and call.op.name == "tirx.ptx.cp_async_bulk_prefetch":
            (load,) = call.args[0].args  # address_of(w[index])
            return [(stmt.condition, load.indices[0] * 4, call.args[1])]
    children = list(stmt.seq) if isinstance(stmt, tirx.SeqStmt) else \
        [getattr(stmt, name) for name in ("body", "then_case", "else_case") if getattr(stmt, name, None) is not None]
    return [found for child in children for found in _prefetches(child)]


def _at_block(expr: tirx.Expr, block: int) -> int:
    import tvm.sym  # here, not at import: the GPU machines' runtime-only TVM collects this file

    analyzer = tvm.sym.Analyzer()
    for var in tirx.analysis.undefined_vars(expr):
        analyzer.bind(var, tirx.const(block, var.ty.dtype))  # blockIdx.x, the only free variable
    return int(analyzer.simplify(expr))


def test_the_blocks_prefetch_the_weight_once_before_they_wait() -> None:
    kernels = lowered_kernels(PREFETCH_PIPELINE)
    for name, kernel in kernels.items():
        tags = ["blockIdx.x", "threadIdx.x"] + ([] if name in UNMARKED else [LAUNCH_TAG])
        assert list(kernel.attrs[LAUNCH_PARAMS]) == tags, name
    assert not any(_prefetches(kernels[name].body) for name in KERNELS[:3])
    unmarked = cuda_source(kernels_module(), "sm_90", PREFETCH_PIPELINE)
    assert all("griddepcontrol" not in kernel_definition(unmarked, name) for name in UNMARKED)
    (prefetch,) = _prefetches(kernels["mirror_scaled_kernel"].body)
    covered = []
    for b in range(N // THREADS):
        guard, offset, size = (_at_block(e, b) for e in prefetch)
        if guard:
            assert offset % 16 == 0 and size % 16 == 0 and size > 0
            covered.extend(range(offset, offset + size))
    assert covered == list(range(WEIGHTS * 4))  # 4000 bytes: every one once, in block order
    source = kernel_definition(cuda_source(kernels_module(), "sm_90", PREFETCH_PIPELINE), "mirror_scaled_kernel")
    entry = source.index("if (((int)threadIdx.x) == 0)")
    assert entry < source.index("cp_async_bulk_prefetch") < source.index("griddepcontrol_wait();") \
        < source.index("griddepcontrol_launch_dependents();") < source.index("y_ptr[")


def test_with_weights_only_the_kernel_with_a_prefetch_is_launched_programmatically() -> None:
    kernels = lowered_kernels(WEIGHTS_PIPELINE)
    assert list(kernels["mirror_scaled_kernel"].attrs[LAUNCH_PARAMS]) == ["blockIdx.x", "threadIdx.x", LAUNCH_TAG]
    assert _prefetches(kernels["mirror_scaled_kernel"].body)
    source = cuda_source(kernels_module(), "sm_90", WEIGHTS_PIPELINE)
    for name in KERNELS[:3]:
        assert list(kernels[name].attrs[LAUNCH_PARAMS]) == ["blockIdx.x", "threadIdx.x"], name
        body = kernel_definition(source, name)
        first = body[body.index("{") + 1:].split(";")[0].strip()
        assert (first == "tvm_builtin_ptx_griddepcontrol_launch_dependents()") == (name not in UNMARKED), name
        assert "griddepcontrol_wait" not in body and "prefetch" not in body
    assert kernel_definition(source, "mirror_scaled_kernel").count("griddepcontrol_wait();") == 1


def test_the_built_library_carries_the_tag_for_every_kernel() -> None:
    """What TVM's CUDA runtime reads at load time: each kernel's launch params, in the library."""
    with tempfile.TemporaryDirectory() as tmp, targets.source_only():
        library = Path(tmp) / "mirror.so"
        tvm.compile(kernels_module(), target=targets.target_for("sm_90"), tir_pipeline=TIR_PIPELINE
                    ).export_library(str(library))
        data = library.read_bytes()
    assert data.count(LAUNCH_TAG.encode()) == len(KERNELS)


@needs_nvcc
@pytest.mark.parametrize("pipeline", [TIR_PIPELINE, PREFETCH_PIPELINE, WEIGHTS_PIPELINE])
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_nvcc_compiles_the_marked_kernels(arch: str, pipeline: str) -> None:
    assert_nvcc_compiles(arch, cuda_source(kernels_module(), arch, pipeline))


gpu = gpu_fixture("dependent_launch", kernels_module, GPU_PIPELINE)


def test_the_chain_matches_numpy(gpu: Gpu) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(N).astype(np.float32)
    w = rng.standard_normal(WEIGHTS).astype(np.float32)
    y, z, once, scaled = (gpu.poisoned((N,)) for _ in range(4))
    gpu("mirror", gpu.tensor(x), once)
    gpu("mirror_twice", gpu.tensor(x), y, z)
    gpu("mirror_scaled", z, gpu.tensor(w), scaled)
    np.testing.assert_array_equal(once.numpy(), mirror_reference(x))
    np.testing.assert_array_equal(y.numpy(), mirror_reference(x))
    np.testing.assert_array_equal(z.numpy(), mirror_reference(mirror_reference(x)))
    np.testing.assert_array_equal(scaled.numpy(), mirror_scaled_reference(mirror_reference(mirror_reference(x)), w))


def test_the_chain_replays_from_a_cuda_graph(gpu: Gpu) -> None:
    """32 dependent launches run once (the warm-up), captured in one CUDA graph (programmatic
    edges, CUDA >= 12.3) and replayed three times: each launch reads what the one before wrote."""
    gpu_only(gpu, "a CUDA graph needs a GPU")
    from sparkinfer.runtime.cuda_graph import CapturedStep, CudaStream

    rng = np.random.default_rng(1)
    x = rng.standard_normal(N).astype(np.float32)
    a, b = gpu.tensor(x), gpu.poisoned((N,))
    launches, replays = 32, 3

    w = rng.uniform(0.9, 1.1, WEIGHTS).astype(np.float32)  # 64 products of them stay near 1
    w_dev = gpu.tensor(w)

    def chain(a: tvm.runtime.Tensor, b: tvm.runtime.Tensor) -> tvm.runtime.Tensor:
        for _ in range(launches // 2):
            gpu.library["mirror"](a, b)
            gpu.library["mirror_scaled"](b, w_dev, a)  # its weight prefetched before its wait
        return a

    stream = CudaStream(gpu.dev)
    try:
        captured = CapturedStep(stream, chain, [a, b], warmup=1)
        for _ in range(replays):
            captured.replay()
        stream.synchronize()
        captured.close()
    finally:
        stream.close()
    want = x
    for _ in range(launches // 2 * (1 + replays)):
        want = mirror_scaled_reference(mirror_reference(want), w)
    np.testing.assert_allclose(a.numpy(), want, rtol=1e-5)


if __name__ == "__main__":
    main(__doc__, "dependent_launch", kernels_module, GPU_PIPELINE)
