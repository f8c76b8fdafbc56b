"""Memory-mapped GGUF models, validated against the layout their config implies."""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from gguf import GGUF_MAGIC, GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderField

from sparkinfer import quant
from sparkinfer.errors import GGUFFormatError, MissingTensorError, TensorShapeError
from sparkinfer.gguf_file.config import ModelConfig
from sparkinfer.gguf_file.layout import TensorSpec, expected_tensors
from sparkinfer.tokenizer import VocabSpec

_MAGIC = GGUF_MAGIC.to_bytes(4, "little")  # b"GGUF"


@dataclass(frozen=True, eq=False)
class TensorInfo:
    """One tensor of the file. `shape` is numpy order (row length last); `data` is a read-only
    view into the file's memory map (nothing is read until used): typed for F32/F16, else
    uint8[*shape[:-1], row_bytes] (the raw blocks)."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class GGUFModel:
    """A GGUF file opened for reading: config, metadata and tensors, with nothing loaded eagerly."""

    def __init__(self, path: Path, reader: GGUFReader) -> None:
        self.path = path
        self.metadata: dict[str, Any] = _metadata(reader)
        self.config = ModelConfig.from_metadata(self.metadata)
        self.tensors: dict[str, TensorInfo] = {
            t.name: TensorInfo(t.name, GGMLQuantizationType(t.tensor_type), tuple(int(n) for n in reversed(t.shape)), t.data)
            for t in reader.tensors
        }
        _validate(self.tensors, expected_tensors(self.config))

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> GGUFModel:
        path = Path(path)
        return cls(path, _read(path))

    @cached_property
    def vocab(self) -> VocabSpec:
        return VocabSpec.from_metadata(self.metadata)

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    def tensor_f32(self, name: str) -> npt.NDArray[np.float32]:
        """The whole tensor dequantized to float32, numpy-order shape."""
        t = self._tensor(name)
        return quant.dequantize(t.ggml_type, t.data, t.shape)

    def expert_f32(self, name: str, expert: int) -> npt.NDArray[np.float32]:
        """One expert's matrix of a 3-D `*_exps` tensor, reading only that expert's bytes."""
        t = self._tensor(name)
        if len(t.shape) != 3:
            raise ValueError(f"tensor '{name}' has shape {t.shape}, not [n_experts, rows, cols]")
        if not 0 <= expert < t.shape[0]:
            raise IndexError(f"expert {expert} out of range for '{name}' with {t.shape[0]} experts")
        return quant.dequantize(t.ggml_type, t.data[expert], t.shape[1:])

    def type_histogram(self) -> dict[str, int]:
        """ggml type name -> tensor count, commonest first."""
        return dict(Counter(t.ggml_type.name for t in self.tensors.values()).most_common())

    def bytes_per_token(self) -> int:
        """Weight bytes one decoded token reads: every dense weight, one row of token_embd,
        and n_experts_used / n_experts of each expert tensor."""
        config = self.config
        total = 0
        for t in self.tensors.values():
            if t.name == "token_embd.weight":
                total += t.nbytes // t.shape[0]
            elif len(t.shape) == 3:
                total += t.nbytes * config.n_experts_used // config.n_experts
            else:
                total += t.nbytes
        return total

    def _tensor(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise MissingTensorError(f"{self.path} has no tensor '{name}'")
        return self.tensors[name]


def _read(path: Path) -> GGUFReader:
    _check_magic(path)
    try:
        reader = _BoundsCheckedReader(path)
    except _HeaderCut:
        raise GGUFFormatError(f"{path} is truncated: the file ends inside its header, at byte {path.stat().st_size}") from None
    except (ValueError, KeyError, IndexError) as e:
        raise GGUFFormatError(f"{path} is not a valid GGUF file: {e}") from e
    reader.raise_if_truncated(path)
    return reader


def _check_magic(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise GGUFFormatError(f"cannot read {path}: {e.strerror}") from e
    if head != _MAGIC:
        raise GGUFFormatError(f"{path} is not a GGUF file (magic {head!r}, expected {_MAGIC!r})")


class _HeaderCut(Exception):
    """The file ends inside the header: nothing after it can be parsed."""


class _BoundsCheckedReader(GGUFReader):
    """GGUFReader that reports reads past the end of the file instead of failing on them,
    and reads through a plain ndarray view of the map.

    gguf's reader takes every field and tensor as a memmap slice; on a truncated file a slice
    comes back short and fails later with an unrelated reshape or index error. Here a header
    read past the end stops parsing at once, and tensor data past the end gives a zero-stride
    view of zeros (a cut 17 GiB file costs no memory) so all tensor extents are known and the
    message can say how much is missing.
    Slicing np.memmap itself costs ~10 us a slice (its __array_finalize__), which made the
    ~760k reads of a 151936-token vocabulary take 20 s; the plain view is the same mapping.
    """

    def __init__(self, path: Path) -> None:
        self.needed_bytes = 0
        self._plain: np.ndarray | None = None
        super().__init__(path)

    def _get(
        self, offset: int, dtype: npt.DTypeLike, count: int = 1, override_order: None | Literal["I", "S", "<"] = None
    ) -> npt.NDArray[Any]:
        if self._plain is None:
            self._plain = self.data.view(np.ndarray)
        count = int(count)
        dtype = np.dtype(dtype)
        end = offset + dtype.itemsize * count
        if end > len(self._plain):
            # data_offset is set once the header is parsed, just before the tensor views are built.
            if not hasattr(self, "data_offset"):
                raise _HeaderCut()
            self.needed_bytes = max(self.needed_bytes, end)
            return np.broadcast_to(np.zeros(1, dtype=dtype), (count,))
        arr = self._plain[offset:end].view(dtype)
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def raise_if_truncated(self, path: Path) -> None:
        size = len(self.data)
        if self.needed_bytes <= size:
            return
        cut = [t.name for t in self.tensors if t.data_offset + t.n_bytes > size]
        missing = self.needed_bytes - size
        raise GGUFFormatError(
            f"{path} is truncated: tensor data extends {missing} bytes past the end of the file "
            f"({size} bytes, {self.needed_bytes} needed); {len(cut)} tensors are cut, first '{cut[0]}'"
        )


def _metadata(reader: GGUFReader) -> dict[str, Any]:
    """Key -> plain python value (str, int, float, bool, or a list of them)."""
    # GGUF.version and the counts are the reader's own pseudo-fields, not metadata.
    return {name: _field_value(name, field) for name, field in reader.fields.items() if not name.startswith("GGUF.")}


# Descriptive keys nothing computes with: a stray byte there is shown as U+FFFD rather than
# refusing a model that runs fine. Every other string (architecture, tokens, merges, chat
# template) feeds the model or the tokenizer, where a guessed character would change the output.
_FREE_TEXT_PREFIX = "general."
_FREE_TEXT_EXCEPTIONS = {"general.architecture"}


def _field_value(name: str, field: ReaderField) -> Any:
    try:
        return field.contents()
    except UnicodeDecodeError as e:
        if name.startswith(_FREE_TEXT_PREFIX) and name not in _FREE_TEXT_EXCEPTIONS:
            return _contents_replacing_bad_utf8(field)
        raise GGUFFormatError(f"metadata key '{name}' holds a string that is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _contents_replacing_bad_utf8(field: ReaderField) -> Any:
    strings = [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
    return strings if field.types[0] == GGUFValueType.ARRAY else strings[0]


def _validate(tensors: dict[str, TensorInfo], expected: dict[str, TensorSpec]) -> None:
    # Type first: a tensor of an unknown type would fail the shape checks with a less useful message.
    for t in tensors.values():
        quant.quant_format(t.ggml_type, t.name)
    for spec in expected.values():
        if spec.name not in tensors:
            raise MissingTensorError(f"tensor '{spec.name}' is missing from the file")
        found = tensors[spec.name].shape
        if found != spec.shape:
            raise TensorShapeError(f"tensor '{spec.name}' has shape {list(found)}, expected {list(spec.shape)}")
