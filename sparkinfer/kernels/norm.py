"""RMSNorm over the hidden state: unscheduled compute + numpy reference.

`rms_norm` is the plain norm (attn_norm at layer 0, output_norm); `add_rms_norm` also adds the
residual branch, so the residual sum and the next norm cost one pass over the hidden state:
  sum = x + r                                   written out: it is the next residual stream
  y   = sum * (1 / sqrt(mean(sum^2) + eps)) * w
The formula and its order of operations are `reference.qwen3moe.rms_norm`'s; the sum of
squares is float32, as the oracle's (numpy's pairwise float32 mean).
"""

import numpy as np
import numpy.typing as npt
from tvm import te, tirx

from sparkinfer.reference import qwen3moe as ref

_F32 = "float32"


def sum_of_squares(h: int, src: te.Tensor) -> te.Tensor:
    """The stage sumsq: sum(src^2) in float32."""
    k = te.reduce_axis((0, h), name="k")
    return te.compute((), lambda: te.sum(src[k] * src[k], axis=k), name="sumsq")


def inverse_rms(h: int, eps: float, sumsq: te.Tensor) -> tirx.Expr:
    """1 / sqrt(mean of squares + eps)."""
    return tirx.const(1.0, _F32) / tirx.sqrt(sumsq[()] / tirx.const(h, _F32) + tirx.const(eps, _F32))


def normalize(h: int, eps: float, src: te.Tensor, w: te.Tensor) -> te.Tensor:
    """rmsnorm(src) * w as the stages sumsq and norm (also the normed GEMVs' prologue,
    `gemv.gemv_normed`)."""
    sumsq = sum_of_squares(h, src)
    return te.compute((h,), lambda i: src[i] * inverse_rms(h, eps, sumsq) * w[i], name="norm")


def rms_norm(h: int, eps: float) -> tirx.PrimFunc:
    """y = rmsnorm(x) * w; params (x f32[h], w f32[h], y f32[h])."""
    x = te.placeholder((h,), _F32, name="x")
    w = te.placeholder((h,), _F32, name="w")
    y = normalize(h, eps, x, w)
    return te.create_prim_func([x, w, y]).with_attr("global_symbol", f"rms_norm_{h}")


def add_rms_norm(h: int, eps: float) -> tirx.PrimFunc:
    """sum = x + r, y = rmsnorm(sum) * w; params (x, r, w f32[h], sum f32[h], y f32[h])."""
    x = te.placeholder((h,), _F32, name="x")
    r = te.placeholder((h,), _F32, name="r")
    w = te.placeholder((h,), _F32, name="w")
    total = te.compute((h,), lambda i: x[i] + r[i], name="residual")
    y = normalize(h, eps, total, w)
    return te.create_prim_func([x, r, w, total, y]).with_attr("global_symbol", f"add_rms_norm_{h}")


def _normalize_rows(t: int, h: int, eps: float, src: te.Tensor, w: te.Tensor) -> te.Tensor:
    """`normalize` for each row of src f32[t, h]."""
    k = te.reduce_axis((0, h), name="k")
    sumsq = te.compute((t,), lambda r: te.sum(src[r, k] * src[r, k], axis=k), name="sumsq")

    def y(r: tirx.Var, i: tirx.Var) -> tirx.Expr:
        inv_rms = tirx.const(1.0, _F32) / tirx.sqrt(sumsq[r] / tirx.const(h, _F32) + tirx.const(eps, _F32))
        return src[r, i] * inv_rms * w[i]

    return te.compute((t, h), y, name="norm")


def rms_norm_rows(t: int, h: int, eps: float) -> tirx.PrimFunc:
    """`rms_norm` of each of T rows; params (x f32[t, h], w f32[h], y f32[t, h])."""
    x = te.placeholder((t, h), _F32, name="x")
    w = te.placeholder((h,), _F32, name="w")
    y = _normalize_rows(t, h, eps, x, w)
    return te.create_prim_func([x, w, y]).with_attr("global_symbol", f"rms_norm_rows_{t}x{h}")


def add_rms_norm_rows(t: int, h: int, eps: float) -> tirx.PrimFunc:
    """`add_rms_norm` of each of T rows; params (x, r f32[t, h], w f32[h], sum, y f32[t, h])."""
    x = te.placeholder((t, h), _F32, name="x")
    r = te.placeholder((t, h), _F32, name="r")
    w = te.placeholder((h,), _F32, name="w")
    total = te.compute((t, h), lambda i, j: x[i, j] + r[i, j], name="residual")
    y = _normalize_rows(t, h, eps, total, w)
    return te.create_prim_func([x, r, w, total, y]).with_attr("global_symbol", f"add_rms_norm_rows_{t}x{h}")


def rms_norm_reference(
    x: npt.NDArray[np.float32], w: npt.NDArray[np.float32], eps: float
) -> np.ndarray:
    return ref.rms_norm(x, w, eps).astype(np.float32)


def add_rms_norm_reference(
    x: npt.NDArray[np.float32],
    r: npt.NDArray[np.float32],
    w: npt.NDArray[np.float32],
    eps: float,
) -> tuple[np.ndarray, np.ndarray]:
    total = (x + r).astype(np.float32)
    return total, rms_norm_reference(total, w, eps)
