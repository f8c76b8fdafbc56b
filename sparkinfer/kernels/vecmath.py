"""Transcendentals as plain float32 arithmetic, for loops that a CPU schedule vectorizes: LLVM
turns a vector `llvm.exp` into one libm call a lane, which costs more than the rest of an
attention or SiLU loop together; these stay vector instructions (a floor, a conversion, a
shift, a few multiply-adds)."""

from tvm import tirx

Expr = tirx.Expr

EXP_FLOOR = -87.0  # exp(x) below this is 0 here (float32's smallest normal is exp(-87.3))
LOG2E, LN2_HI, LN2_LO = 1.4426950408889634, 0.693145751953125, 1.4286067653302226e-06
F32 = "float32"


def _f32(value: float) -> Expr:
    return tirx.const(value, F32)


def exp_f32(x: Expr) -> Expr:
    """exp(x) for float32 x <= 0: 2^n * e^r with n = round(x / ln 2), r = x - n ln 2 (ln 2 in
    two parts, so r is exact to float32), |r| <= ln2 / 2 and e^r by its degree-6 Taylor
    polynomial (relative error ~2e-7); 0 below EXP_FLOOR."""
    n = tirx.floor(x * _f32(LOG2E) + _f32(0.5))
    r = x - n * _f32(LN2_HI) - n * _f32(LN2_LO)
    poly = _f32(1.0 / 720)
    for c in (1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        poly = poly * r + _f32(c)
    two_n = tirx.reinterpret(F32, tirx.shift_left(n.astype("int32") + 127, 23))
    return tirx.Select(x < _f32(EXP_FLOOR), _f32(0.0), two_n * poly)


def sigmoid_f32(x: Expr) -> Expr:
    """1 / (1 + exp(-x)) for any float32 x, through exp_f32 of -|x| (e = exp(-|x|) <= 1):
    1 / (1 + e) for x >= 0, e / (1 + e) below."""
    e = exp_f32(-tirx.abs(x))
    return tirx.Select(x >= _f32(0.0), _f32(1.0), e) / (_f32(1.0) + e)
