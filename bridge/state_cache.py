"""A state cache that torch and JAX share: each state of each layer is one
buffer, allocated once by either framework, handed out as torch tensors and
jax arrays of the same memory.

torch and jax are imported inside the methods (``import bridge`` stays free
of both).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from bridge.spec import checks, copy_spec
from bridge.dlpack import X64_DTYPES, InplaceStep, run_step_on_views, to_jax, to_torch, x64_enabled

OWNERS = ("torch", "jax")


def _layout(tensor) -> tuple:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes(), tensor.data_ptr(), tuple(tensor.shape)


def _jax_device(device: str):
    """torch-style device string ('cpu', 'cuda', 'cuda:1') -> jax.Device."""
    import jax

    kind, _, index = device.partition(":")
    platform = {"cpu": "cpu", "cuda": "gpu"}[kind]
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        checks.fail("MambaStateCache", "device", f"{device!r} but JAX has no {platform} backend")
    if int(index or 0) >= len(devices):
        checks.fail("MambaStateCache", "device", f"{device!r} but JAX sees {len(devices)} {platform} devices")
    return devices[int(index or 0)]


class MambaStateCache:
    """The states of ``num_layers`` Mamba-type layers, ``num_blocks`` cache
    blocks each.

    Layer ``l``'s state ``name`` is a contiguous ``(num_blocks, *shape)``
    buffer, ``shape`` from ``state_shapes`` (a tuple such as
    ``MambaStateShapeCalculator.mamba2_state_shape(...)`` returns: conv
    ``(state_len, dim)`` in SD or ``(dim, state_len)`` in DS, SSM ``(nheads,
    head_dim, state_size)``), ``names`` naming them in order (default
    ``("conv", "ssm")``). ``dtypes`` is one dtype name or one per state.

    ``owner`` ("torch" or "jax") allocates the memory, on ``device`` ('cpu',
    'cuda', 'cuda:i'); the other framework gets views through DLPack.
    ``torch(name, layer)`` returns the stored tensor; ``jax(name, layer)``
    builds a fresh zero-copy array each call (a DLPack import, about 0.1 ms
    on the H100) so that on CUDA every hand-over orders JAX after torch's
    queued work, and an array consumed by a donation is never handed out
    again.

    JAX steps (``run_jax_inplace``) run back to back without those imports:
    a step's new state, which XLA wrote into the cache's memory, is the next
    step's input. That chain ends, and the next step imports afresh (so JAX
    waits for torch), when ``torch(name, layer)`` is called — or ``write`` or
    ``copy_blocks`` — or when a torch in-place op changed the tensor's
    version counter. So torch code that writes the cache between JAX steps
    must take the tensor from ``torch(...)`` at that point, not reuse one
    taken before the JAX steps (a Triton kernel writing through an old
    reference bumps no version counter, and JAX would not wait for it).

    Resizing: each buffer's storage (address, size) and shape are recorded;
    ``torch``, ``jax``, ``write``, ``copy_blocks`` and ``run_jax_inplace``
    raise RuntimeError if a torch ``resize_()`` / ``set_()`` changed them
    (JAX views of the old storage would read freed memory).

    Lifetime: views keep the memory alive (DLPack capsules hold the owner's
    storage), so a view kept by either framework stays valid, with its
    values, even after the cache is deleted; the memory is freed when the
    cache and its last view are gone. Views obtained before a JAX step that
    donated them are deleted by it; ask the cache for new ones.
    """

    def __init__(self, state_shapes: Sequence[Sequence[int]], dtypes: str | Sequence[str],
                 num_blocks: int, *, num_layers: int = 1, names: Sequence[str] = ("conv", "ssm"),
                 owner: str = "torch", device: str = "cpu"):
        import torch

        op = "MambaStateCache"
        self.state_shapes = tuple(tuple(checks.as_int(op, "state_shapes", n, minimum=0) for n in shape)
                                  for shape in state_shapes)
        self.names = tuple(names)
        if len(self.names) != len(self.state_shapes):
            checks.fail(op, "names", f"{self.names} does not name the {len(self.state_shapes)} states "
                        "of `state_shapes`")
        self.dtypes = (dtypes,) * len(self.names) if isinstance(dtypes, str) else tuple(dtypes)
        if len(self.dtypes) != len(self.names):
            checks.fail(op, "dtypes", f"has {len(self.dtypes)} entries for {len(self.names)} states")
        num_blocks = checks.as_int(op, "num_blocks", num_blocks, minimum=1)
        num_layers = checks.as_int(op, "num_layers", num_layers, minimum=1)
        if owner not in OWNERS:
            checks.fail(op, "owner", f"must be one of {OWNERS}, got {owner!r}")
        for dtype in self.dtypes:
            if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
                checks.fail(op, "dtypes", f"holds {dtype!r}, not a dtype name")
            if owner == "jax" and dtype in X64_DTYPES and not x64_enabled():
                checks.fail(op, "dtypes", f"holds {dtype}, which JAX allocates as 32 bits unless "
                            "jax_enable_x64 is set; enable it or use owner='torch'")
        device = str(device)
        kind, _, index = device.partition(":")
        if kind not in ("cpu", "cuda") or not (index or "0").isdigit():
            checks.fail(op, "device", f"{device!r} must be 'cpu' or 'cuda[:i]'")
        if kind == "cuda" and not torch.cuda.is_available():
            checks.fail(op, "device", f"{device!r} but torch has no CUDA here")
        self.num_blocks, self.num_layers, self.owner = num_blocks, num_layers, owner
        self.device = torch.device(device)
        self.steps_aliased = 0  # JAX steps that wrote in place
        self.steps_written_back = 0  # JAX steps whose result the bridge copied in
        self._tensors: dict[tuple[int, str], torch.Tensor] = {}
        # The latest JAX step's new state per buffer, and the tensor's version
        # counter then: the next step's input while neither changed.
        self._step_views: dict[tuple[int, str], tuple[object, int]] = {}
        # Buffers written by JAX steps that torch's stream is not yet ordered after.
        self._unordered: set[tuple[int, str]] = set()
        self._allocations = []  # owner="jax": the arrays that own the memory
        # Per buffer, what a resize_/set_ would change: storage address and size, shape.
        self._layouts: dict[tuple[int, str], tuple] = {}
        for layer in range(num_layers):
            for name, shape, dtype in zip(self.names, self.state_shapes, self.dtypes):
                tensor = self._allocate((num_blocks, *shape), dtype, device)
                self._tensors[layer, name] = tensor
                self._layouts[layer, name] = _layout(tensor)

    def _allocate(self, shape: tuple[int, ...], dtype: str, device: str):
        import torch

        if self.owner == "torch":
            return torch.zeros(shape, dtype=getattr(torch, dtype), device=device)
        import jax.numpy as jnp

        array = jnp.zeros(shape, dtype=dtype, device=_jax_device(device))
        self._allocations.append(array)
        return to_torch(array, name="allocation")

    def _key(self, name: str, layer: int) -> tuple[int, str]:
        if name not in self.names:
            checks.fail("MambaStateCache", "name", f"{name!r} is not one of {self.names}")
        layer = checks.as_int("MambaStateCache", "layer", layer)
        if not 0 <= layer < self.num_layers:
            checks.fail("MambaStateCache", "layer", f"{layer} is outside [0, {self.num_layers})")
        return layer, name

    def _tensor(self, key):
        """The stored tensor of ``key``, refused if its storage changed since allocation."""
        tensor = self._tensors[key]
        if _layout(tensor) != self._layouts[key]:
            layer, name = key
            raise RuntimeError(
                f"MambaStateCache: the torch tensor of state {name!r} of layer {layer} was resized or "
                "given other storage (resize_ / set_) after the cache shared it; JAX views of it would "
                "read freed memory. Do not resize cache tensors; make a new cache.")
        return tensor

    def torch(self, name: str = "ssm", layer: int = 0):
        """The torch tensor ``(num_blocks, *shape)`` of state ``name``, with
        torch's current stream ordered after the JAX steps that wrote it.
        Ends the JAX steps' chain on it (see the class docstring)."""
        return self._claim(self._key(name, layer))

    def claim_for_torch(self) -> None:
        """``torch(name, layer)`` for every state at once, for a caller that
        writes them all through addresses it captured (a CUDA graph)."""
        for key in self._tensors:
            self._claim(key)

    def _claim(self, key):
        layer, name = key
        view, _ = self._step_views.pop(key, (None, None))
        if key in self._unordered:
            if view is not None and not view.is_deleted():
                to_torch(view, name=f"{name} state of layer {layer}")  # torch's stream waits for JAX
            elif self.device.type == "cuda":  # a step that failed consumed the view to wait on
                import torch

                torch.cuda.synchronize(self.device)
            self._unordered.discard(key)
        return self._tensor(key)

    def jax(self, name: str = "ssm", layer: int = 0):
        """A jax.Array ``(num_blocks, *shape)`` on the same memory as ``torch(name, layer)``."""
        return to_jax(self._tensor(self._key(name, layer)), name=f"{name} state of layer {layer}")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def write(self, name: str, values, block_ids: Sequence[int], layer: int = 0) -> None:
        """Write ``values`` (torch, jax or numpy array, ``(len(block_ids),
        *shape)``) into blocks ``block_ids`` of state ``name``, e.g. the final
        states of a prefill. ``block_ids``: distinct, in ``[0, num_blocks)``.
        Everything is checked before the first write."""
        op = "MambaStateCache.write"
        target = self.torch(name, layer)
        block_ids = copy_spec.checked_block_ids(op, "block_ids", block_ids, self.num_blocks)
        want = (len(block_ids), *target.shape[1:])
        if not hasattr(values, "shape"):
            checks.fail(op, "values", f"must be a torch, jax or numpy array, got {type(values).__name__}")
        if tuple(values.shape) != want:
            checks.fail(op, "values", f"has shape {tuple(values.shape)}, expected {want} for "
                        f"{len(block_ids)} blocks of state {name!r}")
        dtype = checks.dtype_name(values)
        if dtype.startswith("complex") and not target.is_complex():
            checks.fail(op, "values", f"is {dtype}; state {name!r} is {checks.dtype_name(target)} "
                        "and would drop the imaginary part")
        import torch

        if hasattr(values, "unsafe_buffer_pointer"):  # jax.Array
            values = to_torch(values, name="values")
        elif isinstance(values, np.ndarray):
            values = torch.from_numpy(np.ascontiguousarray(values))
        index = torch.as_tensor(block_ids, dtype=torch.long, device=target.device)
        target.index_copy_(0, index, values.to(target.device, target.dtype))

    def copy_blocks(self, name: str, specs: Sequence[copy_spec.MambaCopySpec],
                    dst_block_ids: Sequence[int], layer: int = 0) -> None:
        """Apply prefix-caching copy specs to state ``name`` in place (one
        batched gather/scatter); the specs may have been computed from either
        framework's view, the addresses are the same."""
        copy_spec.copy_blocks(self.torch(name, layer), specs, dst_block_ids)

    def run_jax_inplace(self, step_fn: Callable, *args, layer: int = 0,
                        states: Sequence[str] = ("ssm",), state_outputs: Sequence[int] = (1,),
                        allow_writeback: bool | None = None, order_torch: bool = True,
                        **kwargs) -> InplaceStep:
        """``bridge.jax_step_into`` on this cache: ``step_fn(*jax_views_of(states),
        *args, **kwargs)`` with the new states at ``state_outputs`` (default:
        ``(out, new_ssm_state)`` of ``jax_impl.selective_state_update``).

        The views are the previous step's new states where the chain holds
        (see the class docstring), else fresh imports. ``order_torch`` (the
        default) orders torch's current stream after the step, so any torch
        reference to the cache sees the new state; with False that waits
        for the next ``torch(...)`` call, and a step costs what the same step
        on a JAX-owned array costs. Counts the steps in ``steps_aliased`` /
        ``steps_written_back``."""
        keys = [self._key(name, layer) for name in states]
        tensors = [self._tensor(key) for key in keys]
        # A view the step donates is deleted, so a failed step's view is never reused.
        views = [self._step_view(key, tensor) for key, tensor in zip(keys, tensors)]
        step = run_step_on_views(tensors, views, step_fn, args, kwargs, state_outputs=state_outputs,
                                 allow_writeback=allow_writeback, order_torch=order_torch)
        for key, tensor, index, aliased in zip(keys, tensors, state_outputs, step.aliased):
            if not aliased:  # written back by a torch copy, which torch is ordered after
                self._step_views.pop(key, None)
                continue
            self._step_views[key] = (step.outputs[index], tensor._version)
            if order_torch:
                self._unordered.discard(key)
            else:
                self._unordered.add(key)
        if any(step.written_back):
            self.steps_written_back += 1
        else:
            self.steps_aliased += 1
        return step

    def _step_view(self, key, tensor):
        """The previous step's new state if the chain holds, else a fresh import."""
        view, version = self._step_views.get(key, (None, None))
        if view is not None and not view.is_deleted() and version == tensor._version:
            return view
        layer, name = key
        return to_jax(tensor, name=f"{name} state of layer {layer}")

    def __repr__(self) -> str:
        states = ", ".join(f"{n}{s}:{d}" for n, s, d in zip(self.names, self.state_shapes, self.dtypes))
        return (f"MambaStateCache({states}; {self.num_layers} layers x {self.num_blocks} blocks, "
                f"owner={self.owner}, device={self.device})")
