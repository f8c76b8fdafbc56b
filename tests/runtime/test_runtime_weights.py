"""Weights to the device (runtime/weights.py): a weight the step reads re-laid out (planar Q6_K)
is uploaded as that re-layout of the file's bytes, and a file that does not fit is named."""

from types import SimpleNamespace

import numpy as np
import pytest
import tvm
from gguf import GGMLQuantizationType as T

from sparkinfer.errors import CompiledModuleError
from sparkinfer.model.spec import LAYOUT_Q6_K_PLANAR, StepInput
from sparkinfer.quant import kquants
from sparkinfer.runtime.weights import upload_weights, weights_bytes


def model_of(name: str, rows: np.ndarray, shape: list[int]) -> SimpleNamespace:
    info = SimpleNamespace(name=name, data=rows, ggml_type=T.Q6_K, shape=shape)
    return SimpleNamespace(tensors={name: info}, path="model.gguf")


def test_a_planar_weight_is_uploaded_re_laid_out() -> None:
    rows = np.random.default_rng(5).integers(0, 256, (6, 3 * 210), dtype=np.uint8)
    inp = StepInput("output", "weight", "uint32", (6, 160), "output.weight", "Q6_K", LAYOUT_Q6_K_PLANAR)
    (arr,) = upload_weights(model_of("output.weight", rows, [768, 6]), [inp], tvm.cpu(), progress=False)
    np.testing.assert_array_equal(arr.numpy().view(np.uint8), kquants.q6_k_to_planar(rows))
    assert weights_bytes([inp]) == 6 * 640  # the device holds the padded rows


def test_a_planar_weight_of_another_size_names_both_counts() -> None:
    rows = np.zeros((6, 2 * 210), dtype=np.uint8)
    inp = StepInput("output", "weight", "uint32", (6, 160), "output.weight", "Q6_K", LAYOUT_Q6_K_PLANAR)
    message = r"holds 2520 bytes, but the compiled module takes it as uint32\[6, 160\] re-laid out as q6_k_planar " \
              r"\(3780 bytes in the file\)"
    with pytest.raises(CompiledModuleError, match=message):
        upload_weights(model_of("output.weight", rows, [512, 6]), [inp], tvm.cpu(), progress=False)
