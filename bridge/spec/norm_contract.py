"""The argument contract of the gated RMSNorm of a Mamba-2 layer (vLLM's
``Mixer2RMSNormGated``, mamba_ssm's ``rmsnorm_fn`` with a gate), checked once
for both frameworks.

    x, z, out   (T, hidden)
    weight      (hidden,) or None (no scale)

Per token and group of ``group_size`` channels (default: all of them), in
float32:

    norm_before_gate=False (the mixer):  v = x * silu(z);  y = v / sqrt(mean(v^2) + eps) * weight
    norm_before_gate=True:               y = x / sqrt(mean(x^2) + eps) * weight * silu(z)

Without ``z`` there is no gate.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
MAX_GROUP_SIZE = 16384  # one group is one tile of registers

Shape = Optional[Sequence[int]]


def _fail(arg: str, message: str):
    raise ValueError(f"rms_norm_gated: `{arg}` {message}")


def check_norm_args(shapes: Mapping[str, Shape], dtypes: Mapping[str, Optional[str]], *,
                    group_size: Optional[int], eps: float) -> tuple[int, int, int]:
    """Check the arguments; return ``(num_tokens, hidden, group_size)``."""
    x = shapes.get("x")
    if x is None or len(x) != 2:
        _fail("x", f"must be 2-D (num_tokens, hidden), got shape {x}")
    num_tokens, hidden = x
    for arg in ("z", "out"):
        if shapes.get(arg) is not None and tuple(shapes[arg]) != tuple(x):
            _fail(arg, f"has shape {tuple(shapes[arg])}, expected {tuple(x)}")
    if shapes.get("weight") is not None and tuple(shapes["weight"]) != (hidden,):
        _fail("weight", f"has shape {tuple(shapes['weight'])}, expected ({hidden},)")
    group_size = hidden if group_size is None else group_size
    if not isinstance(group_size, int) or group_size < 1 or hidden % group_size:
        _fail("group_size", f"must divide hidden={hidden}, got {group_size!r}")
    if group_size > MAX_GROUP_SIZE:
        _fail("group_size", f"is {group_size}; at most {MAX_GROUP_SIZE} (one tile per group)")
    if not eps >= 0:
        _fail("eps", f"must be >= 0, got {eps!r}")
    for arg in ("x", "z", "weight", "out"):
        if dtypes.get(arg) is not None and dtypes[arg] not in FLOAT_DTYPES:
            _fail(arg, f"has dtype {dtypes[arg]}; supported: {', '.join(FLOAT_DTYPES)}")
    return num_tokens, hidden, group_size


def norm_num_warps(block: int) -> int:
    """Warps for a tile of ``block`` channels: about 256 elements per warp."""
    return max(1, min(16, block // 256))
