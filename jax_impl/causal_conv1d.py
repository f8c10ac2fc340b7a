"""Causal depthwise conv1d of a Mamba-2 layer as one Pallas kernel (Triton
backend on GPU) with two wrappers: ``causal_conv1d_fn`` (prefill over packed
sequences) and ``causal_conv1d_update`` (decode, speculative decoding
included). The math and the argument rules: ``bridge.spec.conv_contract``.
Mirror: ``torch_impl/causal_conv1d.py``.

JAX is functional: both return ``(out, new_conv_state)``. The conv state is
an aliased operand (``input_output_aliases``), so under ``jax.jit`` with the
state donated it is updated in place. The kernel works on token-major
``(T, D)`` inputs and an ``(S, L, D)`` state; the ``(D, T)`` / ``(S, D, L)``
arguments of the vLLM signature are transposes of those, which XLA cancels
under jit (an SD cache passed as ``cache.swapaxes(1, 2)`` is never copied).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bridge.spec.conv_contract import (
    BLOCK_D, NULL_BLOCK_ID, PREFILL_BLOCK_T, check_conv_fn_args, check_conv_index_values,
    check_conv_update_args, decode_block_t)
from bridge.spec.launch_config import clip_block
from jax_impl import platform


def _causal_conv1d_kernel(*refs, names, dim, width, num_slots, pad_slot_id, write_len, silu,
                          always_history, block_size, block_t, block_d, block_r):
    """Grid (num_seqs, cdiv(dim, block_d)): one program runs one sequence's
    tokens for a block of channels, then writes that block of its state
    (and, given ``first_block``, of the states at the block boundaries it crossed).
    Tiles are addressed by index arrays (masked lanes clamped to row 0 on
    loads), so no slice starts before a sequence's first token."""
    ref = dict(zip(names, refs))
    out_ref, state_out_ref = refs[len(names):]
    state_ref = ref["state"]
    seq = pl.program_id(0)
    offs_d = pl.program_id(1) * block_d + jnp.arange(block_d)
    mask_d = offs_d < dim
    if "query_start_loc" in ref:
        bos = ref["query_start_loc"][seq]
        seqlen = ref["query_start_loc"][seq + 1] - bos
    else:
        bos, seqlen = seq, 1
    if "indices" in ref:
        read_col = ref["read_col"][seq] if "read_col" in ref else 0
        write_col = ref["write_col"][seq] if "write_col" in ref else 0
        read_slot = ref["indices"][seq, read_col]
        write_slot = ref["indices"][seq, write_col]
        active = read_slot != pad_slot_id  # padding: output and cache untouched
    else:
        read_slot = write_slot = seq
        active = True
    # Slots outside the cache are never touched (the wrapper raises first when it can).
    active = (active & (read_slot >= 0) & (read_slot < num_slots)
              & (write_slot >= 0) & (write_slot < num_slots))
    # An int32 operand on both sides: with a Python int, JAX folds the select
    # into a bool -> int cast that the Triton lowering leaves as i1.
    seqlen = jnp.where(active, jnp.asarray(seqlen, jnp.int32), jnp.zeros((), jnp.int32))
    if always_history:
        has_history = active
    elif "has_initial_state" in ref:
        has_history = active & (ref["has_initial_state"][seq] != 0)
    else:
        has_history = active & False
    if "num_accepted_tokens" in ref:
        offset = ref["num_accepted_tokens"][seq] - 1
        shift = offset + 1
    else:
        offset, shift = 0, seqlen
    read_slot = jnp.where(active, read_slot, 0)
    cols = offs_d[None, :]

    def load_window(pos, from_x, from_state):
        """(rows, block_d) of window positions ``pos``: x where ``from_x``,
        the cached history at column ``offset + pos_state`` where ``from_state``."""
        x = plgpu.load(ref["x"].at[bos + jnp.where(from_x, pos, 0)[:, None], cols],
                       mask=from_x[:, None] & mask_d[None, :], other=0.0)
        old = plgpu.load(state_ref.at[read_slot, jnp.where(from_state, pos, 0)[:, None], cols],
                         mask=from_state[:, None] & mask_d[None, :], other=0.0)
        return jnp.where(from_x[:, None], x.astype(jnp.float32), old.astype(jnp.float32))

    if "bias" in ref:
        bias = plgpu.load(ref["bias"].at[offs_d], mask=mask_d, other=0.0).astype(jnp.float32)

    def token_block(i, carry):
        offs_t = i * block_t + jnp.arange(block_t)
        acc = jnp.zeros((block_t, block_d), jnp.float32)
        if "bias" in ref:
            acc = acc + bias[None, :]
        for k in range(width):
            pos = offs_t + (k - (width - 1))  # window position; < 0 is history
            from_x = (pos >= 0) & (pos < seqlen)
            value = load_window(jnp.where(from_x, pos, offset + (width - 1) + pos), from_x,
                                (pos < 0) & has_history)
            weight = plgpu.load(ref["weight"].at[offs_d, k], mask=mask_d, other=0.0)
            acc = acc + value * weight.astype(jnp.float32)[None, :]
        if silu:
            acc = acc * jax.nn.sigmoid(acc)
        plgpu.store(out_ref.at[(bos + offs_t)[:, None], cols], acc.astype(out_ref.dtype),
                    mask=(offs_t < seqlen)[:, None] & mask_d[None, :])
        return carry

    jax.lax.fori_loop(0, pl.cdiv(seqlen, block_t), token_block, 0)

    # The new state: the newest inputs at the end, older history shifted in
    # front. Loaded before any state is written (it may read the slot).
    offs_r = jnp.arange(block_r)
    in_state = offs_r < write_len
    pos = offs_r - (write_len - seqlen)
    from_x = in_state & (pos >= 0)
    new = load_window(jnp.where(from_x, pos, offs_r + shift), from_x,
                      in_state & (pos < 0) & has_history)
    keep = active & (seqlen > 0)
    if "first_block" in ref:
        # The last W-1 inputs before each block boundary crossed, into that
        # block's slot. Only the first boundary can reach into the history.
        computed = ref["num_computed"][seq]
        in_window = offs_r < width - 1

        def boundary(block, carry):
            pos = (block + 1) * block_size - computed - (width - 1) + offs_r
            from_x = in_window & (pos >= 0)
            value = load_window(jnp.where(from_x, pos, offset + (width - 1) + pos), from_x,
                                in_window & (pos < 0) & has_history)
            slot = ref["indices"][seq, block]
            slot_ok = (slot >= 0) & (slot < num_slots) & (slot != pad_slot_id)
            _barrier()  # the window's reads of the slot before it is overwritten
            plgpu.store(state_out_ref.at[jnp.where(slot_ok, slot, 0), offs_r[:, None], cols],
                        value.astype(state_out_ref.dtype),
                        mask=(in_window & slot_ok)[:, None] & mask_d[None, :])
            return carry

        first_block = ref["first_block"][seq]
        jax.lax.fori_loop(first_block, jnp.where(keep, write_col, first_block), boundary, 0)
    _barrier()  # every read of the slot (by any warp) before it is overwritten
    plgpu.store(state_out_ref.at[jnp.where(keep, write_slot, 0), offs_r[:, None], cols],
                new.astype(state_out_ref.dtype), mask=(in_state & keep)[:, None] & mask_d[None, :])


def _barrier():
    if not platform.INTERPRET:  # the interpreter runs one program at a time
        plgpu.debug_barrier()


def _run(layout, operands, *, out, pad_slot_id, write_len, always_history, block_t,
         block_size=0):
    """operands: x (T, D), weight, bias, state (S, L, D), index arrays by
    kernel name. Returns (out (T, D), new state (S, L, D))."""
    x, state = operands["x"], operands["state"]
    if layout.num_seqs == 0 or layout.dim == 0:
        return (out if out is not None else jnp.zeros_like(x)), state
    if out is not None:
        operands["out"] = out
    names = tuple(operands)
    block_d = clip_block(layout.dim, BLOCK_D)
    kernel = functools.partial(
        _causal_conv1d_kernel, names=names, dim=layout.dim, width=layout.width,
        num_slots=layout.num_slots, pad_slot_id=pad_slot_id, write_len=write_len,
        silu=layout.silu, always_history=always_history, block_size=block_size,
        block_t=block_t, block_d=block_d,
        block_r=max(2, pl.next_power_of_2(write_len)))
    aliases = {names.index("state"): 1}
    if out is not None:
        aliases[names.index("out")] = 0
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype if out is None else out.dtype),
                   jax.ShapeDtypeStruct(state.shape, state.dtype)),
        grid=(layout.num_seqs, pl.cdiv(layout.dim, block_d)),
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=platform.INTERPRET,
        name="causal_conv1d",
    )(*operands.values())


def _check(check, args, **options):
    return check({k: (tuple(v.shape) if v is not None else None) for k, v in args.items()},
                 {k: (str(v.dtype) if v is not None else None) for k, v in args.items()},
                 **options)


def _host_if_concrete(arrays: dict):
    """numpy copies of the given arrays, or None when any is traced (under jit)."""
    given = {k: v for k, v in arrays.items() if v is not None}
    if not all(platform.is_concrete(v) for v in given.values()):
        return None
    return {k: (np.asarray(v) if v is not None else None) for k, v in arrays.items()}


def causal_conv1d_fn(x, weight, bias=None, conv_states=None, query_start_loc=None,
                     cache_indices=None, has_initial_state=None, activation="silu",
                     pad_slot_id=NULL_BLOCK_ID, block_idx_first_scheduled_token=None,
                     block_idx_last_scheduled_token=None, initial_state_idx=None,
                     num_computed_tokens=None, block_size_to_align=0, *, out=None):
    """Prefill: the conv over packed sequences ``x (dim, T)``, ``weight (dim,
    width)``, ``bias (dim,)``. Reads the history of sequences with
    ``has_initial_state`` from ``conv_states (S, dim, L)`` at
    ``cache_indices`` (the sequence number when None) and writes each
    sequence's last ``width - 1`` inputs there (columns ``0 .. width-2``).
    Returns ``(out (dim, T), new_conv_states (S, dim, L))``; a given ``out``
    keeps its values in the columns of padding sequences.

    Prefix caching ("all" mode): ``cache_indices`` is a block table ``(Q,
    max_blocks)``; the history is read at column ``initial_state_idx``, the
    final state written at ``block_idx_last_scheduled_token``, and the state
    at each multiple of ``block_size_to_align`` (in the sequence, which has
    ``num_computed_tokens`` before this call) at the columns from
    ``block_idx_first_scheduled_token`` on.

    Jittable with ``activation`` and ``pad_slot_id`` static; index values
    are checked when concrete.
    """
    args = dict(x=x, weight=weight, bias=bias, conv_states=conv_states,
                query_start_loc=query_start_loc, cache_indices=cache_indices,
                has_initial_state=has_initial_state, out=out,
                block_idx_first_scheduled_token=block_idx_first_scheduled_token,
                block_idx_last_scheduled_token=block_idx_last_scheduled_token,
                initial_state_idx=initial_state_idx, num_computed_tokens=num_computed_tokens)
    layout = _check(check_conv_fn_args, args, activation=activation,
                    block_size_to_align=block_size_to_align)
    columns = ("initial_state_idx", "block_idx_first_scheduled_token",
               "block_idx_last_scheduled_token")
    host = _host_if_concrete({k: args[k] for k in ("query_start_loc", "cache_indices") + columns})
    if host is not None:
        check_conv_index_values("causal_conv1d_fn", layout, pad_slot_id=pad_slot_id,
                                query_start_loc=host["query_start_loc"],
                                slot_indices=host["cache_indices"],
                                columns={k: host[k] for k in columns})
    operands = {"x": x.T, "weight": weight, "bias": bias, "state": jnp.swapaxes(conv_states, 1, 2),
                "query_start_loc": query_start_loc,
                "indices": (cache_indices.reshape(cache_indices.shape[0], -1)
                            if cache_indices is not None else None),
                "has_initial_state": (has_initial_state.astype(jnp.int32)
                                      if has_initial_state is not None else None),
                "read_col": initial_state_idx, "write_col": block_idx_last_scheduled_token,
                "first_block": block_idx_first_scheduled_token, "num_computed": num_computed_tokens}
    new_out, new_state = _run(layout, {k: v for k, v in operands.items() if v is not None},
                              out=out.T if out is not None else None, pad_slot_id=pad_slot_id,
                              write_len=layout.width - 1, always_history=False,
                              block_t=PREFILL_BLOCK_T, block_size=block_size_to_align)
    return new_out.T, jnp.swapaxes(new_state, 1, 2)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None,
                         conv_state_indices=None, num_accepted_tokens=None,
                         query_start_loc=None, max_query_len=-1, pad_slot_id=NULL_BLOCK_ID,
                         block_idx_last_scheduled_token=None, initial_state_idx=None, *,
                         out=None):
    """Decode: ``x (batch, dim)``, or ``(T, dim)`` with ``query_start_loc
    (batch + 1,)`` for several tokens per sequence (speculative decoding, with
    ``num_accepted_tokens (batch,)``). ``conv_state (S, dim, L)`` is read at
    ``conv_state_indices`` (column ``initial_state_idx``, default 0) and the
    shifted state written at column ``block_idx_last_scheduled_token``
    (default 0). Returns ``(out, new_conv_state)``; ``max_query_len`` (static)
    sizes the token tile, -1: up to 16 tokens per tile.
    """
    args = dict(x=x, conv_state=conv_state, weight=weight, bias=bias,
                conv_state_indices=conv_state_indices, num_accepted_tokens=num_accepted_tokens,
                query_start_loc=query_start_loc, initial_state_idx=initial_state_idx,
                block_idx_last_scheduled_token=block_idx_last_scheduled_token, out=out)
    layout = _check(check_conv_update_args, args, activation=activation)
    host = _host_if_concrete(dict(
        query_start_loc=query_start_loc, conv_state_indices=conv_state_indices,
        num_accepted_tokens=num_accepted_tokens, initial_state_idx=initial_state_idx,
        block_idx_last_scheduled_token=block_idx_last_scheduled_token))
    if host is not None:
        check_conv_index_values(
            "causal_conv1d_update", layout, pad_slot_id=pad_slot_id,
            query_start_loc=host["query_start_loc"], slot_indices=host["conv_state_indices"],
            slot_arg="conv_state_indices", num_accepted_tokens=host["num_accepted_tokens"],
            columns={k: host[k] for k in ("initial_state_idx", "block_idx_last_scheduled_token")})
    operands = {"x": x, "weight": weight, "bias": bias,
                "state": jnp.swapaxes(conv_state, 1, 2), "query_start_loc": query_start_loc,
                "indices": (conv_state_indices.reshape(conv_state_indices.shape[0], -1)
                            if conv_state_indices is not None else None),
                "read_col": initial_state_idx, "write_col": block_idx_last_scheduled_token,
                "num_accepted_tokens": num_accepted_tokens}
    new_out, new_state = _run(layout, {k: v for k, v in operands.items() if v is not None},
                              out=out, pad_slot_id=pad_slot_id, write_len=layout.state_len,
                              always_history=True,
                              block_t=decode_block_t(query_start_loc is not None, max_query_len))
    return new_out, jnp.swapaxes(new_state, 1, 2)
