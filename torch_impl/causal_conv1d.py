"""Causal depthwise conv1d of a Mamba-2 layer as one Triton kernel behind two
torch ops: ``causal_conv1d_fn`` (prefill over packed sequences) and
``causal_conv1d_update`` (decode, speculative decoding included). Both read
each sequence's history from the conv-state cache and write its new state
in place. The math, the argument rules and the unchecked contract:
``bridge.spec.conv_contract``. Mirror: ``jax_impl/causal_conv1d.py``.
"""

from __future__ import annotations

import torch

from bridge.spec.conv_contract import (
    INDEX_ARGS, NULL_BLOCK_ID, check_conv_fn_args, check_conv_index_values,
    check_conv_update_args, conv_layout, conv_tiles)
from torch_impl import platform

import triton  # noqa: E402  (after platform, which may set TRITON_INTERPRET)
import triton.language as tl  # noqa: E402


@triton.jit
def _load_window(x_base, read_base, rows, columns, from_x, from_state, mask_d, state_len,
                 stride_x_tok, stride_s_pos):
    """(len(rows), BLOCK_D) float32: x at ``rows`` where ``from_x``, the read
    slot's state at ``columns`` where ``from_state`` (and inside the state),
    else 0."""
    from_state = from_state & (columns >= 0) & (columns < state_len)
    x = tl.load(x_base[None, :] + tl.where(from_x, rows, 0)[:, None] * stride_x_tok,
                mask=from_x[:, None] & mask_d[None, :], other=0.0)
    old = tl.load(read_base[None, :] + tl.where(from_state, columns, 0)[:, None] * stride_s_pos,
                  mask=from_state[:, None] & mask_d[None, :], other=0.0)
    return tl.where(from_x[:, None], x.to(tl.float32), old.to(tl.float32))


@triton.heuristics(platform.given_flags(
    HAS_BIAS="bias_ptr", IS_VARLEN="qsl_ptr", HAS_INDICES="idx_ptr", HAS_INIT_FLAGS="has_init_ptr",
    IS_SPEC="num_accepted_ptr", HAS_READ_COL="read_col_ptr", HAS_WRITE_COL="write_col_ptr",
    HAS_BOUNDARIES="first_block_ptr"))
@triton.jit
def _causal_conv1d_kernel(
    # arrays
    x_ptr, w_ptr, bias_ptr, state_ptr, out_ptr,
    qsl_ptr, idx_ptr, has_init_ptr, num_accepted_ptr, read_col_ptr, write_col_ptr,
    first_block_ptr, num_computed_ptr,
    # sizes
    dim, num_tokens, num_slots, state_len, num_columns, write_len, max_accepted,
    pad_slot_id, block_size,
    # strides
    stride_x_tok, stride_x_dim, stride_w_dim, stride_w_tap, stride_bias,
    stride_s_slot, stride_s_dim, stride_s_pos, stride_o_tok, stride_o_dim,
    stride_idx_seq, stride_idx_col,
    # statics
    WIDTH: tl.constexpr, SILU: tl.constexpr, ALWAYS_HISTORY: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_BIAS: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_INDICES: tl.constexpr,
    HAS_INIT_FLAGS: tl.constexpr, IS_SPEC: tl.constexpr, HAS_READ_COL: tl.constexpr,
    HAS_WRITE_COL: tl.constexpr, HAS_BOUNDARIES: tl.constexpr,
):
    """Grid (num_seqs, cdiv(dim, BLOCK_D)): one program runs one sequence's
    tokens for a block of channels, then writes that block of its state
    (and, with HAS_BOUNDARIES, of the states at the block boundaries it crossed).
    A sequence whose indices break the contract is skipped, its outputs NaN."""
    seq = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    if IS_VARLEN:
        bos = tl.load(qsl_ptr + seq).to(tl.int64)
        eos = tl.load(qsl_ptr + seq + 1).to(tl.int64)
        ok = (bos >= 0) & (bos <= eos) & (eos <= num_tokens)
        bos = tl.minimum(tl.maximum(bos, 0), num_tokens)  # the tokens clipped to [0, T)
        seqlen = tl.minimum(tl.maximum(eos, bos), num_tokens) - bos
    else:
        bos = seq
        seqlen = 1
        ok = seq >= 0  # True, as a tensor (``~`` of a Python bool is an int)
    write_col = 0
    if HAS_INDICES:
        read_col = 0
        if HAS_READ_COL:
            read_col = tl.load(read_col_ptr + seq).to(tl.int64)
        if HAS_WRITE_COL:
            write_col = tl.load(write_col_ptr + seq).to(tl.int64)
        cols_ok = ((read_col >= 0) & (read_col < num_columns)
                   & (write_col >= 0) & (write_col < num_columns))
        row = idx_ptr + seq * stride_idx_seq
        read_slot = tl.load(row + tl.where(cols_ok, read_col, 0) * stride_idx_col).to(tl.int64)
        write_slot = tl.load(row + tl.where(cols_ok, write_col, 0) * stride_idx_col).to(tl.int64)
        padding = cols_ok & (read_slot == pad_slot_id)  # output and cache untouched
        ok = (ok & cols_ok & (read_slot >= 0) & (read_slot < num_slots)
              & (write_slot >= 0) & (write_slot < num_slots))
    else:
        read_slot = seq
        write_slot = seq
        padding = seq < 0  # False, as a tensor
        ok = ok & (seq < num_slots)
    offset = 0
    shift = seqlen
    if IS_SPEC:
        accepted = tl.load(num_accepted_ptr + seq).to(tl.int64)
        ok = ok & (accepted >= 1) & (accepted <= max_accepted) & (accepted <= tl.maximum(seqlen, 1))
        offset = accepted - 1
        shift = accepted
    if HAS_BOUNDARIES:
        computed = tl.load(num_computed_ptr + seq).to(tl.int64)
        first_block = tl.load(first_block_ptr + seq).to(tl.int64)
        ok = ok & (computed >= 0) & (first_block >= 0) & (first_block <= write_col)
        for block in range(first_block, tl.where(ok, write_col, first_block)):
            slot = tl.load(idx_ptr + seq * stride_idx_seq + block * stride_idx_col).to(tl.int64)
            ok = ok & ((slot == pad_slot_id) | ((slot >= 0) & (slot < num_slots)))
    active = ok & ~padding
    poison = ~ok & ~padding
    if ALWAYS_HISTORY:
        has_history = active
    elif HAS_INIT_FLAGS:
        has_history = active & (tl.load(has_init_ptr + seq) != 0)
    else:
        has_history = active & False
    read_base = state_ptr + tl.where(active, read_slot, 0) * stride_s_slot + offs_d * stride_s_dim
    x_base = x_ptr + bos * stride_x_tok + offs_d * stride_x_dim

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d * stride_bias, mask=mask_d, other=0.0).to(tl.float32)
    for t0 in range(0, tl.where(padding, 0, seqlen), BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        if HAS_BIAS:
            acc += bias[None, :]
        for k in tl.static_range(WIDTH):
            pos = offs_t + (k - (WIDTH - 1))  # window position; < 0 is history
            value = _load_window(x_base, read_base, pos, offset + (WIDTH - 1) + pos,
                                 (pos >= 0) & (pos < seqlen), (pos < 0) & has_history, mask_d,
                                 state_len, stride_x_tok, stride_s_pos)
            weight = tl.load(w_ptr + offs_d * stride_w_dim + k * stride_w_tap,
                             mask=mask_d, other=0.0).to(tl.float32)
            acc += value * weight[None, :]
        if SILU:
            acc = acc * tl.sigmoid(acc)
        acc = tl.where(poison, float("nan"), acc)
        tl.store(out_ptr + (bos + offs_t)[:, None] * stride_o_tok + offs_d[None, :] * stride_o_dim,
                 acc.to(out_ptr.dtype.element_ty), mask=(offs_t < seqlen)[:, None] & mask_d[None, :])

    # The new state: the newest inputs at the end, older history shifted in
    # front. Loaded before any state is written (it may read the slot).
    offs_r = tl.arange(0, BLOCK_R)
    in_state = offs_r < write_len
    pos = offs_r - (write_len - seqlen)
    new = _load_window(x_base, read_base, pos, offs_r + shift, in_state & (pos >= 0),
                       in_state & (pos < 0) & has_history, mask_d, state_len,
                       stride_x_tok, stride_s_pos)
    keep = active & (seqlen > 0)
    if HAS_BOUNDARIES:
        # The last W-1 inputs before each block boundary crossed, into that
        # block's slot. Only the first boundary can reach into the history.
        in_window = offs_r < WIDTH - 1
        for block in range(first_block, tl.where(keep, write_col, first_block)):
            cut = (block + 1) * block_size - computed - (WIDTH - 1) + offs_r  # window positions
            value = _load_window(x_base, read_base, cut, offset + (WIDTH - 1) + cut,
                                 in_window & (cut >= 0) & (cut < seqlen),
                                 in_window & (cut < 0) & has_history, mask_d, state_len,
                                 stride_x_tok, stride_s_pos)
            slot = tl.load(idx_ptr + seq * stride_idx_seq + block * stride_idx_col).to(tl.int64)
            slot_ok = slot != pad_slot_id  # in range: checked above
            tl.debug_barrier()  # the window's reads of the slot before it is overwritten
            tl.store(state_ptr + tl.where(slot_ok, slot, 0) * stride_s_slot
                     + offs_r[:, None] * stride_s_pos + offs_d[None, :] * stride_s_dim,
                     value.to(state_ptr.dtype.element_ty),
                     mask=(in_window & slot_ok)[:, None] & mask_d[None, :])
    tl.debug_barrier()  # every read of the slot (by any warp) before the slot is overwritten
    tl.store(state_ptr + tl.where(keep, write_slot, 0) * stride_s_slot + offs_r[:, None] * stride_s_pos
             + offs_d[None, :] * stride_s_dim, new.to(state_ptr.dtype.element_ty),
             mask=(in_state & keep)[:, None] & mask_d[None, :])


def _launch(*, x_tok, out_tok, weight, bias, state, query_start_loc, indices, silu, decode,
            max_query_len=-1, pad_slot_id, has_initial_state=None, num_accepted_tokens=None,
            initial_state_idx=None, block_idx_last_scheduled_token=None,
            block_idx_first_scheduled_token=None, num_computed_tokens=None, block_size_to_align=0):
    """x_tok / out_tok are (T, D) views (any strides); state is (S, D, L)."""
    layout = conv_layout(x_tok.shape[0], weight, state, query_start_loc, indices, silu=silu,
                         decode=decode)
    if layout.num_seqs == 0 or layout.dim == 0 or layout.num_tokens == 0:
        return
    tiles = conv_tiles(layout, varlen=query_start_loc is not None, max_query_len=max_query_len)
    indices2 = indices.reshape(indices.shape[0], -1) if indices is not None else None
    grid = (layout.num_seqs, triton.cdiv(layout.dim, tiles.block_d))
    with platform.on_device(x_tok.device):
        _causal_conv1d_kernel[grid](
            x_tok, weight, bias, state, out_tok,
            query_start_loc, indices2, has_initial_state, num_accepted_tokens, initial_state_idx,
            block_idx_last_scheduled_token, block_idx_first_scheduled_token, num_computed_tokens,
            layout.dim, layout.num_tokens, layout.num_slots, layout.state_len,
            layout.index_columns, layout.write_len, layout.max_accepted, pad_slot_id,
            block_size_to_align,
            *x_tok.stride(), *weight.stride(), *platform.strides(bias, 1), *state.stride(),
            *out_tok.stride(), *platform.strides(indices2, 2),
            WIDTH=layout.width, SILU=silu, ALWAYS_HISTORY=decode,
            BLOCK_T=tiles.block_t, BLOCK_D=tiles.block_d, BLOCK_R=tiles.block_r, num_warps=4)


# The launches as torch ops: opaque to torch.compile (which sees the fakes)
# and safe in a CUDA graph. Defined through torch.library.Library, as the
# state update: torch.library.custom_op's Python dispatch of mutated
# arguments costs far more per eager call. (``output``, not ``out``:
# torch.compile reads an ``out=`` argument as an out-variant's.)
_LIB = torch.library.Library("mamba_twin", "FRAGMENT")
_LIB.define(
    "causal_conv1d_fn(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) conv_states, "
    "Tensor query_start_loc, Tensor? cache_indices, Tensor? has_initial_state, "
    "Tensor? block_idx_first_scheduled_token, Tensor? block_idx_last_scheduled_token, "
    "Tensor? initial_state_idx, Tensor? num_computed_tokens, Tensor(b!) output, bool silu, "
    "int pad_slot_id, int block_size_to_align) -> ()")
_LIB.define(
    "causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, "
    "Tensor? conv_state_indices, Tensor? num_accepted_tokens, Tensor? query_start_loc, "
    "Tensor? initial_state_idx, Tensor? block_idx_last_scheduled_token, Tensor(b!) output, "
    "bool silu, int max_query_len, int pad_slot_id) -> ()")


def _conv_fn_op(x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state,
                block_idx_first_scheduled_token, block_idx_last_scheduled_token,
                initial_state_idx, num_computed_tokens, output, silu, pad_slot_id,
                block_size_to_align):
    _launch(x_tok=x.t(), out_tok=output.t(), weight=weight, bias=bias, state=conv_states,
            query_start_loc=query_start_loc, indices=cache_indices, silu=silu, decode=False,
            pad_slot_id=pad_slot_id, has_initial_state=has_initial_state,
            initial_state_idx=initial_state_idx,
            block_idx_last_scheduled_token=block_idx_last_scheduled_token,
            block_idx_first_scheduled_token=block_idx_first_scheduled_token,
            num_computed_tokens=num_computed_tokens, block_size_to_align=block_size_to_align)


def _conv_update_op(x, conv_state, weight, bias, conv_state_indices, num_accepted_tokens,
                    query_start_loc, initial_state_idx, block_idx_last_scheduled_token, output,
                    silu, max_query_len, pad_slot_id):
    _launch(x_tok=x, out_tok=output, weight=weight, bias=bias, state=conv_state,
            query_start_loc=query_start_loc, indices=conv_state_indices, silu=silu, decode=True,
            max_query_len=max_query_len, pad_slot_id=pad_slot_id,
            num_accepted_tokens=num_accepted_tokens, initial_state_idx=initial_state_idx,
            block_idx_last_scheduled_token=block_idx_last_scheduled_token)


def _writes_in_place(*args, **kwargs) -> None:
    """Both ops only write their mutated arguments."""


for _name, _impl in (("causal_conv1d_fn", _conv_fn_op), ("causal_conv1d_update", _conv_update_op)):
    _LIB.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"mamba_twin::{_name}", _writes_in_place, lib=_LIB)


def _call(function: str, check, arrays: dict, *, out, activation, pad_slot_id, validate_indices,
          **sizes):
    """The checks (in debug mode the index values too), then the op
    ``function`` writing ``out`` (allocated like ``x`` when not given)."""
    layout = check(**arrays, out=out, activation=activation, pad_slot_id=pad_slot_id, **sizes)
    device = platform.check_kernel_device(dict(arrays, out=out))
    values = platform.host_index_values(
        validate_indices, device, **{k: v for k, v in arrays.items() if k in INDEX_ARGS})
    if values is not None:
        check_conv_index_values(function, layout, values, pad_slot_id=pad_slot_id)
    out = torch.empty_like(arrays["x"]) if out is None else out
    getattr(torch.ops.mamba_twin, function).default(**arrays, output=out, silu=layout.silu,
                                                    pad_slot_id=int(pad_slot_id),
                                                    **{k: int(v) for k, v in sizes.items()})
    return out


def causal_conv1d_fn(x, weight, bias=None, conv_states=None, query_start_loc=None,
                     cache_indices=None, has_initial_state=None, activation="silu",
                     pad_slot_id=NULL_BLOCK_ID, block_idx_first_scheduled_token=None,
                     block_idx_last_scheduled_token=None, initial_state_idx=None,
                     num_computed_tokens=None, block_size_to_align=0, *, out=None,
                     validate_indices=None):
    """Prefill over packed sequences: ``x (dim, T)`` (a transposed token-major
    buffer), ``weight (dim, width)``, ``bias (dim,)``, ``conv_states (S, dim,
    L)`` read and written in place at ``cache_indices`` (or a block table with
    prefix caching; ``bridge.spec.conv_contract``). Returns ``out (dim, T)``
    (allocated when not given; padding sequences' columns left as they were).

    ``validate_indices=True`` (or ``$MAMBA_TWIN_CHECK_INDICES=1``) checks the
    index values on the host first (a device sync; skipped under CUDA-graph
    capture and torch.compile); unchecked, bad values follow the contract's
    unchecked rules (skipped, NaN outputs, no stray access).
    """
    return _call("causal_conv1d_fn", check_conv_fn_args, dict(
        x=x, weight=weight, bias=bias, conv_states=conv_states, query_start_loc=query_start_loc,
        cache_indices=cache_indices, has_initial_state=has_initial_state,
        block_idx_first_scheduled_token=block_idx_first_scheduled_token,
        block_idx_last_scheduled_token=block_idx_last_scheduled_token,
        initial_state_idx=initial_state_idx, num_computed_tokens=num_computed_tokens),
        out=out, activation=activation, pad_slot_id=pad_slot_id,
        validate_indices=validate_indices, block_size_to_align=block_size_to_align)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None,
                         conv_state_indices=None, num_accepted_tokens=None,
                         query_start_loc=None, max_query_len=-1, pad_slot_id=NULL_BLOCK_ID,
                         block_idx_last_scheduled_token=None, initial_state_idx=None, *,
                         out=None, validate_indices=None):
    """Decode: ``x (batch, dim)``, or ``(T, dim)`` with ``query_start_loc
    (batch + 1,)`` (speculative decoding, with ``num_accepted_tokens
    (batch,)``); ``conv_state (S, dim, L)`` read at ``conv_state_indices``
    (column ``initial_state_idx``) and written at column
    ``block_idx_last_scheduled_token``, in place. Returns ``out`` (shape of
    ``x``; allocated when not given). ``max_query_len`` (tokens per sequence
    at most, -1: unknown) sizes the token tile. ``validate_indices``: as in
    ``causal_conv1d_fn``.
    """
    return _call("causal_conv1d_update", check_conv_update_args, dict(
        x=x, conv_state=conv_state, weight=weight, bias=bias,
        conv_state_indices=conv_state_indices, num_accepted_tokens=num_accepted_tokens,
        query_start_loc=query_start_loc, initial_state_idx=initial_state_idx,
        block_idx_last_scheduled_token=block_idx_last_scheduled_token),
        out=out, activation=activation, pad_slot_id=pad_slot_id,
        validate_indices=validate_indices, max_query_len=max_query_len)
