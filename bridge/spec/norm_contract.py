"""The argument contract of the gated RMSNorm of a Mamba-2 layer (vLLM's
``Mixer2RMSNormGated``, mamba_ssm's ``rmsnorm_fn`` with a gate), checked once
for both frameworks.

    x, z, out   (T, hidden)
    weight      (hidden,) or None (no scale)

Per token and group of ``group_size`` channels (default: all of them), in
float32:

    norm_before_gate=False (the mixer):  v = x * silu(z);  y = v / sqrt(mean(v^2) + eps) * weight
    norm_before_gate=True:               y = x / sqrt(mean(x^2) + eps) * weight * silu(z)

Without ``z`` there is no gate. T = 0 is a no-op.

The residual form (mamba_ssm's ``layer_norm_fn(..., residual=, prenorm=True,
residual_in_fp32=True)``: a layer's residual add fused into the next norm),
without ``z``, inference only:

    residual, residual_out   (T, hidden)
    s = x + residual (float32);  y = s / sqrt(mean(s^2) + eps) * weight

returns ``(y, s)``: y in ``out``'s dtype (x's when not given), s in
residual's, the next layer's residual.
"""

from __future__ import annotations

import numbers

from bridge.spec.checks import as_int, dtype_name, expect_dtype, expect_shape, fail, shape_of

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
MAX_GROUP_SIZE = 16384  # one group is one tile of registers
FUNCTION = "rms_norm_gated"


def check_norm_args(*, x, z, weight, out, residual, group_size, eps,
                    residual_out=None) -> tuple[int, int, int]:
    """Check the arguments (arrays of either framework; ``residual_out``:
    torch's buffer for s); return ``(num_tokens, hidden, group_size)``.
    Raises ValueError naming the argument."""
    arrays = dict(x=x, z=z, weight=weight, out=out, residual=residual, residual_out=residual_out)
    for arg, value in arrays.items():
        if value is not None and not (hasattr(value, "shape") and hasattr(value, "dtype")):
            fail(FUNCTION, arg, f"must be an array (a tensor), got {type(value).__name__}")
        expect_dtype(FUNCTION, arg, dtype_name(value), FLOAT_DTYPES)
    shape = shape_of(x)
    if shape is None or len(shape) != 2:
        fail(FUNCTION, "x", f"must be 2-D (num_tokens, hidden), got shape {shape}")
    num_tokens, hidden = shape
    for arg in ("z", "out", "residual", "residual_out"):
        if arrays[arg] is not None:
            expect_shape(FUNCTION, arg, shape_of(arrays[arg]), shape)
    if residual is not None and z is not None:
        fail(FUNCTION, "residual", "cannot be combined with `z`: the residual form has no gate "
                                   "(z=None)")
    if residual_out is not None:
        if residual is None:
            fail(FUNCTION, "residual_out", "is given without `residual`")
        if dtype_name(residual_out) != dtype_name(residual):
            fail(FUNCTION, "residual_out", f"has dtype {dtype_name(residual_out)}; it holds s in "
                                           f"`residual`'s dtype ({dtype_name(residual)})")
    if weight is not None:
        expect_shape(FUNCTION, "weight", shape_of(weight), (hidden,))
    group_size = hidden if group_size is None else as_int(FUNCTION, "group_size", group_size,
                                                          minimum=1)
    if hidden % group_size:
        fail(FUNCTION, "group_size", f"must divide hidden={hidden}, got {group_size}")
    if group_size > MAX_GROUP_SIZE:
        fail(FUNCTION, "group_size", f"is {group_size}; at most {MAX_GROUP_SIZE} (one tile per group)")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        fail(FUNCTION, "eps", f"must be a number >= 0, got {eps!r}")
    return num_tokens, hidden, group_size


def norm_num_warps(block: int, max_warps: int = 16) -> int:
    """Warps for a tile of ``block`` channels: about 256 elements per warp,
    at most ``max_warps``."""
    return max(1, min(max_warps, block // 256))


# Backward (training): dx, dz and dweight from dy, the forward recomputed per
# token and group (float32). With n = v * rstd (v the normalised input: x * silu(z)
# gate-first, else x) and dn the gradient reaching n,
#     dv = rstd * (dn - n * mean(dn * n))   (mean over the group)
# dweight (per channel) is summed over blocks of NORM_BWD_ROWS tokens, one
# float32 partial per block, then over the blocks.
NORM_BWD_ROWS = 64


def check_norm_grad(*, out, residual) -> None:
    """The differentiable form has no residual and allocates its output."""
    if residual is not None:
        fail(FUNCTION, "residual", "(the fused residual add) is inference-only: it has no "
                                   "gradient; add the residual apart to differentiate")
    if out is not None:
        fail(FUNCTION, "out", "is written in place, which cannot carry a gradient: leave it None "
                              "when inputs require grad")


def norm_bwd_blocks(num_tokens: int) -> int:
    """Token blocks of the backward (rows of its dweight partials)."""
    return -(-num_tokens // NORM_BWD_ROWS)
