"""The tuner's random kernel inputs (sparkinfer/tune/inputs.py) for planar Q6_K kernels (the
step variant q6_k_layout="planar"): the arrays the kernel's parameters take."""

import pytest

from sparkinfer.kernels.gemv import Q6_K_PLANAR
from sparkinfer.kernels.use import factory_args, kernel_factory, weight_format_named
from sparkinfer.schedule.space import kernel_use
from sparkinfer.tune.inputs import kernel_inputs


@pytest.mark.parametrize("family, factory, args", [("gemv", "gemv", ("Q6_K_PLANAR", 64, 512)),
                                                    ("moe", "moe_down_residual", ("Q6_K_PLANAR", 4, 2, 256, 768))])
def test_planar_kernels_get_inputs_of_their_parameters(family: str, factory: str, args: tuple) -> None:
    use = kernel_use(family, factory, weight_format_named(args[0]), *args[1:])
    assert use.args == args and factory_args(use)[0] == Q6_K_PLANAR  # the name round-trips
    func = kernel_factory(family, factory)(*factory_args(use))
    arrays = kernel_inputs(family, factory, use.args, seed=0)
    assert [(a.shape, str(a.dtype)) for a in arrays] == [(tuple(int(d) for d in p.shape), str(p.dtype))
                                                         for p in func.params]
