"""Argument-error helpers shared by every contract: one message format,
``<op>: `<argument>` <what is wrong>``, always a ValueError."""

from __future__ import annotations

import numbers
import os
from typing import NoReturn, Optional, Sequence

import numpy as np

Shape = Optional[Sequence[int]]


def fail(op: str, arg: str, message: str) -> NoReturn:
    raise ValueError(f"{op}: `{arg}` {message}")


def expect_shape(op: str, arg: str, shape: Shape, *allowed: tuple[int, ...]) -> None:
    """``shape`` must be one of ``allowed``."""
    if shape is None or tuple(shape) not in allowed:
        wanted = " or ".join(str(a) for a in allowed)
        fail(op, arg, f"has shape {None if shape is None else tuple(shape)}, expected {wanted}")


def expect_dtype(op: str, arg: str, dtype: Optional[str], allowed: Sequence[str]) -> None:
    """``dtype`` (a name, or None for an absent argument) must be in ``allowed``."""
    if dtype is not None and dtype not in allowed:
        fail(op, arg, f"has dtype {dtype}; supported: {', '.join(allowed)}")


def as_int(op: str, arg: str, value, *, minimum: Optional[int] = None) -> int:
    """An integer-like value (Python or numpy integer; not bool, not float) as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(op, arg, f"must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        fail(op, arg, f"must be >= {minimum}, got {value}")
    return value


# Host-side value checks of index arrays cost a device sync, so the kernels
# bounds-check on the device instead (out-of-range work is skipped and its
# outputs poisoned with NaN); the host checks, with their clear errors, are a
# debug mode: an op's ``validate_indices=True`` or this variable set to 1.
CHECK_INDICES_ENV = "MAMBA_TWIN_CHECK_INDICES"


def index_checks_requested(validate: Optional[bool]) -> bool:
    """``validate`` as given, else the debug-mode variable (default off)."""
    if validate is not None:
        return bool(validate)
    return os.environ.get(CHECK_INDICES_ENV, "0") not in ("", "0")


def shape_of(array) -> Optional[tuple[int, ...]]:
    """The shape of a torch / jax / numpy array, None for an absent one."""
    return None if array is None else tuple(array.shape)


def dtype_name(array) -> Optional[str]:
    """'float32', 'bfloat16', ... for a torch / jax / numpy array, None for an absent one."""
    if array is None:
        return None
    dtype = array.dtype
    if isinstance(dtype, np.dtype):  # numpy and JAX
        return dtype.name
    # torch: str() of a dtype costs microseconds, so once per dtype. The cache
    # holds torch dtypes only: torch.compile cannot trace a dict with numpy keys.
    name = _TORCH_DTYPE_NAMES.get(dtype)
    if name is None:
        name = _TORCH_DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


_TORCH_DTYPE_NAMES: dict = {}


def array_signature(arrays) -> tuple:
    """``((shape, dtype name) or None, ...)`` of torch / jax / numpy arrays
    (None absent): what the array checks depend on, hashable, so a contract
    checks a signature once. AttributeError for something not an array."""
    return tuple([None if a is None else (tuple(a.shape), dtype_name(a)) for a in arrays])
