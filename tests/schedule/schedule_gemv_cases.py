"""Qwen3-30B-A3B GEMV shapes for the GPU test, built ahead of time into one library.

The GPU machines have runtime-only TVM: `python -m tests.gpu_prebuild --arch sm_90` builds
these cases (with every other GPU test's library) into compiled/gpu-tests/<arch>/
gemv_cases_<arch>.so, where the GPU test loads them from (cuda_testutil.load_library); where
TVM can compile and nothing is prebuilt, the test builds them itself. Alone:
    python tests/schedule/schedule_gemv_cases.py --arch sm_90 [--out DIR]
(sm_121 gives a .tar of aarch64 objects, which tvm.runtime.load_module links on the Spark.)
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from gguf import GGMLQuantizationType as T

from sparkinfer.kernels import gemv as G
from sparkinfer.kernels.testing import random_weights
from sparkinfer.schedule.gemv import GemvKnobs

from cuda_testutil import CUDA_ARCHS, export, gpu_tests_dir, scheduled

STEM = "gemv_cases"


@dataclass(frozen=True)
class GemvCase:
    name: str
    ggml_type: int  # a ggml type, or the weight format G.Q6_K_PLANAR
    n: int
    k: int
    knobs: GemvKnobs | None = None  # None: the rule's default

    def scheduled(self, arch: str = "sm_90") -> tvm.tirx.PrimFunc:
        return scheduled(G.gemv, "gemv", self.ggml_type, self.n, self.k, knobs=self.knobs, arch=arch)

    @property
    def symbol(self) -> str:
        return G.gemv_symbol(self.ggml_type, self.n, self.k)

    def inputs(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Host arrays: data (GGUF bytes, or planar Q6_K), x."""
        return {
            "data": random_weights(self.ggml_type, (self.n, self.k), rng),
            "x": rng.standard_normal(self.k, dtype=np.float32),
        }


CASES: tuple[GemvCase, ...] = (
    GemvCase("attn_q", T.Q4_K, 4096, 2048),
    GemvCase("attn_output", T.Q4_K, 2048, 4096),
    GemvCase("attn_v_q6_k", T.Q6_K, 512, 2048),
    GemvCase("attn_k_q5_k", T.Q5_K, 512, 2048),
    GemvCase("attn_k_q8_0", T.Q8_0, 512, 2048),
    GemvCase("attn_k_f16", T.F16, 512, 2048),
    GemvCase("attn_k_bf16", T.BF16, 512, 2048),
    GemvCase("ffn_gate_inp", T.F32, 128, 2048),
    # Non-default tilings: rows shared per thread, and a row count no block divides.
    GemvCase("rows_per_thread_2", T.Q4_K, 1000, 2048, knobs=GemvKnobs(32, 4, 2, 256, 0)),
    GemvCase("q6_k_rows_per_thread_4", T.Q6_K, 1024, 2048, knobs=GemvKnobs(16, 2, 4, 256, 0)),
    GemvCase("q6_k_rows_per_thread_2", T.Q6_K, 1024, 2048, knobs=GemvKnobs(16, 8, 2, 256, 0)),  # the LM head's
    GemvCase("attn_output_rows_per_thread_1", T.Q4_K, 2048, 4096, knobs=GemvKnobs(32, 4, 1, 256, 0)),
    # Block headers in 16-byte loads (the defaults of attn_q and attn_output) at 1 and 2 rows a
    # thread, and Q5_K's (same header).
    GemvCase("attn_output_vector_header_1", T.Q4_K, 2048, 4096, knobs=GemvKnobs(32, 1, 1, 1024, 1)),
    GemvCase("vector_header_rows_per_thread_2", T.Q4_K, 1000, 2048, knobs=GemvKnobs(32, 4, 2, 256, 1)),
    GemvCase("attn_k_q5_k_vector_header", T.Q5_K, 512, 2048, knobs=GemvKnobs(32, 4, 2, 64, 1)),
    # The upload's planar Q6_K (q6_k_layout="planar"): a Q4_K_M V, and rows shared per thread.
    GemvCase("attn_v_q6_k_planar", G.Q6_K_PLANAR, 512, 2048),
    GemvCase("q6_k_planar_rows_per_thread_4", G.Q6_K_PLANAR, 1024, 2048, knobs=GemvKnobs(16, 2, 4, 256, 0)),
)


@dataclass(frozen=True)
class GemvQkvCase:
    """A `gemv_qkv` launch: Q, K and V (or Q and K where n_v is 0) sharing x."""

    name: str
    ggml_type: T
    n_q: int
    n_k: int
    n_v: int
    k: int
    knobs: GemvKnobs | None = None  # None: the rule's default

    @property
    def rows(self) -> tuple[int, ...]:
        return (self.n_q, self.n_k, self.n_v) if self.n_v else (self.n_q, self.n_k)

    def scheduled(self, arch: str = "sm_90") -> tvm.tirx.PrimFunc:
        return scheduled(G.gemv_qkv, "gemv", self.ggml_type, self.n_q, self.n_k, self.n_v, self.k,
                         knobs=self.knobs, arch=arch)

    @property
    def symbol(self) -> str:
        return G.gemv_qkv_symbol(self.ggml_type, self.n_q, self.n_k, self.n_v, self.k)

    def inputs(self, rng: np.random.Generator) -> dict[str, object]:
        """Host arrays: datas (GGUF bytes of Wq, Wk[, Wv]), x."""
        return {
            "datas": [random_weights(self.ggml_type, (n, self.k), rng) for n in self.rows],
            "x": rng.standard_normal(self.k, dtype=np.float32),
        }


# Qwen3-30B-A3B attention inputs: 32 x 128 query rows, 4 x 128 key and value rows.
QKV_CASES: tuple[GemvQkvCase, ...] = (
    GemvQkvCase("attn_qkv_q4_k", T.Q4_K, 4096, 512, 512, 2048),
    GemvQkvCase("attn_qk_q4_k", T.Q4_K, 4096, 512, 0, 2048),  # Q4_K_M layers with a Q6_K V
    GemvQkvCase("attn_qkv_q6_k", T.Q6_K, 4096, 512, 512, 2048),
    GemvQkvCase("attn_qkv_q8_0", T.Q8_0, 4096, 512, 512, 2048),
    # The defaults take 4 rows a thread: 1 and 2 too (2: sm_90.json's tuned knobs).
    GemvQkvCase("attn_qkv_q4_k_rows_per_thread_1", T.Q4_K, 4096, 512, 512, 2048, knobs=GemvKnobs(32, 4, 1, 256, 0)),
    GemvQkvCase("attn_qk_q4_k_rows_per_thread_2", T.Q4_K, 4096, 512, 0, 2048, knobs=GemvKnobs(32, 2, 2, 64, 0)),
)


def cases_module() -> tvm.IRModule:
    funcs = {c.symbol: c.scheduled() for c in [*CASES, *QKV_CASES]}
    return tvm.IRModule(funcs)


def build_library(arch: str, out_dir: Path) -> Path:
    """Export the cases for `arch` into `out_dir`: a .so, or for the Spark (aarch64 host) a
    .tar of objects, which tvm.runtime.load_module links there."""
    return export(cases_module(), STEM, arch, out_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, choices=CUDA_ARCHS)
    parser.add_argument("--out", type=Path, help="default: compiled/gpu-tests/<arch>/, where the GPU test looks")
    args = parser.parse_args()
    print(build_library(args.arch, args.out or gpu_tests_dir(args.arch)))
