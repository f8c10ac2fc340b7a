"""Gated RMSNorm of a Mamba-2 layer (norm(x * silu(z)) per group of
channels, scaled by ``weight``) as a Triton kernel behind a torch op. The
math and the argument rules: ``bridge.spec.norm_contract``. Mirror:
``jax_impl/gated_rms_norm.py``.
"""

from __future__ import annotations

import torch

from bridge.spec.norm_contract import check_norm_args, norm_num_warps
from torch_impl import platform

import triton  # noqa: E402  (after platform, which may set TRITON_INTERPRET)
import triton.language as tl  # noqa: E402


@triton.heuristics(platform.given_flags(HAS_Z="z_ptr", HAS_WEIGHT="w_ptr"))
@triton.jit
def _rms_norm_gated_kernel(
    x_ptr, z_ptr, w_ptr, out_ptr, group_size, eps,
    stride_x_tok, stride_z_tok, stride_o_tok,
    NORM_BEFORE_GATE: tl.constexpr, BLOCK: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_WEIGHT: tl.constexpr,
):
    """Grid (num_tokens, num_groups): one group of one token per program."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * group_size + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < group_size
    x = tl.load(x_ptr + token * stride_x_tok + offs, mask=mask, other=0.0).to(tl.float32)
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


def _launch(x, weight, z, output, eps, group_size, norm_before_gate):
    num_tokens, hidden = x.shape
    if num_tokens == 0:
        return
    block = triton.next_power_of_2(group_size)
    with platform.on_device(x.device):
        _rms_norm_gated_kernel[(num_tokens, hidden // group_size)](
            x, z, weight, output, group_size, eps,
            x.stride(0), platform.strides(z, 2)[0], output.stride(0),
            NORM_BEFORE_GATE=norm_before_gate, BLOCK=block, num_warps=norm_num_warps(block))


# The launch as a torch op (as the conv's, see there; ``output``, not ``out``).
_LIB = torch.library.Library("mamba_twin", "FRAGMENT")
_LIB.define("rms_norm_gated(Tensor x, Tensor? weight, Tensor? z, Tensor(a!) output, float eps, "
            "int group_size, bool norm_before_gate) -> ()")
_LIB.impl("rms_norm_gated", _launch, "CompositeExplicitAutograd")


@torch.library.register_fake("mamba_twin::rms_norm_gated", lib=_LIB)
def _writes_in_place(*args, **kwargs) -> None:
    """The op only writes ``output``."""


def rms_norm_gated(x, weight, z=None, eps=1e-6, group_size=None, norm_before_gate=False, *,
                   out=None):
    """``x, z (T, hidden)``, ``weight (hidden,)`` or None -> ``out (T,
    hidden)`` (written into ``out`` when given, else allocated like ``x``).
    Normalised per group of ``group_size`` channels (default: all)."""
    arrays = dict(x=x, z=z, weight=weight, out=out)
    _, _, group_size = check_norm_args(**arrays, group_size=group_size, eps=eps)
    platform.check_kernel_device(arrays)
    for name, tensor in arrays.items():
        if tensor is not None and tensor.numel() and tensor.stride(-1) != 1:
            raise ValueError(f"rms_norm_gated: `{name}` must have unit stride over hidden, "
                             f"got strides {tuple(tensor.stride())}")
    out = torch.empty_like(x) if out is None else out
    torch.ops.mamba_twin.rms_norm_gated.default(x=x, weight=weight, z=z, output=out, eps=float(eps),
                                                group_size=group_size,
                                                norm_before_gate=bool(norm_before_gate))
    return out
