"""Zero-copy sharing between torch and JAX through DLPack, and JAX steps that
update torch-owned memory in place.

torch and jax are imported inside the functions, so ``import bridge`` stays
free of both.

Stream safety (CUDA): both directions go through the protocol's ``stream``
argument. ``jax.dlpack.from_dlpack`` passes JAX's stream to
``Tensor.__dlpack__``, which makes it wait for the work queued on torch's
current stream; ``torch.from_dlpack`` passes torch's current stream to
``jax.Array.__dlpack__``, which makes it wait until the array is computed.
No device-wide synchronize.

Lifetime: a view holds a reference to the producer's memory (the DLPack
capsule's deleter releases it), so memory outlives its owner while views of
it exist. A JAX array consumed by a donation is deleted; using it raises
JAX's ``RuntimeError: Array has been deleted``, it never reads stale memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any, Callable, Sequence

from bridge.spec import checks

# The dtypes both frameworks exchange through DLPack (jax.dlpack's list, less
# those torch lacks). 64-bit ones need JAX's x64 mode on the JAX side.
SHARED_DTYPES = ("float32", "float16", "bfloat16", "float64", "int8", "int16", "int32",
                 "int64", "uint8", "bool", "complex64", "complex128")
X64_DTYPES = ("float64", "int64", "complex128")


class BridgeCopyWarning(UserWarning):
    """A bridge call copied because the caller allowed it (``copy_ok=True``)."""


class AliasLostError(RuntimeError):
    """A donated JAX step did not write into the torch memory on a device
    where aliasing is expected, and the write-back fallback was not allowed."""


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def x64_enabled() -> bool:
    import jax

    return bool(jax.config.jax_enable_x64)


def _jax_has_gpu() -> bool:
    import jax

    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def _torch_export_problem(tensor) -> str | None:
    """Why JAX cannot take ``tensor`` without a copy, or None."""
    device = tensor.device.type
    if device == "cuda" and not _jax_has_gpu():
        return f"is on {tensor.device} but JAX has no GPU backend here"
    if device not in ("cpu", "cuda"):
        return f"is on {tensor.device}; the bridge shares cpu and cuda memory only"
    # DLPack carries no lazy-negation / conjugation bit: JAX would read the stored values.
    if tensor.is_neg():
        return "has torch's negative bit set (a lazy negation view, e.g. x.conj().imag), which DLPack drops"
    if tensor.is_conj():
        return "has torch's conjugate bit set (a lazy x.conj() view), which DLPack drops"
    if not tensor.is_contiguous():
        return (f"is not contiguous (shape {tuple(tensor.shape)}, strides {tuple(tensor.stride())}); "
                "JAX arrays are row-major and dense")
    return None


def _copy_warning(function: str, name: str, problem: str) -> None:
    warnings.warn(f"{function}: `{name}` {problem}; copied it (copy_ok=True)",
                  BridgeCopyWarning, stacklevel=3)


def to_jax(tensor, *, copy_ok: bool = False, name: str = "tensor"):
    """The ``jax.Array`` on ``tensor``'s memory (same shape, dtype, device).

    Zero-copy, verified by pointer. Where JAX would need a copy (not
    contiguous, misaligned for XLA — 64 bytes on CPU —, a device JAX does not
    have, torch's lazy negative or conjugate bit set) raises ValueError naming
    ``name``, or, with ``copy_ok=True``, copies (resolving those bits) and
    warns (BridgeCopyWarning). A tensor that requires grad is detached (no
    copy). Dtypes: ``SHARED_DTYPES``; int64/float64 need ``jax_enable_x64``
    (without it JAX would narrow them, which is not a copy ``copy_ok`` can
    allow).

    The array does not keep ``tensor``'s storage the size it was:
    ``tensor.resize_()`` / ``set_()`` afterwards may free or move the memory
    the array reads (garbage or a crash). Do not resize a shared tensor;
    ``MambaStateCache`` detects it for its buffers.
    """
    import jax
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"to_jax: `{name}` must be a torch.Tensor, got {type(tensor).__name__}")
    dtype = _dtype_name(tensor.dtype)
    if dtype not in SHARED_DTYPES:
        raise ValueError(f"to_jax: `{name}` has dtype {dtype}, which JAX cannot take through DLPack; "
                         f"shared dtypes: {', '.join(SHARED_DTYPES)}")
    if dtype in X64_DTYPES and not x64_enabled():
        raise ValueError(f"to_jax: `{name}` has dtype {dtype}, which JAX narrows to 32 bits unless "
                         "jax_enable_x64 is set (jax.config.update('jax_enable_x64', True) or "
                         "`with jax.enable_x64(True):`)")
    tensor = tensor.detach()
    problem = _torch_export_problem(tensor)
    if problem is not None:
        if not copy_ok:
            raise ValueError(f"to_jax: `{name}` {problem}, so sharing it would need a copy; "
                             "pass copy_ok=True to allow one")
        _copy_warning("to_jax", name, problem)
        device_ok = tensor.device.type == "cpu" or _jax_has_gpu()
        tensor = (tensor if device_ok else tensor.cpu()).resolve_neg().resolve_conj().contiguous()
    # torch exports a CUDA tensor only while its device is the current one
    # (BufferError otherwise: seen on a 2-GPU host for a tensor on cuda:1).
    current = torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()
    with current:
        try:
            array = jax.dlpack.from_dlpack(tensor, copy=False)
        except ValueError as error:  # jax's message for misaligned memory
            if not copy_ok:
                raise ValueError(f"to_jax: `{name}` (address {tensor.data_ptr():#x}) is not aligned the way "
                                 f"XLA needs ({error}); pass copy_ok=True to allow a copy") from None
            _copy_warning("to_jax", name, "is misaligned for XLA")
            # A fresh allocation is aligned.
            return jax.dlpack.from_dlpack(tensor.clone(), copy=False)
    if tensor.numel() and array.unsafe_buffer_pointer() != tensor.data_ptr():
        raise ValueError(f"to_jax: JAX copied `{name}` (pointer {array.unsafe_buffer_pointer():#x} != "
                         f"{tensor.data_ptr():#x}); cannot share it")
    return array


def to_torch(array, *, copy_ok: bool = False, name: str = "array"):
    """The ``torch.Tensor`` on ``array``'s memory (same shape, dtype, device).

    Zero-copy, verified by pointer. A deleted (donated) array raises JAX's
    RuntimeError. An array on a device torch lacks (a GPU array without CUDA
    torch) raises ValueError naming ``name``, or, with ``copy_ok=True``, is
    copied to the host with a BridgeCopyWarning. Arrays spread over several
    devices and dtypes torch lacks (int4, most float8 kinds) raise ValueError.
    """
    import jax
    import torch

    if not isinstance(array, jax.Array):
        raise ValueError(f"to_torch: `{name}` must be a jax.Array, got {type(array).__name__}")
    if array.is_deleted():
        # jax's own error, e.g. "Array has been deleted with shape=float32[4]."
        array.unsafe_buffer_pointer()
    devices = array.devices()
    if len(devices) != 1:
        raise ValueError(f"to_torch: `{name}` is spread over {len(devices)} devices; share one shard "
                         "at a time (array.addressable_shards[i].data)")
    dtype = _dtype_name(array.dtype)
    if dtype not in SHARED_DTYPES:
        raise ValueError(f"to_torch: `{name}` has dtype {dtype}, which torch cannot take through DLPack; "
                         f"shared dtypes: {', '.join(SHARED_DTYPES)}")
    (device,) = devices
    if device.platform == "gpu" and not torch.cuda.is_available():
        problem = f"is on {device} but torch has no CUDA here"
        if not copy_ok:
            raise ValueError(f"to_torch: `{name}` {problem}, so sharing it would need a copy; "
                             "pass copy_ok=True to allow one")
        _copy_warning("to_torch", name, problem)
        array = jax.device_put(array, jax.devices("cpu")[0])
    elif device.platform not in ("cpu", "gpu"):
        raise ValueError(f"to_torch: `{name}` is on {device}; the bridge shares cpu and cuda memory only")
    tensor = torch.from_dlpack(array)
    if tensor.numel() and tensor.data_ptr() != array.unsafe_buffer_pointer():
        raise ValueError(f"to_torch: torch copied `{name}`; cannot share it")
    return tensor


@dataclasses.dataclass(frozen=True)
class InplaceStep:
    """What ``jax_step_into`` did.

    outputs: the step's outputs; each new state among them is a JAX view of
        its torch tensor's memory (never a detached copy).
    aliased: per state, True when XLA wrote into the torch memory (zero copies).
    written_back: per state, True when the bridge copied the result into it.
    """

    outputs: Any
    aliased: tuple[bool, ...]
    written_back: tuple[bool, ...]

    @property
    def num_written_back(self) -> int:
        return sum(self.written_back)


def jax_step_into(torch_states: Sequence, step_fn: Callable, *args, state_outputs: Sequence[int],
                  allow_writeback: bool | None = None, **kwargs) -> InplaceStep:
    """Run a JAX step that updates torch tensors in place.

    ``step_fn(*jax_states, *args, **kwargs)`` gets a JAX view of each tensor
    in ``torch_states`` as its leading positional arguments and returns a
    tuple whose entries ``state_outputs[i]`` are the new ``torch_states[i]``
    (same shape and dtype). Jit it with those leading arguments donated (and,
    for Pallas, ``input_output_aliases``) so XLA can write in place, e.g.
    ``jax.jit(jax_impl.selective_state_update, donate_argnums=0, ...)`` with
    ``state_outputs=(1,)``.

    Where XLA aliased the donated memory (pointer check), nothing is copied.
    Where it did not (on CPU, XLA never donates memory torch also holds), the
    result is copied into the torch tensor when ``allow_writeback`` is True —
    the default on CPU — and ``written_back`` says so; with it False (the
    default on CUDA) AliasLostError is raised and no tensor is changed. The
    JAX views passed in are consumed by the donation: reusing one raises
    JAX's "Array has been deleted" error. On CUDA, torch's current stream is
    ordered after the step before this returns.
    """
    states = tuple(torch_states)
    views = [to_jax(state, name=f"torch_states[{i}]") for i, state in enumerate(states)]
    return run_step_on_views(states, views, step_fn, args, kwargs, state_outputs=state_outputs,
                             allow_writeback=allow_writeback, order_torch=True)


def run_step_on_views(states: Sequence, views: Sequence, step_fn: Callable, args: tuple, kwargs: dict,
                      *, state_outputs: Sequence[int], allow_writeback: bool | None,
                      order_torch: bool) -> InplaceStep:
    """``jax_step_into`` on JAX views of ``states`` that the caller made
    (``MambaStateCache`` reuses the previous step's output as the next
    step's view). ``order_torch=False`` leaves torch's stream unordered after
    an aliased step; the caller must order it (``to_torch`` of the new
    state) before torch touches the memory."""
    op = "jax_step_into"
    states = tuple(states)
    if len(state_outputs) != len(states):
        checks.fail(op, "state_outputs", f"names {len(state_outputs)} outputs for {len(states)} torch_states")
    state_outputs = [checks.as_int(op, f"state_outputs[{i}]", index, minimum=0)
                     for i, index in enumerate(state_outputs)]
    if len(set(state_outputs)) != len(state_outputs):
        checks.fail(op, "state_outputs", f"{state_outputs} names an output twice; each state needs its own")
    # Two states on overlapping memory would be donated twice and written in an undefined order.
    spans = sorted((s.data_ptr(), s.data_ptr() + s.numel() * s.element_size(), i)
                   for i, s in enumerate(states) if s.numel())
    for (_, end, i), (start, _, j) in zip(spans, spans[1:]):
        if start < end:
            checks.fail(op, "torch_states", f"entries {min(i, j)} and {max(i, j)} share memory")
    outputs = step_fn(*views, *args, **kwargs)
    results = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    new_states = []
    for i, (state, index) in enumerate(zip(states, state_outputs)):
        if not 0 <= index < len(results):
            raise ValueError(f"jax_step_into: `state_outputs[{i}]` = {index} but step_fn returned "
                             f"{len(results)} outputs")
        new = results[index]
        if tuple(new.shape) != tuple(state.shape) or _dtype_name(new.dtype) != _dtype_name(state.dtype):
            raise ValueError(f"jax_step_into: step_fn output {index} is {_dtype_name(new.dtype)}"
                             f"{tuple(new.shape)} but `torch_states[{i}]` is "
                             f"{_dtype_name(state.dtype)}{tuple(state.shape)}")
        new_states.append(new)
    if any(state.device.type == "cpu" for state in states):
        # On CPU unsafe_buffer_pointer waits for the step while holding the GIL, and what
        # XLA:CPU does as a step on donated DLPack views of torch memory ends can need the
        # GIL: a deadlock, seen once in CI and reproduced with plain jax + torch (an output's
        # unsafe_buffer_pointer right after the donating call hangs within ~10 steps).
        # block_until_ready waits with the GIL released.
        import jax

        jax.block_until_ready(new_states)
    # On CUDA the address of an output is known at dispatch: this does not wait for the step.
    aliased = tuple(state.numel() == 0 or new.unsafe_buffer_pointer() == state.data_ptr()
                    for state, new in zip(states, new_states))
    if not all(aliased):
        if allow_writeback is None:
            allow_writeback = all(state.device.type == "cpu" for state in states)
        if not allow_writeback:
            lost = [i for i, ok in enumerate(aliased) if not ok]
            raise AliasLostError(
                f"jax_step_into: XLA did not write torch_states{lost} in place (the donated memory "
                "was not aliased); the torch tensors are unchanged. Pass allow_writeback=True to "
                "copy results back instead.")
    results = list(results)
    for state, new, index, in_place in zip(states, new_states, state_outputs, aliased):
        if not in_place:
            state.copy_(to_torch(new, name="step_fn output"))
            results[index] = to_jax(state, name="torch_states")
        elif order_torch:
            to_torch(new, name="step_fn output")  # makes torch's stream wait for the step (CUDA)
    if isinstance(outputs, (tuple, list)):
        outputs = type(outputs)(results)
    else:
        (outputs,) = results
    return InplaceStep(outputs, aliased, tuple(not ok for ok in aliased))
