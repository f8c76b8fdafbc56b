"""Per-sub-block scale searches for the K quantizers, after llama.cpp's reference ones.

Rounding with the plain min/max (or max-abs) scale wastes levels on the extremes; trying
a few slightly different scales, refitting the scale by weighted least squares for each,
and keeping the one with the lowest weighted error lowers the error (see tests/quant).
The quants found here are thrown away: the caller re-rounds against the scales it can
actually store.

Inputs are column-major in sub-blocks: x[i, s] is weight i of sub-block s. numpy
broadcasts a per-sub-block value along a long contiguous axis several times faster than
along rows of 16 or 32, and the searches are nothing but such broadcasts and reductions.
"""

import numpy as np
import numpy.typing as npt

from ._arrays import F32

F64 = npt.NDArray[np.float64]


def _col_dot(a: F32, b: F32) -> F64:
    return np.einsum("ij,ij->j", a, b).astype(np.float64)


def search_scale_min(
    x: F32, weights: F32, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[F32, F32]:
    """Fit x ~ scale * q - offset per column, q integer in [0, nmax], scale, offset >= 0.

    Starts from the plain min/max fit, then tries inverse scales
    (nmax + rmin + rdelta * k) / (max - min), k = 0..nstep, each followed by a weighted
    least-squares refit of (scale, min). As in llama.cpp, `min` is the best one found so
    far, so the grid re-centres after each improvement (a fixed grid measurably loses).
    Returns (scale, offset) with the lowest weighted squared error.
    """
    hi = x.max(axis=0)
    # The format subtracts an unsigned offset, so the fitted min may not be positive.
    lo = np.minimum(x.min(axis=0), np.float32(0))
    sw = weights.sum(axis=0).astype(np.float64)
    swx = _col_dot(weights, x)

    def rounded(mn: F32, numerator: float) -> F32:
        span = hi - mn
        # A flat (all equal, <= 0) column has span 0; any positive stand-in avoids 0/0, and
        # then every candidate rounds to q = 0, so the min/max fit (scale 0, min lo) stands.
        inv_scale = np.float32(numerator) / np.where(span > 0, span, np.float32(1))
        q = np.rint((x - mn) * inv_scale)
        return np.clip(q, 0, nmax, out=q)

    def weighted_error(q: F32, scale: F32, mn: F32) -> F64:
        # Computed from the residuals, not from the sums: when all q are equal the refit is
        # 0/0 up to rounding, and only the residuals expose the resulting nonsense.
        diff = q * scale + (mn - x)
        return _col_dot(weights * diff, diff)

    best_scale = (hi - lo) / np.float32(nmax)
    best_min = lo
    best_err = weighted_error(rounded(lo, nmax), best_scale, best_min)
    for k in range(nstep + 1):
        q = rounded(best_min, nmax + rmin + rdelta * k)
        wq = weights * q
        sl = wq.sum(axis=0).astype(np.float64)
        sl2 = _col_dot(wq, q)
        sxl = _col_dot(wq, x)
        det = sw * sl2 - sl * sl
        ok = det > 0
        safe_det = np.where(ok, det, 1.0)
        scale = (sw * sxl - swx * sl) / safe_det
        mn = (sl2 * swx - sl * sxl) / safe_det
        # A positive min cannot be stored; refit the scale alone with the min pinned at 0.
        positive = mn > 0
        mn = np.where(positive, 0.0, mn).astype(np.float32)
        scale = np.where(positive, sxl / np.where(sl2 > 0, sl2, 1.0), scale).astype(np.float32)
        err = weighted_error(q, scale, mn)
        better = ok & (err < best_err)
        best_scale = np.where(better, scale, best_scale)
        best_min = np.where(better, mn, best_min)
        best_err = np.where(better, err, best_err)
    return best_scale, -best_min


def search_symmetric_scale(x: F32, nmax: int, n_tweaks: int) -> F32:
    """Fit x ~ scale * q per column, q integer in [-nmax, nmax - 1], weighting by x^2.

    The largest-magnitude element is mapped to -nmax so the asymmetric range's extra level
    is not wasted; inverse scales -(nmax + 0.1 * k) / that element, |k| <= n_tweaks, are
    tried, each refit by least squares. Returns the scale (of either sign; 0 for zero
    columns) maximising sum(w*x*q)^2 / sum(w*q^2), i.e. minimising the weighted error.
    """
    extreme = x[np.abs(x).argmax(axis=0), np.arange(x.shape[1])]
    # 1e-30 rather than 0: llama.cpp treats denormal-only sub-blocks as zero too.
    is_zero = np.abs(extreme) < np.float32(1e-30)
    safe_extreme = np.where(is_zero, np.float32(1), extreme)
    w = x * x
    wx = w * x

    best_scale = np.zeros(x.shape[1], dtype=np.float64)
    best_score = np.full(x.shape[1], -np.inf)
    # The plain max-abs scale first so that it wins exact ties (llama.cpp's order).
    for k in (0, *range(-n_tweaks, 0), *range(1, n_tweaks + 1)):
        inv_scale = np.float32(-(nmax + 0.1 * k)) / safe_extreme
        q = np.rint(x * inv_scale)
        np.clip(q, -nmax, nmax - 1, out=q)
        sxl = _col_dot(wx, q)
        sl2 = _col_dot(w * q, q)
        ok = sl2 > 0
        safe_sl2 = np.where(ok, sl2, 1.0)
        score = np.where(ok, sxl * sxl / safe_sl2, -np.inf)
        better = score > best_score
        best_scale = np.where(better, sxl / safe_sl2, best_scale)
        best_score = np.where(better, score, best_score)
    return np.where(is_zero, 0.0, best_scale).astype(np.float32)
