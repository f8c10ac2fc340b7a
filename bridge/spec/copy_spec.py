"""Prefix-caching copy specs (vLLM's ``mamba_utils``, "align" mode) and a
batched block copy that applies them, for torch tensors and jax arrays alike.
With ``block_ids`` a block table, ``cur_block_idx`` the column of a
speculative step's last scheduled token and ``num_accepted_tokens`` its
accepted count, the two specs name the state after its last accepted token
in the mixers' "all" mode too (``bridge.spec.mixer_metadata.Mamba2Metadata``):
the SSM state of column ``cur_block_idx + num_accepted_tokens - 1``, the
conv state of column ``cur_block_idx`` from position ``num_accepted_tokens - 1``.

A state is ``(num_blocks, *block_shape)``; a spec names a contiguous run of
elements inside one block by address. Framework-neutral: the state's own
methods are used (duck typing), neither torch nor jax is imported.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence, TypeAlias

import numpy as np

from bridge.spec import checks
from bridge.spec.state_shapes import is_conv_state_dim_first


@dataclasses.dataclass
class MambaCopySpec:
    """A copy source for prefix caching: ``num_elements`` elements starting at
    byte address ``start_addr``."""

    start_addr: int
    num_elements: int


# (state, block_ids, cur_block_idx, num_accepted_tokens) -> MambaCopySpec;
# num_accepted_tokens ranges over 1 .. 1 + num_speculative_tokens.
MambaStateCopyFunc: TypeAlias = Callable[[Any, list[int], int, int], MambaCopySpec]


@dataclasses.dataclass(frozen=True)
class _Buffer:
    """Address, element strides and element size of a torch/jax/numpy array."""

    address: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements
    itemsize: int
    contiguous: bool


def _row_major_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _buffer(op: str, state) -> _Buffer:
    shape = tuple(state.shape)
    if hasattr(state, "data_ptr"):  # torch.Tensor
        strides = tuple(state.stride())
        return _Buffer(state.data_ptr(), shape, strides, state.element_size(), state.is_contiguous())
    if hasattr(state, "unsafe_buffer_pointer"):  # jax.Array: always row-major
        return _Buffer(state.unsafe_buffer_pointer(), shape, _row_major_strides(shape),
                       state.dtype.itemsize, True)
    if isinstance(state, np.ndarray):
        strides = tuple(s // state.itemsize for s in state.strides)
        return _Buffer(state.ctypes.data, shape, strides, state.itemsize,
                       bool(state.flags.c_contiguous))
    checks.fail(op, "state", f"must be a torch.Tensor, jax.Array or numpy array, got {type(state).__name__}")


def _in_range(op: str, arg: str, value, num_blocks: int) -> int:
    block = checks.as_int(op, arg, value)
    if not 0 <= block < num_blocks:  # never wrap a negative id around
        checks.fail(op, arg, f"= {block} is outside the state's {num_blocks} blocks [0, {num_blocks})")
    return block


def checked_block_ids(op: str, arg: str, block_ids, num_blocks: int) -> list[int]:
    """``block_ids`` (a sequence or 1-D array of integers) as distinct ints in
    ``[0, num_blocks)``; ValueError naming ``arg`` and the offending entries."""
    if hasattr(block_ids, "tolist"):  # numpy / torch / jax arrays
        block_ids = block_ids.tolist()
    if not isinstance(block_ids, (list, tuple, range)):
        checks.fail(op, arg, f"must be a sequence or 1-D array of integers, got {block_ids!r}")
    blocks = [_in_range(op, f"{arg}[{i}]", b, num_blocks) for i, b in enumerate(block_ids)]
    if len(set(blocks)) != len(blocks):
        repeated = sorted({b for b in blocks if blocks.count(b) > 1})
        checks.fail(op, arg, f"names block(s) {repeated} more than once; each block may be written once")
    return blocks


def _block_id(op: str, block_ids: Sequence[int], index: int, num_blocks: int) -> int:
    if not 0 <= index < len(block_ids):
        checks.fail(op, "block_ids", f"has {len(block_ids)} entries; index {index} is out of range")
    return _in_range(op, f"block_ids[{index}]", block_ids[index], num_blocks)


def get_conv_copy_spec(state, block_ids: list[int], cur_block_idx: int,
                       num_accepted_tokens: int) -> MambaCopySpec:
    """The conv state of block ``block_ids[cur_block_idx]`` without its first
    ``num_accepted_tokens - 1`` positions.

    ``state`` is ``(num_blocks, state_len, dim)`` (SD) or ``(num_blocks, dim,
    state_len)`` (DS, per ``$MAMBA_TWIN_CONV_STATE_LAYOUT``). DS with
    ``num_accepted_tokens > 1`` raises NotImplementedError: the positions to
    skip are strided there, so the rest is not one contiguous run.
    """
    op = "get_conv_copy_spec"
    buf = _buffer(op, state)
    if len(buf.shape) != 3:
        checks.fail(op, "state", f"must be (num_blocks, state_len, dim) or (num_blocks, dim, state_len), "
                    f"got shape {buf.shape}")
    block = _block_id(op, block_ids, checks.as_int(op, "cur_block_idx", cur_block_idx, minimum=0),
                      buf.shape[0])
    offset = checks.as_int(op, "num_accepted_tokens", num_accepted_tokens, minimum=1) - 1
    if is_conv_state_dim_first():
        if offset > 0:
            raise NotImplementedError(
                "DS conv state layout does not yet support speculative decoding with "
                "mamba_cache_mode='align' (num_accepted_tokens > 1).")
        start, count = block * buf.strides[0], buf.shape[1] * buf.shape[2]
    else:
        if offset > buf.shape[1]:
            checks.fail(op, "num_accepted_tokens", f"= {num_accepted_tokens} must lie in "
                        f"[1, state_len + 1 = {buf.shape[1] + 1}]")
        start = block * buf.strides[0] + offset * buf.strides[1]
        count = (buf.shape[1] - offset) * buf.shape[2]
    return MambaCopySpec(start_addr=buf.address + start * buf.itemsize, num_elements=count)


def get_temporal_copy_spec(state, block_ids: list[int], cur_block_idx: int,
                           num_accepted_tokens: int) -> MambaCopySpec:
    """The whole temporal (SSM) state of block
    ``block_ids[cur_block_idx + num_accepted_tokens - 1]``: with speculative
    decoding each token's state has its own block, and the last accepted one
    is kept."""
    op = "get_temporal_copy_spec"
    buf = _buffer(op, state)
    accepted = checks.as_int(op, "num_accepted_tokens", num_accepted_tokens, minimum=1)
    index = checks.as_int(op, "cur_block_idx", cur_block_idx, minimum=0) + accepted - 1
    block = _block_id(op, block_ids, index, buf.shape[0])
    count = int(np.prod(buf.shape[1:], dtype=np.int64))
    return MambaCopySpec(start_addr=buf.address + block * buf.strides[0] * buf.itemsize,
                         num_elements=count)


def block_copy_indices(state, specs: Sequence[MambaCopySpec],
                       dst_block_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Flat element indices (source, destination), int64 and of equal length,
    that copy each spec's elements to the start of block ``dst_block_ids[i]``
    of the same ``state``. Destinations: distinct, in ``[0, num_blocks)``; a
    destination may be another spec's source (every source is read first)."""
    op = "copy_blocks"
    buf = _buffer(op, state)
    if not buf.contiguous or not buf.shape:
        checks.fail(op, "state", f"must be contiguous and at least 1-D for address-based block copies, "
                    f"shape {buf.shape}, strides {buf.strides}")
    if len(specs) != len(dst_block_ids):
        checks.fail(op, "dst_block_ids", f"has {len(dst_block_ids)} entries for {len(specs)} specs")
    dst_block_ids = checked_block_ids(op, "dst_block_ids", dst_block_ids, buf.shape[0])
    total = int(np.prod(buf.shape, dtype=np.int64))
    block_size = buf.strides[0]
    sources, destinations = [], []
    for i, (spec, dst_block) in enumerate(zip(specs, dst_block_ids)):
        count = checks.as_int(op, f"specs[{i}].num_elements", spec.num_elements, minimum=0)
        offset_bytes = checks.as_int(op, f"specs[{i}].start_addr", spec.start_addr) - buf.address
        start = offset_bytes // buf.itemsize
        if offset_bytes % buf.itemsize or start < 0 or start + count > total:
            checks.fail(op, f"specs[{i}]", f"({spec}) does not lie inside `state` "
                        f"(address {buf.address:#x}, {total} elements)")
        if count > block_size:
            checks.fail(op, f"specs[{i}]", f"copies {count} elements, more than a block ({block_size})")
        sources.append(np.arange(start, start + count, dtype=np.int64))
        destinations.append(np.arange(dst_block * block_size, dst_block * block_size + count,
                                      dtype=np.int64))
    empty = np.zeros(0, np.int64)
    return (np.concatenate(sources) if sources else empty,
            np.concatenate(destinations) if destinations else empty)


def copy_blocks(state, specs: Sequence[MambaCopySpec], dst_block_ids: Sequence[int]):
    """Apply ``specs`` as one batched gather/scatter: every source is read
    before any destination is written.

    torch tensor or numpy array: copied in place, the same object is
    returned. jax array: the updated array is returned (functional; on a
    cache shared with torch, ``MambaStateCache.copy_blocks`` lands the copy in
    the shared memory).
    """
    sources, destinations = block_copy_indices(state, specs, dst_block_ids)
    if hasattr(state, "data_ptr"):  # torch: in place on the flat view
        import torch

        flat = state.view(-1)
        sources, destinations = (torch.from_numpy(i).to(state.device) for i in (sources, destinations))
        flat[destinations] = flat[sources]
        return state
    if isinstance(state, np.ndarray):
        flat = state.reshape(-1)
        flat[destinations] = flat[sources]
        return state
    flat = state.reshape(-1)
    return flat.at[destinations].set(flat[sources]).reshape(state.shape)
