"""Which kernel a module uses: a kernel factory call (family, factory, arguments) as a value
that the model records, the schedule rules match on, the compiler writes into the manifest and
the tuner rebuilds its kernel from."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from tvm import tirx

from sparkinfer.errors import SparkInferError
from sparkinfer.quant.layouts import RelaidType

_T = GGMLQuantizationType

KernelFactory = Callable[..., tirx.PrimFunc]


def kernel_factory(family: str, name: str) -> KernelFactory:
    """The registered factory `sparkinfer.kernels.<family>.<name>` (kernels/registry.py);
    SparkInferError names one that is not registered."""
    # Imported here: the registry imports every kernel module, and they import this one.
    from sparkinfer.kernels.registry import FACTORIES

    found = FACTORIES.get((family, name))
    if found is None:
        raise SparkInferError(
            f"kernel factory sparkinfer.kernels.{family}.{name} is not registered "
            f"(sparkinfer/kernels/registry.py): the decode step needs it"
        )
    return found


@dataclass(frozen=True)
class KernelUse:
    """One distinct kernel of the module: the GlobalVar name and the factory call behind it.
    `args` holds ints, floats and ggml type names (strings; or a `RelaidType`'s name)."""

    name: str
    family: str
    factory: str
    args: tuple[Any, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "factory": self.factory, "args": list(self.args)}


def _arg_json(value: Any) -> Any:
    if isinstance(value, (GGMLQuantizationType, RelaidType)):
        return value.name
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    raise TypeError(f"kernel factory argument {value!r} is not an int, float or ggml type")


def kernel_args(args: Iterable[Any]) -> tuple[Any, ...]:
    """Factory arguments as stored in a KernelUse: ggml types by name."""
    return tuple(_arg_json(a) for a in args)


def weight_format_named(name: str) -> GGMLQuantizationType | RelaidType:
    """A weight format from its name as a KernelUse records it: a ggml type, or one of
    SparkInfer's re-laid-out formats (`quant.layouts.RelaidType`, e.g. Q6_K_PLANAR)."""
    return RelaidType[name] if name in RelaidType.__members__ else _T[name]


def factory_args(use: KernelUse) -> tuple[Any, ...]:
    """A KernelUse's arguments as the factory takes them (weight format names back to
    `weight_format_named`'s enums)."""
    return tuple(weight_format_named(a) if isinstance(a, str) else a for a in use.args)
