"""The tuner's random kernel inputs (sparkinfer/tune/inputs.py) for planar Q6_K kernels (the
step variant q6_k_layout="planar") and the int8 kernels (activations="q8"): the arrays the
kernel's parameters take."""

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


@pytest.mark.parametrize("family, factory, args", [
    ("gemv_q8", "quantize_q8_1", (768, 8)),
    ("gemv_q8", "add_rms_norm_q8_1", (256, 1e-6)),
    ("gemv_q8", "gemv_q8", ("Q4_K", 64, 512)),
    ("gemv_q8", "rms_norm_q8_1", (256, 1e-6)),
    ("gemv_q8", "gemv_qkv_q8", ("Q4_K", 64, 16, 16, 512)),
    ("gemv_q8", "gemv_qkv_q8", ("Q4_K", 64, 16, 0, 512)),
    ("gemv_q8", "attention_combine_q8_1", (4, 3, 64)),
    ("moe_q8", "moe_gate_up_silu_q8", ("Q4_K", "Q4_K", 16, 2, 64, 256)),
    ("moe_q8", "moe_gate_up_silu_q8_routed", ("Q4_K", "Q4_K", 16, 2, 64, 256)),  # router_merge="gate_up"
    ("moe_q8", "moe_down_residual_q8", ("Q6_K", 16, 2, 64, 256)),
    ("gemv_q8", "gemv_q8", ("Q6_K_PLANAR", 64, 512)),  # q6_k_layout="planar"
    ("moe_q8", "moe_down_residual_q8", ("Q6_K_PLANAR", 16, 2, 64, 256)),
])
def test_int8_kernels_get_inputs_of_their_parameters(family: str, factory: str, args: tuple) -> None:
    """The int8 step (sm_90's: activations="q8", projection_activations="q8") is tuned too: every
    kernel of it has inputs."""
    use = kernel_use(family, factory, *(weight_format_named(a) if isinstance(a, str) else a for a in args))
    func = kernel_factory(family, factory)(*factory_args(use))
    arrays = kernel_inputs(family, factory, use.args, seed=0)
    assert [(a.shape, str(a.dtype)) for a in arrays] == [(tuple(int(d) for d in p.shape), str(p.dtype))
                                                         for p in func.params]


@pytest.mark.parametrize("family, factory, args, stacks", [
    ("moe", "moe_gate_up_silu", ("Q4_K", "Q4_K", 16, 2, 64, 256), (0, 1)),
    ("moe", "moe_gate_up_silu_routed", ("Q4_K", "Q4_K", 16, 2, 64, 256, 1e-6), (0, 1)),
    ("moe", "moe_down_residual", ("Q6_K", 16, 2, 64, 256), (0,)),
    ("moe_q8", "moe_gate_up_silu_q8_routed", ("Q4_K", "Q4_K", 16, 2, 64, 256), (0, 1)),
])
def test_a_moe_call_reads_only_the_experts_its_ids_name(family: str, factory: str, args: tuple,
                                                        stacks: tuple) -> None:
    from sparkinfer.tune.inputs import read_bytes

    arrays = kernel_inputs(family, factory, args, seed=0)
    rest = sum(a.nbytes for j, a in enumerate(arrays) if j not in stacks)
    assert all(arrays[j].shape[0] == 16 for j in stacks)
    assert read_bytes(family, factory, arrays) == rest + sum(arrays[j].nbytes for j in stacks) * 2 // 16


def test_copies_rotate_what_the_calls_read_not_what_the_inputs_hold() -> None:
    """The full-size gate/up: 57 MiB of expert weights, of which a call reads 8 experts' 3.6 MiB.
    Copies sized by the arrays would be 2 (the 60 MiB L2 of an H200): the same 3.6 MiB twice,
    left in the L2. Sized by the reads: 17, 60.6 MiB read between two calls on one copy."""
    import numpy as np

    from sparkinfer.tune.runner import MAX_COPIES, copy_count

    arrays = [np.zeros(57 << 20, np.uint8), np.zeros(8, np.int32)]
    l2 = 60 << 20
    assert copy_count(arrays, l2) == 2
    assert copy_count(arrays, l2, read_bytes=(57 << 20) // 16) == 17
    assert copy_count(arrays, l2, read_bytes=1) == MAX_COPIES
    # and never more than MAX_COPY_BYTES (4 GiB) of copies in all
    assert copy_count([np.zeros(1 << 30, np.uint8)], l2, read_bytes=1) == 4
