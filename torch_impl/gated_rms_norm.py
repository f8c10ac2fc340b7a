"""Gated RMSNorm of a Mamba-2 layer (norm(x * silu(z)) per group of
channels, scaled by ``weight``) as a Triton kernel behind a torch op, and
its training form: a functional op with autograd through a backward kernel.
The same kernel's residual form (inference) adds a layer's residual first
and writes the sum too: the add, the cast and the norm of a layer in one pass.
The math and the argument rules: ``bridge.spec.norm_contract``. Mirror:
``jax_impl/gated_rms_norm.py``.
"""

from __future__ import annotations

import torch

from bridge.spec.norm_contract import (
    NORM_BWD_ROWS, check_norm_args, check_norm_grad, norm_bwd_blocks, norm_num_warps)
from torch_impl import platform

import triton  # noqa: E402  (after platform, which may set TRITON_INTERPRET)
import triton.language as tl  # noqa: E402


@triton.heuristics(platform.given_flags(HAS_Z="z_ptr", HAS_WEIGHT="w_ptr",
                                        HAS_RESIDUAL="residual_ptr"))
@triton.jit
def _rms_norm_gated_kernel(
    x_ptr, z_ptr, w_ptr, residual_ptr, out_ptr, residual_out_ptr, group_size, eps,
    stride_x_tok, stride_z_tok, stride_r_tok, stride_o_tok, stride_ro_tok,
    NORM_BEFORE_GATE: tl.constexpr, BLOCK: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    """Grid (num_tokens, num_groups): one group of one token per program.
    With a residual (no gate), x + residual is normalised and stored to
    ``residual_out_ptr``, which may be ``residual_ptr``: each element is read
    before this program writes it."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * group_size + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < group_size
    x = tl.load(x_ptr + token * stride_x_tok + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + token * stride_r_tok + offs, mask=mask, other=0.0)
        x = x + r.to(tl.float32)
        tl.store(residual_out_ptr + token * stride_ro_tok + offs,
                 x.to(residual_out_ptr.dtype.element_ty), mask=mask)
    if HAS_Z:
        z = tl.load(z_ptr + token * stride_z_tok + offs, mask=mask, other=0.0).to(tl.float32)
        if not NORM_BEFORE_GATE:
            x = x * z * tl.sigmoid(z)
    y = x * tl.rsqrt(tl.sum(x * x, axis=0) / group_size + eps)
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z and NORM_BEFORE_GATE:
        y = y * z * tl.sigmoid(z)
    tl.store(out_ptr + token * stride_o_tok + offs, y.to(out_ptr.dtype.element_ty), mask=mask)



@triton.heuristics(platform.given_flags(HAS_Z="z_ptr", HAS_WEIGHT="w_ptr"))
@triton.jit
def _rms_norm_gated_bwd_kernel(
    dy_ptr, x_ptr, z_ptr, w_ptr, dx_ptr, dz_ptr, dw_ptr, num_tokens, hidden, group_size, eps,
    stride_dy_tok, stride_x_tok, stride_z_tok, stride_dx_tok, stride_dz_tok,
    NORM_BEFORE_GATE: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_WEIGHT: tl.constexpr,
):
    """Grid (cdiv(num_tokens, ROWS), num_groups): ROWS tokens of one group per
    program; dx, dz per token, the block's dweight partial (float32) into row
    ``program_id(0)`` of ``dw_ptr`` (num_blocks, hidden)."""
    block = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * group_size + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < group_size
    w = tl.full((BLOCK,), 1.0, tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    first = block * ROWS
    for token in range(first, tl.minimum(first + ROWS, num_tokens)):
        x = tl.load(x_ptr + token * stride_x_tok + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + token * stride_dy_tok + offs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.full((BLOCK,), 1.0, tl.float32)
        dsilu = tl.zeros((BLOCK,), dtype=tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + token * stride_z_tok + offs, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            gate = z * sig
            dsilu = sig * (1.0 + z * (1.0 - sig))
        v = x
        if HAS_Z and not NORM_BEFORE_GATE:
            v = x * gate
        rstd = tl.rsqrt(tl.sum(v * v, axis=0) / group_size + eps)
        n = v * rstd
        if HAS_Z and NORM_BEFORE_GATE:
            dn = dy * w * gate
            dw += dy * n * gate
        else:
            dn = dy * w
            dw += dy * n
        dv = rstd * (dn - n * (tl.sum(dn * n, axis=0) / group_size))
        if HAS_Z:
            if NORM_BEFORE_GATE:
                dz = dy * n * w * dsilu
                dx = dv
            else:
                dz = dv * x * dsilu
                dx = dv * gate
            tl.store(dz_ptr + token * stride_dz_tok + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        else:
            dx = dv
        tl.store(dx_ptr + token * stride_dx_tok + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(dw_ptr + block * hidden + offs, dw, mask=mask)


def _launch(x, weight, z, residual, output, residual_out, eps, group_size, norm_before_gate):
    num_tokens, hidden = x.shape
    if num_tokens == 0:
        return
    block = platform.next_power_of_2(group_size)
    with platform.on_device(x.device):
        platform.launch(_rms_norm_gated_kernel, (num_tokens, hidden // group_size),
            x, z, weight, residual, output, residual_out, group_size, eps,
            x.stride(0), platform.strides(z, 2)[0], platform.strides(residual, 2)[0],
            output.stride(0), platform.strides(residual_out, 2)[0],
            NORM_BEFORE_GATE=norm_before_gate, BLOCK=block, num_warps=norm_num_warps(block))


# The launch as a torch op (``output``, not ``out``: torch.compile reads an
# ``out=`` argument as an out-variant's).
_OP = platform.define_op(
    "rms_norm_gated", "(Tensor x, Tensor? weight, Tensor? z, Tensor? residual, Tensor(a!) output, "
    "Tensor(b!)? residual_out, float eps, int group_size, bool norm_before_gate) -> ()", _launch)


def _functional(x, weight, z, eps, group_size, norm_before_gate):
    out = torch.empty_like(x)
    _launch(x, weight, z, None, out, None, eps, group_size, norm_before_gate)
    return out


def _backward(dy, x, weight, z, dx, dz, dweight, eps, group_size, norm_before_gate):
    """dx, dz like x; dweight (norm_bwd_blocks(T), hidden) float32 partials."""
    num_tokens, hidden = x.shape
    if num_tokens == 0:
        return
    block = platform.next_power_of_2(group_size)
    with platform.on_device(x.device):
        platform.launch(_rms_norm_gated_bwd_kernel, (norm_bwd_blocks(num_tokens), hidden // group_size),
            dy, x, z, weight, dx, dz, dweight, num_tokens, hidden, group_size, eps,
            dy.stride(0), x.stride(0), platform.strides(z, 2)[0], dx.stride(0),
            platform.strides(dz, 2)[0], NORM_BEFORE_GATE=norm_before_gate, BLOCK=block,
            ROWS=NORM_BWD_ROWS, num_warps=norm_num_warps(block))


def _functional_fake(x, *args):
    return torch.empty_like(x)


_BACKWARD = platform.define_op(
    "rms_norm_gated_backward", "(Tensor dy, Tensor x, Tensor? weight, Tensor? z, Tensor(a!) dx, "
    "Tensor(b!)? dz, Tensor(c!)? dweight, float eps, int group_size, bool norm_before_gate) -> ()",
    _backward)


def _setup_context(ctx, inputs, output):
    x, weight, z, ctx.eps, ctx.group_size, ctx.norm_before_gate = inputs
    ctx.save_for_backward(x, weight, z)


def _autograd_backward(ctx, dy):
    x, weight, z = ctx.saved_tensors
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dx = torch.empty_like(x)
    dz = None if z is None else torch.empty_like(z)
    dweight = None if weight is None else x.new_empty(
        (norm_bwd_blocks(x.shape[0]), x.shape[1]), dtype=torch.float32)
    _BACKWARD(dy, x, weight, z, dx, dz, dweight, ctx.eps, ctx.group_size, ctx.norm_before_gate)
    if dweight is not None:
        dweight = dweight.sum(0).to(weight.dtype)
    return dx, dweight, dz, None, None, None


# The training form: a functional op (autograd cannot ride on one that
# writes its output in place) and its backward.
_FUNCTIONAL = platform.define_op(
    "rms_norm_gated_functional", "(Tensor x, Tensor? weight, Tensor? z, float eps, int group_size, "
    "bool norm_before_gate) -> Tensor", _functional, _functional_fake,
    autograd=(_autograd_backward, _setup_context))


def rms_norm_gated(x, weight, z=None, eps=1e-6, group_size=None, norm_before_gate=False, *,
                   out=None, residual=None, residual_out=None):
    """``x, z (T, hidden)``, ``weight (hidden,)`` or None -> ``out (T,
    hidden)`` (written into ``out`` when given, else allocated like ``x``).
    Normalised per group of ``group_size`` channels (default: all).
    Differentiable in x, weight and z (a Triton backward) when ``out`` is not
    given; a given ``out`` with inputs that require grad is refused.

    With ``residual (T, hidden)`` (z None): normalises ``s = x + residual``
    (float32) and returns ``(out, residual_out)``, ``residual_out (T,
    hidden)`` being s in residual's dtype, written into ``residual_out`` when
    given (``residual`` itself: in place), else allocated like ``residual``.
    Inference only: refused when inputs require grad."""
    arrays = dict(x=x, z=z, weight=weight, out=out, residual=residual, residual_out=residual_out)
    _, _, group_size = check_norm_args(**arrays, group_size=group_size, eps=eps)
    platform.check_kernel_device(arrays)
    for name, tensor in arrays.items():
        if tensor is not None and tensor.numel() and tensor.stride(-1) != 1:
            raise ValueError(f"rms_norm_gated: `{name}` must have unit stride over hidden, "
                             f"got strides {tuple(tensor.stride())}")
    options = dict(eps=float(eps), group_size=group_size, norm_before_gate=bool(norm_before_gate))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, z, residual, residual_out)):
        check_norm_grad(out=out, residual=residual)
        return _FUNCTIONAL(x, weight, z, **options)
    out = torch.empty_like(x) if out is None else out
    if residual is not None and residual_out is None:
        residual_out = torch.empty_like(residual)
    elif residual_out is not None and residual_out is not residual and (
            residual_out.untyped_storage().data_ptr() == residual.untyped_storage().data_ptr()):
        raise ValueError("rms_norm_gated: `residual_out` shares memory with `residual` without being "
                         "it; pass residual_out=residual to add in place, or a separate tensor")
    _OP(x=x, weight=weight, z=z, residual=residual, output=out, residual_out=residual_out, **options)
    return out if residual is None else (out, residual_out)
