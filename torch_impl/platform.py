"""Where the Triton kernels run (compiled on a CUDA GPU, else under Triton's
interpreter on the CPU) and the prologue every launcher shares. Imported
before any kernel is defined, because Triton reads TRITON_INTERPRET when a
``@triton.jit`` function is created."""

import contextlib
import os
import sys

import torch

from bridge.spec.checks import index_checks_requested

ON_GPU = torch.cuda.is_available()
if not ON_GPU and os.environ.get("TRITON_INTERPRET") is None:
    if "triton" in sys.modules:
        # triton.language's own jit helpers were already built for compilation.
        raise ImportError("No CUDA device: import torch_impl before triton, or set "
                          "TRITON_INTERPRET=1, so that Triton runs in its interpreter")
    os.environ["TRITON_INTERPRET"] = "1"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


_DEVICE_NAMES: dict = {}


def device_name(device: torch.device) -> str:
    """The GPU's marketing name ('cpu' off the GPU), cached per device."""
    name = _DEVICE_NAMES.get(device)
    if name is None:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        _DEVICE_NAMES[device] = name
    return name


def check_kernel_device(tensors: dict) -> torch.device:
    """All given tensors must share one device the kernels can run on."""
    device = None
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if device is None:
            device, first = tensor.device, name
        elif tensor.device != device:
            raise ValueError(f"`{name}` is on {tensor.device} but `{first}` is on {device}")
    if device.type == "cuda" and INTERPRET:
        raise ValueError(f"`{first}` is on CUDA but TRITON_INTERPRET=1 runs kernels on the CPU")
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(f"`{first}` is on {device}; compiled Triton kernels need CUDA tensors")
    return device


def is_capturing(device: torch.device) -> bool:
    """A CUDA graph is being captured on the current stream, or torch.compile
    is tracing: no host copies then."""
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def host_index_values(validate, device: torch.device, **indices) -> dict | None:
    """Host (numpy) copies of the given index tensors for the debug-mode value
    checks (``bridge.spec.checks.index_checks_requested``), or None when the
    checks are off or cannot run (capture, tracing). Absent tensors are left out."""
    if not index_checks_requested(validate) or is_capturing(device):
        return None
    return {name: tensor.cpu().numpy() for name, tensor in indices.items() if tensor is not None}


def strides(tensor, ndim: int) -> tuple:
    """``tensor.stride()``, or ``ndim`` zeros for an absent operand."""
    return (0,) * ndim if tensor is None else tuple(tensor.stride())


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: this one's, for the launch.
    (A ``torch.device`` context would also intercept every torch call inside
    it, a cost per call.)"""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids. Host code uses this rather than
    ``triton.cdiv``, a ConstexprFunction in Triton 3.6 whose Python dispatch
    costs microseconds per call on the eager path."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (>= 1); see ``cdiv``."""
    return 1 << max(n - 1, 0).bit_length()


def given_flags(**pointers: str) -> dict:
    """``@triton.heuristics`` for optional operands: each flag (``HAS_Z=
    "z_ptr"``) True when its pointer argument is given (not None)."""
    return {flag: (lambda args, name=name: args[name] is not None) for flag, name in pointers.items()}


# The public ops as torch ops: opaque to torch.compile (which sees the fakes)
# and safe in a CUDA graph. Defined through torch.library.Library rather than
# torch.library.custom_op: the latter's Python dispatch of mutated arguments
# costs ~20x more per eager call (measured: 120-150 us against 7 us on CPU).
_LIB = torch.library.Library("mamba_twin", "FRAGMENT")


def _writes_in_place(*args, **kwargs) -> None:
    """The fake of an op that only writes its mutated arguments."""


def define_op(name: str, schema: str, impl, fake=_writes_in_place, autograd=None):
    """Register ``mamba_twin::<name>``: ``schema`` its arguments and results
    (``"(Tensor x, Tensor(a!) out) -> ()"``; mutated tensors marked), ``impl``
    the implementation, ``fake`` the shapes for torch.compile (default: an op
    that returns nothing), ``autograd`` an optional ``(backward,
    setup_context)`` pair. Returns the op's default overload."""
    _LIB.define(name + schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"mamba_twin::{name}", fake, lib=_LIB)
    if autograd is not None:
        backward, setup_context = autograd
        torch.library.register_autograd(f"mamba_twin::{name}", backward,
                                        setup_context=setup_context, lib=_LIB)
    return getattr(torch.ops.mamba_twin, name).default
