"""Gated RMSNorm of a Mamba-2 layer (norm(x * silu(z)) per group of
channels, scaled by ``weight``) as a Pallas kernel (Triton backend on GPU)
with its wrapper, differentiable through a ``jax.custom_vjp`` whose backward is
a second Pallas kernel. The same kernel's residual form (inference) adds a
layer's residual first and returns the sum too: the add, the cast and the
norm of a layer in one pass. The math and the argument rules:
``bridge.spec.norm_contract``. Mirror: ``torch_impl/gated_rms_norm.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bridge.spec.norm_contract import (
    NORM_BWD_ROWS, check_norm_args, check_norm_grad, norm_bwd_blocks, norm_num_warps)
from jax_impl import platform

# The forward's warps: at most 4. Pallas's lowering of the 5120-wide gated
# norm of a 4k prefill took 36 us with 4 warps against 43 with 16 (H200).
# The Triton kernel keeps the shared cap of 16.
FORWARD_MAX_WARPS = 4


def _rms_norm_gated_kernel(out_in_ref, x_ref, z_ref, residual_ref, weight_ref, out_ref,
                           residual_out_ref=None, *, group_size, eps, norm_before_gate, block,
                           z_column=0):
    """Grid (num_tokens, num_groups): one group of one token per program.
    With a residual (no gate), x + residual is normalised and stored to
    ``residual_out_ref``. z's channels start at column ``z_column`` of
    ``z_ref`` (a wider array, read in place)."""
    del out_in_ref  # the same buffer as out_ref
    token, group = pl.program_id(0), pl.program_id(1)
    mask = jnp.arange(block, dtype=jnp.int32) < group_size
    cols = pl.ds(group * group_size, block)
    x = plgpu.load(x_ref.at[token, cols], mask=mask, other=0.0).astype(jnp.float32)
    if residual_ref is not None:
        x = x + plgpu.load(residual_ref.at[token, cols], mask=mask, other=0.0).astype(jnp.float32)
        plgpu.store(residual_out_ref.at[token, cols], x.astype(residual_out_ref.dtype), mask=mask)
    if z_ref is not None:
        z = plgpu.load(z_ref.at[token, pl.ds(z_column + group * group_size, block)], mask=mask,
                       other=0.0).astype(jnp.float32)
        if not norm_before_gate:
            x = x * z * jax.nn.sigmoid(z)
    y = x * jax.lax.rsqrt(jnp.sum(x * x) / group_size + eps)
    if weight_ref is not None:
        y = y * plgpu.load(weight_ref.at[cols], mask=mask, other=0.0).astype(jnp.float32)
    if z_ref is not None and norm_before_gate:
        y = y * z * jax.nn.sigmoid(z)
    plgpu.store(out_ref.at[token, cols], y.astype(out_ref.dtype), mask=mask)


def _rms_norm_gated_bwd_kernel(dy_ref, x_ref, z_ref, weight_ref, dx_ref, dz_ref, dw_ref, *,
                               num_tokens, group_size, eps, norm_before_gate, block):
    """Grid (cdiv(num_tokens, NORM_BWD_ROWS), num_groups): the mirror of
    ``torch_impl.gated_rms_norm._rms_norm_gated_bwd_kernel`` (see there)."""
    f32 = jnp.float32
    first, group = pl.program_id(0) * NORM_BWD_ROWS, pl.program_id(1)
    mask = jnp.arange(block, dtype=jnp.int32) < group_size
    cols = pl.ds(group * group_size, block)
    w = (plgpu.load(weight_ref.at[cols], mask=mask, other=0.0).astype(f32)
         if weight_ref is not None else jnp.ones((block,), f32))

    def row(token, dw):
        x = plgpu.load(x_ref.at[token, cols], mask=mask, other=0.0).astype(f32)
        dy = plgpu.load(dy_ref.at[token, cols], mask=mask, other=0.0).astype(f32)
        gate, dsilu = jnp.ones((block,), f32), jnp.zeros((block,), f32)
        if z_ref is not None:
            z = plgpu.load(z_ref.at[token, cols], mask=mask, other=0.0).astype(f32)
            sig = jax.nn.sigmoid(z)
            gate, dsilu = z * sig, sig * (1.0 + z * (1.0 - sig))
        gated_first = z_ref is not None and not norm_before_gate
        v = x * gate if gated_first else x
        rstd = jax.lax.rsqrt(jnp.sum(v * v) / group_size + eps)
        n = v * rstd
        gated_after = z_ref is not None and norm_before_gate
        dn = dy * w * gate if gated_after else dy * w
        dw = dw + (dy * n * gate if gated_after else dy * n)
        dv = rstd * (dn - n * (jnp.sum(dn * n) / group_size))
        if z_ref is not None:
            dz = dy * n * w * dsilu if norm_before_gate else dv * x * dsilu
            plgpu.store(dz_ref.at[token, cols], dz.astype(dz_ref.dtype), mask=mask)
        dx = dv * gate if gated_first else dv
        plgpu.store(dx_ref.at[token, cols], dx.astype(dx_ref.dtype), mask=mask)
        return dw

    dw = jax.lax.fori_loop(first, jnp.minimum(first + NORM_BWD_ROWS, num_tokens), row,
                           jnp.zeros((block,), f32))
    if dw_ref is not None:
        plgpu.store(dw_ref.at[pl.program_id(0), cols], dw, mask=mask)


def _forward(x, weight, z, residual, out, *, eps, group_size, norm_before_gate, out_dtype,
             z_column=0):
    """out, or ``(out, residual_out)`` with a residual."""
    block = pl.next_power_of_2(group_size)
    kernel = functools.partial(_rms_norm_gated_kernel, group_size=group_size, eps=eps,
                               norm_before_gate=norm_before_gate, block=block, z_column=z_column)
    out_shape = jax.ShapeDtypeStruct(x.shape, out_dtype)
    if residual is not None:
        out_shape = (out_shape, jax.ShapeDtypeStruct(residual.shape, residual.dtype))
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(x.shape[0], x.shape[1] // group_size),
        input_output_aliases={} if out is None else {0: 0},  # out, when given, is operand 0
        compiler_params=plgpu.CompilerParams(num_warps=norm_num_warps(block, FORWARD_MAX_WARPS),
                                             num_stages=1),
        interpret=platform.INTERPRET,
        name="rms_norm_gated",
    )(out, x, z, residual, weight)


def _backward(dy, x, weight, z, *, eps, group_size, norm_before_gate):
    """(dx, dweight or None, dz or None)."""
    num_tokens, hidden = x.shape
    block = pl.next_power_of_2(group_size)
    blocks = norm_bwd_blocks(num_tokens)
    kernel = functools.partial(_rms_norm_gated_bwd_kernel, num_tokens=num_tokens,
                               group_size=group_size, eps=eps, norm_before_gate=norm_before_gate,
                               block=block)
    shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype),
              None if z is None else jax.ShapeDtypeStruct(z.shape, z.dtype),
              None if weight is None else jax.ShapeDtypeStruct((blocks, hidden), jnp.float32))
    given = [shape for shape in shapes if shape is not None]
    results = iter(pl.pallas_call(
        lambda dy_ref, x_ref, z_ref, w_ref, *refs: kernel(
            dy_ref, x_ref, z_ref, w_ref, *_with_none(refs, shapes)),
        out_shape=tuple(given),
        grid=(blocks, hidden // group_size),
        compiler_params=plgpu.CompilerParams(num_warps=norm_num_warps(block), num_stages=1),
        interpret=platform.INTERPRET,
        name="rms_norm_gated_bwd",
    )(dy, x, z, weight))
    dx, dz, dw = (None if shape is None else next(results) for shape in shapes)
    return dx, None if dw is None else jnp.sum(dw, axis=0).astype(weight.dtype), dz


def _with_none(refs, shapes):
    """The output refs in ``shapes``' order, None where a shape is absent."""
    refs = iter(refs)
    return [None if shape is None else next(refs) for shape in shapes]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _differentiable(x, weight, z, eps, group_size, norm_before_gate):
    return _forward(x, weight, z, None, None, eps=eps, group_size=group_size,
                    norm_before_gate=norm_before_gate, out_dtype=x.dtype)


def _differentiable_fwd(x, weight, z, eps, group_size, norm_before_gate):
    return _differentiable(x, weight, z, eps, group_size, norm_before_gate), (x, weight, z)


def _differentiable_bwd(eps, group_size, norm_before_gate, saved, dy):
    x, weight, z = saved
    return _backward(dy, x, weight, z, eps=eps, group_size=group_size,
                     norm_before_gate=norm_before_gate)


_differentiable.defvjp(_differentiable_fwd, _differentiable_bwd)


def rms_norm_gated(x, weight, z=None, eps=1e-6, group_size=None, norm_before_gate=False, *,
                   out=None, residual=None):
    """``x, z (T, hidden)``, ``weight (hidden,)`` or None -> ``out (T,
    hidden)`` in ``out``'s dtype (x's when not given; a given ``out`` is
    aliased, so under jit with it donated the result is written in place).
    Jittable with ``eps``, ``group_size`` and ``norm_before_gate`` static.
    Differentiable in x, weight and z (``jax.custom_vjp``, a Pallas backward)
    without ``out``; with ``out``, differentiation is refused by name.

    With ``residual (T, hidden)`` (z None): normalises ``s = x + residual``
    (float32) and returns ``(out, residual_out)``, ``residual_out (T,
    hidden)`` being s in residual's dtype. Inference only: differentiation is
    refused by name."""
    num_tokens, hidden, group_size = check_norm_args(x=x, z=z, weight=weight, out=out,
                                                     residual=residual, group_size=group_size,
                                                     eps=eps)
    out_dtype = x.dtype if out is None else out.dtype
    if num_tokens == 0:
        out = jnp.zeros(x.shape, out_dtype) if out is None else out
        return out if residual is None else (out, residual)
    options = dict(eps=float(eps), group_size=group_size, norm_before_gate=bool(norm_before_gate))
    if out is None and residual is None:
        return _differentiable(x, weight, z, *options.values())

    # Inference only (``out`` aliased, or the residual form): differentiated, the contract's error.
    inference = jax.custom_jvp(lambda out, x, weight, z, residual: _forward(
        x, weight, z, residual, out, **options, out_dtype=out_dtype))

    @inference.defjvp
    def _refuse(primals, tangents):
        check_norm_grad(out=out, residual=residual)
        raise AssertionError("unreachable: check_norm_grad raises")

    return inference(out, x, weight, z, residual)


def rms_norm_gated_columns(x, weight, z_source, z_column, eps=1e-6, group_size=None,
                           norm_before_gate=False):
    """``rms_norm_gated`` with ``z = z_source[:, z_column:z_column + hidden]``
    read in place. JAX only: a Pallas call takes whole arrays, so a sliced
    ``z`` (a mixer's gate, columns of its projection) would be a copy.
    Inference only (refused by name under differentiation)."""
    num_tokens, hidden = x.shape
    if z_source.ndim != 2 or z_source.shape[0] != num_tokens or not (
            0 <= z_column <= z_source.shape[1] - hidden):
        raise ValueError(f"rms_norm_gated_columns: `z_source` of shape {z_source.shape} must hold "
                         f"{num_tokens} rows and columns [{z_column}, {z_column + hidden})")
    z = jax.ShapeDtypeStruct(x.shape, z_source.dtype)
    _, _, group_size = check_norm_args(x=x, z=z, weight=weight, out=None, residual=None,
                                       group_size=group_size, eps=eps)
    if num_tokens == 0:
        return jnp.zeros(x.shape, x.dtype)
    return platform.inference_only("rms_norm_gated_columns", lambda x, weight, z_source: _forward(
        x, weight, z_source, None, None, eps=float(eps), group_size=group_size,
        norm_before_gate=bool(norm_before_gate), out_dtype=x.dtype, z_column=int(z_column)),
        x, weight, z_source)
