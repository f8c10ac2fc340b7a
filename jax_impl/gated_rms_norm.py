"""Gated RMSNorm of a Mamba-2 layer (norm(x * silu(z)) per group of
channels, scaled by ``weight``) as a Pallas kernel (Triton backend on GPU)
with its wrapper. The math and the argument rules: ``bridge.spec.norm_contract``.
Mirror: ``torch_impl/gated_rms_norm.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bridge.spec.norm_contract import check_norm_args, norm_num_warps
from jax_impl import platform


def _rms_norm_gated_kernel(out_in_ref, x_ref, z_ref, weight_ref, out_ref, *, group_size, eps,
                           norm_before_gate, block):
    """Grid (num_tokens, num_groups): one group of one token per program."""
    del out_in_ref  # the same buffer as out_ref
    token, group = pl.program_id(0), pl.program_id(1)
    mask = jnp.arange(block, dtype=jnp.int32) < group_size
    cols = pl.ds(group * group_size, block)
    x = plgpu.load(x_ref.at[token, cols], mask=mask, other=0.0).astype(jnp.float32)
    if z_ref is not None:
        z = plgpu.load(z_ref.at[token, cols], mask=mask, other=0.0).astype(jnp.float32)
        if not norm_before_gate:
            x = x * z * jax.nn.sigmoid(z)
    y = x * jax.lax.rsqrt(jnp.sum(x * x) / group_size + eps)
    if weight_ref is not None:
        y = y * plgpu.load(weight_ref.at[cols], mask=mask, other=0.0).astype(jnp.float32)
    if z_ref is not None and norm_before_gate:
        y = y * z * jax.nn.sigmoid(z)
    plgpu.store(out_ref.at[token, cols], y.astype(out_ref.dtype), mask=mask)


def rms_norm_gated(x, weight, z=None, eps=1e-6, group_size=None, norm_before_gate=False, *,
                   out=None):
    """``x, z (T, hidden)``, ``weight (hidden,)`` or None -> ``out (T,
    hidden)`` in ``out``'s dtype (x's when not given; a given ``out`` is
    aliased, so under jit with it donated the result is written in place).
    Jittable with ``eps``, ``group_size`` and ``norm_before_gate`` static."""
    num_tokens, hidden, group_size = check_norm_args(x=x, z=z, weight=weight, out=out,
                                                     group_size=group_size, eps=eps)
    out_dtype = x.dtype if out is None else out.dtype
    if num_tokens == 0:
        return jnp.zeros(x.shape, out_dtype) if out is None else out
    block = pl.next_power_of_2(group_size)
    kernel = functools.partial(_rms_norm_gated_kernel, group_size=group_size, eps=float(eps),
                               norm_before_gate=bool(norm_before_gate), block=block)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, out_dtype),
        grid=(num_tokens, hidden // group_size),
        input_output_aliases={} if out is None else {0: 0},  # out, when given, is operand 0
        compiler_params=plgpu.CompilerParams(num_warps=norm_num_warps(block), num_stages=1),
        interpret=platform.INTERPRET,
        name="rms_norm_gated",
    )(out, x, z, weight)
