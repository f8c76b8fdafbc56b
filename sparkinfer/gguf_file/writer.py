"""Writing Qwen3 / Qwen3-MoE GGUF files that llama.cpp and transformers load.

Tensor infos go out first and tensor data follows one tensor at a time, so a file of any
size is written while holding a single tensor in memory.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, LlamaFileType
from tqdm import tqdm

from sparkinfer import quant
from sparkinfer.errors import MissingTensorError, TensorShapeError
from sparkinfer.gguf_file.config import ModelConfig
from sparkinfer.gguf_file.layout import FILE_TYPES, TensorSpec, tensor_nbytes, tensor_specs, type_map
from sparkinfer.tokenizer import VocabSpec

T = GGMLQuantizationType

# general.file_type for a hand-made type map: llama.cpp names a file after its commonest weight type.
_MOSTLY: dict[GGMLQuantizationType, LlamaFileType] = {
    T.F16: LlamaFileType.MOSTLY_F16,
    T.BF16: LlamaFileType.MOSTLY_BF16,
    T.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    T.Q4_K: LlamaFileType.MOSTLY_Q4_K_M,
    T.Q5_K: LlamaFileType.MOSTLY_Q5_K_M,
    T.Q6_K: LlamaFileType.MOSTLY_Q6_K,
}

# A tensor's bytes: uint8[*shape[:-1], row_bytes], as sparkinfer.quant.quantize returns them.
Encoder = Callable[[TensorSpec, GGMLQuantizationType], np.ndarray]
TypeChoice = str | Mapping[str, GGMLQuantizationType]


@dataclass(frozen=True)
class PlannedTensor:
    spec: TensorSpec
    ggml_type: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.ggml_type, self.spec.shape)

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return (*self.spec.shape[:-1], quant.quant_format(self.ggml_type, self.spec.name).row_bytes(self.spec.row_len))


def resolve_types(config: ModelConfig, types: TypeChoice) -> dict[str, GGMLQuantizationType]:
    """A file type name ("q4_k_m", ...) or an explicit name -> type map, checked against the layout."""
    if isinstance(types, str):
        return type_map(config, types)
    resolved = dict(types)
    for spec in tensor_specs(config):
        if spec.name not in resolved:
            raise MissingTensorError(f"the type map gives no type for tensor '{spec.name}'")
        quant.quant_format(resolved[spec.name], spec.name).row_bytes(spec.row_len)
    return resolved


def file_type_of(types: TypeChoice) -> LlamaFileType:
    if isinstance(types, str):
        return FILE_TYPES[types]
    weight_types = Counter(t for t in types.values() if t != T.F32)
    if not weight_types:
        return LlamaFileType.ALL_F32
    return _MOSTLY.get(weight_types.most_common(1)[0][0], LlamaFileType.GUESSED)


def write_model(
    path: str | os.PathLike[str],
    config: ModelConfig,
    weights: Mapping[str, np.ndarray],
    vocab: VocabSpec,
    types: TypeChoice = "f32",
    *,
    name: str = "sparkinfer",
    progress: bool = False,
) -> None:
    """Quantize float weights (GGUF tensor names -> float32 arrays in numpy order) into a GGUF."""
    for spec in tensor_specs(config):
        if spec.name not in weights:
            raise MissingTensorError(f"no weights given for tensor '{spec.name}'")
        found = tuple(np.shape(weights[spec.name]))
        if found != spec.shape:
            raise TensorShapeError(f"weights for tensor '{spec.name}' have shape {found}, expected {spec.shape}")

    def encode(spec: TensorSpec, ggml_type: GGMLQuantizationType) -> np.ndarray:
        return quant.quantize(ggml_type, np.asarray(weights[spec.name], dtype=np.float32))

    write_gguf(path, config, vocab, types, encode, name=name, progress=progress)


def write_gguf(
    path: str | os.PathLike[str],
    config: ModelConfig,
    vocab: VocabSpec,
    types: TypeChoice,
    encode: Encoder,
    *,
    name: str,
    progress: bool = False,
) -> None:
    """Write a complete GGUF whose tensor bytes come from `encode`, called once per tensor in order.

    The file appears under `path` only once complete: an interrupted write leaves no
    truncated model behind.
    """
    resolved = resolve_types(config, types)
    plan = [PlannedTensor(spec, resolved[spec.name]) for spec in tensor_specs(config)]
    metadata = _file_metadata(config, vocab, name, file_type_of(types), plan)
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    writer = GGUFWriter(partial, config.arch)
    try:
        for key, value in metadata.items():
            writer.add_key_value(key, value, *_value_type(key, value))
        for tensor in plan:
            writer.add_tensor_info(tensor.spec.name, tensor.byte_shape, np.dtype(np.uint8), tensor.nbytes, tensor.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_data(writer, plan, encode, progress, path.name)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(partial, path)


def _write_data(writer: GGUFWriter, plan: list[PlannedTensor], encode: Encoder, progress: bool, label: str) -> None:
    with tqdm(total=sum(t.nbytes for t in plan), unit="B", unit_scale=True, desc=label, disable=not progress) as bar:
        for tensor in plan:
            data = encode(tensor.spec, tensor.ggml_type)
            if data.dtype != np.uint8 or data.shape != tensor.byte_shape:
                raise ValueError(
                    f"encoder gave {data.dtype}{list(data.shape)} for '{tensor.spec.name}', "
                    f"expected uint8{list(tensor.byte_shape)}"
                )
            writer.write_tensor_data(data)
            bar.update(tensor.nbytes)


def _file_metadata(
    config: ModelConfig, vocab: VocabSpec, name: str, file_type: LlamaFileType, plan: Iterable[PlannedTensor]
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"general.name": name, "general.file_type": int(file_type)}
    if any(t.ggml_type not in (T.F32, T.F16, T.BF16) for t in plan):
        metadata["general.quantization_version"] = 2  # ggml's GGML_QNT_VERSION
    metadata |= config.to_metadata()
    # GGUFWriter writes general.architecture itself.
    del metadata["general.architecture"]
    metadata |= vocab.to_metadata()
    return metadata


def _value_type(key: str, value: Any) -> tuple[GGUFValueType, GGUFValueType | None]:
    """GGUF type for a python value, as llama.cpp expects it: counts and ids UINT32, floats FLOAT32."""
    if isinstance(value, bool):
        return GGUFValueType.BOOL, None
    if isinstance(value, int):
        return (GGUFValueType.UINT32 if value >= 0 else GGUFValueType.INT32), None
    if isinstance(value, float):
        return GGUFValueType.FLOAT32, None
    if isinstance(value, str):
        return GGUFValueType.STRING, None
    if isinstance(value, list) and value:
        # Arrays take their element type from the first item (int -> INT32, like token types).
        return GGUFValueType.ARRAY, GGUFValueType.get_type(value[0])
    raise ValueError(f"metadata key {key!r}: cannot store {type(value).__name__} {value!r:.40} in GGUF")
