"""Where the Triton kernels run (compiled on a CUDA GPU, else under Triton's
interpreter on the CPU) and the prologue every launcher shares. Imported
before any kernel is defined, because Triton reads TRITON_INTERPRET when a
``@triton.jit`` function is created."""

import contextlib
import inspect
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

import triton  # noqa: E402  (reads TRITON_INTERPRET, set above)


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
    """All given tensors (``{argument name: tensor or None}``) must share one
    device the kernels can run on; returns it."""
    devices = {tensor.device for tensor in tensors.values() if tensor is not None}
    if len(devices) != 1:
        first = next(name for name, tensor in tensors.items() if tensor is not None)
        other = next(name for name, tensor in tensors.items()
                     if tensor is not None and tensor.device != tensors[first].device)
        raise ValueError(f"`{other}` is on {tensors[other].device} but `{first}` is on {tensors[first].device}")
    device = devices.pop()
    if (device.type == "cuda") == INTERPRET:
        first = next(name for name, tensor in tensors.items() if tensor is not None)
        raise ValueError(f"`{first}` is on CUDA but TRITON_INTERPRET=1 runs kernels on the CPU" if INTERPRET
                         else f"`{first}` is on {device}; compiled Triton kernels need CUDA tensors")
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
    it, a cost per call; entering ``torch.cuda.device`` costs microseconds
    even when the device is already current, so that case skips it.)"""
    if device.type != "cuda" or device.index in (None, torch.cuda.current_device()):
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def cuda_graph(graph: "torch.cuda.CUDAGraph"):
    """``torch.cuda.graph(graph)`` capturing in "thread_local" mode. The
    default "global" mode fails a capture when any other thread of the
    process makes a capture-unsafe CUDA call meanwhile, which a process using
    both frameworks cannot rule out (JAX's runtime threads). The capturing
    thread's own unsafe calls still fail the capture. (A decode capture
    failed once on an H200 with ``cudaErrorStreamCaptureInvalidated``, cause
    not found; see experiments/results/gpu-2026-12-01c-NVIDIA_H200.md.)"""
    return torch.cuda.graph(graph, capture_error_mode="thread_local")


# Triton's launch path binds and specializes every argument on every call
# (tens of microseconds for a kernel of 50 arguments, more than the decode
# kernel runs). ``launch`` keeps, per kernel, device and argument classes
# (what Triton specializes on), the compiled kernel and the constexpr values
# that follow the positional arguments, and calls the compiled launcher
# directly: the same work Triton's own path ends in, minus its per-call
# binding. Any miss, the interpreter, a launch hook (profilers) or a Triton
# without the launcher layout this was written for takes Triton's path.
_PLANS: dict = {}
_I32 = range(-2**31, 2**31)
# The launcher layout ``launch`` calls (``CompiledKernel.run`` with packed metadata) is Triton 3.6's.
_DIRECT = not INTERPRET and triton.__version__.startswith("3.6.")
_HOOKS = triton.knobs.runtime  # launch hooks (profilers) are chains, empty unless one is added


def _arg_class(value):
    """What Triton's specialization depends on: a tensor's dtype and 16-byte
    alignment; an int's width and divisibility by 16, 1 being a constant
    of its own. None for what this does not classify (never cached)."""
    kind = type(value)
    if kind is int:
        if value == 1:
            return -1
        return (value in _I32) + 2 * (value & 15 == 0) if -2**63 <= value < 2**63 else None
    if value is None or kind is bool or kind is float:
        return kind
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() & 15 == 0
    return None


def launch(kernel, grid: tuple, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` for a ``@triton.jit`` kernel (with or
    without ``@triton.heuristics``) whose positional ``args`` are all its
    runtime parameters and whose remaining parameters are constexprs (in
    ``meta`` or from its heuristics); ``meta`` may add launch options
    (``num_warps``, ``num_stages``). Run with the tensors' device current."""
    if not _DIRECT:
        if (kernel, len(args)) not in _CHECKED_LAYOUTS:  # the interpreter checks what the direct path relies on
            _constexpr_tail(kernel, len(args))
            _CHECKED_LAYOUTS.add((kernel, len(args)))
        kernel[grid](*args, **meta)
        return
    device = torch.cuda.current_device()
    classes = tuple([_arg_class(a) for a in args])
    key = (kernel, device, classes, tuple(meta.items()))
    plan = _PLANS.get(key)
    if plan is None or _HOOKS.launch_enter_hook.calls or _HOOKS.launch_exit_hook.calls:
        compiled = kernel[grid](*args, **meta)
        if hasattr(compiled, "result"):  # an asynchronous compile
            compiled = compiled.result()
        if plan is None and None not in classes:
            _PLANS[key] = _plan(kernel, compiled, args, meta)
        return
    compiled, tail = plan
    compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                 torch._C._cuda_getCurrentRawStream(device), compiled.function, compiled.packed_metadata,
                 None, None, None, *args, *tail)


def _constexpr_tail(kernel, num_args: int) -> tuple:
    """(names, defaults) of the kernel's parameters after ``num_args``
    positional ones, which must all be constexprs."""
    fn = kernel
    while hasattr(fn, "fn"):  # heuristics -> jit (or interpreted) function -> Python function
        fn = fn.fn
    params = list(inspect.signature(fn).parameters.values())
    rest = params[num_args:]
    if num_args > len(params) or not all("constexpr" in str(p.annotation) for p in rest):
        raise TypeError(f"{fn.__name__}: launch() takes every runtime argument positionally "
                        f"and only constexprs by keyword; got {num_args} positional")
    return [p.name for p in rest], [p.default for p in rest]


_CHECKED_LAYOUTS: set = set()


def _plan(kernel, compiled, args, meta) -> tuple:
    """(compiled kernel, the constexpr values after ``args``, in parameter order)."""
    names, defaults = _constexpr_tail(kernel, len(args))
    bound = dict(zip(kernel.arg_names, args), **meta)
    for name, rule in getattr(kernel, "values", {}).items():  # the heuristics, as Triton applies them
        bound[name] = rule(dict(bound))
    return compiled, tuple(bound.get(name, default) for name, default in zip(names, defaults))


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
