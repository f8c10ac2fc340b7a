"""Causal depthwise conv1d of a Mamba-2 layer as one Triton kernel with two
launchers: ``causal_conv1d_fn`` (prefill over packed sequences) and
``causal_conv1d_update`` (decode, speculative decoding included). Both read
each sequence's history from the conv-state cache and write its new state
in place. The math and the argument rules: ``bridge.spec.conv_contract``. Mirror:
``jax_impl/causal_conv1d.py``.
"""

from __future__ import annotations

import torch

from bridge.spec.conv_contract import (
    BLOCK_D, NULL_BLOCK_ID, PREFILL_BLOCK_T, check_conv_fn_args, check_conv_index_values,
    check_conv_update_args, decode_block_t)
from bridge.spec.launch_config import clip_block
from torch_impl import platform

import triton  # noqa: E402  (after platform, which may set TRITON_INTERPRET)
import triton.language as tl  # noqa: E402



@triton.jit
def _load_window(x_base, read_base, rows, columns, from_x, from_state, mask_d,
                 stride_x_tok, stride_s_pos):
    """(len(rows), BLOCK_D) float32: x at ``rows`` where ``from_x``, the read
    slot's state at ``columns`` where ``from_state``, else 0."""
    x = tl.load(x_base[None, :] + tl.where(from_x, rows, 0)[:, None] * stride_x_tok,
                mask=from_x[:, None] & mask_d[None, :], other=0.0)
    old = tl.load(read_base[None, :] + tl.where(from_state, columns, 0)[:, None] * stride_s_pos,
                  mask=from_state[:, None] & mask_d[None, :], other=0.0)
    return tl.where(from_x[:, None], x.to(tl.float32), old.to(tl.float32))


@triton.jit
def _causal_conv1d_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, out_ptr,
    qsl_ptr, idx_ptr, has_init_ptr, num_accepted_ptr, read_col_ptr, write_col_ptr,
    first_block_ptr, num_computed_ptr,
    dim, num_slots, pad_slot_id, write_len, block_size,
    stride_x_tok, stride_x_dim, stride_w_dim, stride_w_tap, stride_bias,
    stride_s_slot, stride_s_dim, stride_s_pos, stride_o_tok, stride_o_dim,
    stride_idx_seq, stride_idx_col,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_INDICES: tl.constexpr, HAS_INIT_FLAGS: tl.constexpr,
    ALWAYS_HISTORY: tl.constexpr, IS_SPEC: tl.constexpr, HAS_READ_COL: tl.constexpr,
    HAS_WRITE_COL: tl.constexpr, HAS_BOUNDARIES: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Grid (num_seqs, cdiv(dim, BLOCK_D)): one program runs one sequence's
    tokens for a block of channels, then writes that block of its state
    (and, with HAS_BOUNDARIES, of the states at the block boundaries it crossed)."""
    seq = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    if IS_VARLEN:
        bos = tl.load(qsl_ptr + seq).to(tl.int64)
        seqlen = tl.load(qsl_ptr + seq + 1).to(tl.int64) - bos
    else:
        bos = seq
        seqlen = 1
    if HAS_INDICES:
        read_col = 0
        write_col = 0
        if HAS_READ_COL:
            read_col = tl.load(read_col_ptr + seq).to(tl.int64)
        if HAS_WRITE_COL:
            write_col = tl.load(write_col_ptr + seq).to(tl.int64)
        read_slot = tl.load(idx_ptr + seq * stride_idx_seq + read_col * stride_idx_col).to(tl.int64)
        write_slot = tl.load(idx_ptr + seq * stride_idx_seq + write_col * stride_idx_col).to(tl.int64)
        active = read_slot != pad_slot_id  # padding: output and cache untouched
    else:
        read_slot = seq
        write_slot = seq
        active = True
    # Slots outside the cache are never touched (the launcher raises first when it can).
    active = (active & (read_slot >= 0) & (read_slot < num_slots)
              & (write_slot >= 0) & (write_slot < num_slots))
    seqlen = tl.where(active, seqlen, 0)
    if ALWAYS_HISTORY:
        has_history = active
    elif HAS_INIT_FLAGS:
        has_history = active & (tl.load(has_init_ptr + seq) != 0)
    else:
        has_history = active & False
    offset = 0
    shift = seqlen
    if IS_SPEC:
        accepted = tl.load(num_accepted_ptr + seq).to(tl.int64)
        offset = accepted - 1
        shift = accepted
    read_base = state_ptr + tl.where(active, read_slot, 0) * stride_s_slot + offs_d * stride_s_dim
    x_base = x_ptr + bos * stride_x_tok + offs_d * stride_x_dim

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d * stride_bias, mask=mask_d, other=0.0).to(tl.float32)
    for t0 in range(0, seqlen, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        if HAS_BIAS:
            acc += bias[None, :]
        for k in tl.static_range(WIDTH):
            pos = offs_t + (k - (WIDTH - 1))  # window position; < 0 is history
            value = _load_window(x_base, read_base, pos, offset + (WIDTH - 1) + pos,
                                 (pos >= 0) & (pos < seqlen), (pos < 0) & has_history, mask_d,
                                 stride_x_tok, stride_s_pos)
            weight = tl.load(w_ptr + offs_d * stride_w_dim + k * stride_w_tap,
                             mask=mask_d, other=0.0).to(tl.float32)
            acc += value * weight[None, :]
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(out_ptr + (bos + offs_t)[:, None] * stride_o_tok + offs_d[None, :] * stride_o_dim,
                 acc.to(out_ptr.dtype.element_ty), mask=(offs_t < seqlen)[:, None] & mask_d[None, :])

    # The new state: the newest inputs at the end, older history shifted in
    # front. Loaded before any state is written (it may read the slot).
    offs_r = tl.arange(0, BLOCK_R)
    in_state = offs_r < write_len
    pos = offs_r - (write_len - seqlen)
    new = _load_window(x_base, read_base, pos, offs_r + shift, in_state & (pos >= 0),
                       in_state & (pos < 0) & has_history, mask_d, stride_x_tok, stride_s_pos)
    keep = active & (seqlen > 0)
    if HAS_BOUNDARIES:
        # The last W-1 inputs before each block boundary crossed, into that
        # block's slot. Only the first boundary can reach into the history.
        computed = tl.load(num_computed_ptr + seq).to(tl.int64)
        first_block = tl.load(first_block_ptr + seq).to(tl.int64)
        in_window = offs_r < WIDTH - 1
        for block in range(first_block, tl.where(keep, write_col, first_block)):
            cut = (block + 1) * block_size - computed - (WIDTH - 1) + offs_r  # window positions
            value = _load_window(x_base, read_base, cut, offset + (WIDTH - 1) + cut,
                                 in_window & (cut >= 0), in_window & (cut < 0) & has_history,
                                 mask_d, stride_x_tok, stride_s_pos)
            slot = tl.load(idx_ptr + seq * stride_idx_seq + block * stride_idx_col).to(tl.int64)
            slot_ok = (slot >= 0) & (slot < num_slots) & (slot != pad_slot_id)
            tl.debug_barrier()  # the window's reads of the slot before it is overwritten
            tl.store(state_ptr + tl.where(slot_ok, slot, 0) * stride_s_slot
                     + offs_r[:, None] * stride_s_pos + offs_d[None, :] * stride_s_dim,
                     value.to(state_ptr.dtype.element_ty),
                     mask=(in_window & slot_ok)[:, None] & mask_d[None, :])
    tl.debug_barrier()  # every read of the slot (by any warp) before the slot is overwritten
    tl.store(state_ptr + tl.where(keep, write_slot, 0) * stride_s_slot + offs_r[:, None] * stride_s_pos
             + offs_d[None, :] * stride_s_dim, new.to(state_ptr.dtype.element_ty),
             mask=(in_state & keep)[:, None] & mask_d[None, :])


def _dtype_name(tensor):
    return str(tensor.dtype).removeprefix("torch.") if tensor is not None else None


def _check(check, args, **options):
    return check({k: (tuple(v.shape) if v is not None else None) for k, v in args.items()},
                 {k: _dtype_name(v) for k, v in args.items()}, **options)


def _launch(layout, *, x_tok, out_tok, weight, bias, state, query_start_loc, indices, has_init,
            num_accepted_tokens, read_col, write_col, pad_slot_id, write_len, decode, block_t,
            first_block=None, num_computed=None, block_size=0):
    """x_tok / out_tok are (T, D) views (any strides); state is (S, D, L)."""
    if layout.num_seqs == 0 or layout.dim == 0:
        return
    indices2 = indices.reshape(indices.shape[0], -1) if indices is not None else None
    block_d = clip_block(layout.dim, BLOCK_D)
    grid = (layout.num_seqs, triton.cdiv(layout.dim, block_d))
    with torch.device(x_tok.device):
        _causal_conv1d_kernel[grid](
            x_tok, weight, bias, state, out_tok,
            query_start_loc, indices2, has_init, num_accepted_tokens, read_col, write_col,
            first_block, num_computed, layout.dim, layout.num_slots, pad_slot_id, write_len,
            block_size,
            *x_tok.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0,
            *state.stride(), *out_tok.stride(),
            *(indices2.stride() if indices2 is not None else (0, 0)),
            WIDTH=layout.width, HAS_BIAS=bias is not None, SILU=layout.silu,
            IS_VARLEN=query_start_loc is not None, HAS_INDICES=indices is not None,
            HAS_INIT_FLAGS=has_init is not None, ALWAYS_HISTORY=decode,
            IS_SPEC=num_accepted_tokens is not None, HAS_READ_COL=read_col is not None,
            HAS_WRITE_COL=write_col is not None, HAS_BOUNDARIES=first_block is not None,
            BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_R=max(2, triton.next_power_of_2(write_len)),
            num_warps=4)


def _capturing(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def causal_conv1d_fn(x, weight, bias=None, conv_states=None, query_start_loc=None,
                     cache_indices=None, has_initial_state=None, activation="silu",
                     pad_slot_id=NULL_BLOCK_ID, block_idx_first_scheduled_token=None,
                     block_idx_last_scheduled_token=None, initial_state_idx=None,
                     num_computed_tokens=None, block_size_to_align=0, *, out=None,
                     validate_indices=True):
    """Prefill: the conv over packed sequences ``x (dim, T)`` (a transposed
    token-major buffer), ``weight (dim, width)``, ``bias (dim,)``. Reads the
    history of sequences with ``has_initial_state`` from ``conv_states (S,
    dim, L)`` at ``cache_indices`` (the sequence number when None) and writes
    each sequence's last ``width - 1`` inputs there (columns ``0 .. width-2``),
    in place. Returns ``out (dim, T)`` (allocated like ``x`` when not given);
    columns of padding sequences are left as they were.

    Prefix caching ("all" mode): ``cache_indices`` is a block table ``(Q,
    max_blocks)``; the history is read at column ``initial_state_idx``, the
    final state written at ``block_idx_last_scheduled_token``, and the state
    at each multiple of ``block_size_to_align`` (in the sequence, which has
    ``num_computed_tokens`` before this call) at the columns from
    ``block_idx_first_scheduled_token`` on.

    ``validate_indices`` checks index values on the host (one device sync;
    skipped during CUDA-graph capture).
    """
    args = dict(x=x, weight=weight, bias=bias, conv_states=conv_states,
                query_start_loc=query_start_loc, cache_indices=cache_indices,
                has_initial_state=has_initial_state, out=out,
                block_idx_first_scheduled_token=block_idx_first_scheduled_token,
                block_idx_last_scheduled_token=block_idx_last_scheduled_token,
                initial_state_idx=initial_state_idx, num_computed_tokens=num_computed_tokens)
    layout = _check(check_conv_fn_args, args, activation=activation,
                    block_size_to_align=block_size_to_align)
    device = platform.check_kernel_device(args)
    host = lambda t: t.cpu().numpy() if t is not None else None  # noqa: E731
    if validate_indices and not _capturing(device):
        check_conv_index_values(
            "causal_conv1d_fn", layout, pad_slot_id=pad_slot_id,
            query_start_loc=host(query_start_loc), slot_indices=host(cache_indices),
            columns={k: host(args[k]) for k in ("initial_state_idx", "block_idx_first_scheduled_token",
                                                "block_idx_last_scheduled_token")})
    if out is None:
        out = torch.empty_like(x)
    _launch(layout, x_tok=x.t(), out_tok=out.t(), weight=weight, bias=bias, state=conv_states,
            query_start_loc=query_start_loc, indices=cache_indices, has_init=has_initial_state,
            num_accepted_tokens=None, read_col=initial_state_idx,
            write_col=block_idx_last_scheduled_token, pad_slot_id=pad_slot_id,
            write_len=layout.width - 1, decode=False, block_t=PREFILL_BLOCK_T,
            first_block=block_idx_first_scheduled_token, num_computed=num_computed_tokens,
            block_size=block_size_to_align)
    return out


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None,
                         conv_state_indices=None, num_accepted_tokens=None,
                         query_start_loc=None, max_query_len=-1, pad_slot_id=NULL_BLOCK_ID,
                         block_idx_last_scheduled_token=None, initial_state_idx=None, *,
                         out=None, validate_indices=True):
    """Decode: ``x (batch, dim)``, or ``(T, dim)`` with ``query_start_loc
    (batch + 1,)`` for several tokens per sequence (speculative decoding, with
    ``num_accepted_tokens (batch,)``). ``conv_state (S, dim, L)`` is read at
    ``conv_state_indices`` (column ``initial_state_idx``, default 0) and the
    shifted state written at column ``block_idx_last_scheduled_token``
    (default 0), in place. Returns ``out`` (shape of ``x``; allocated when
    not given). ``max_query_len`` (tokens per sequence at most) sizes the
    token tile; -1: from the batch.
    """
    args = dict(x=x, conv_state=conv_state, weight=weight, bias=bias,
                conv_state_indices=conv_state_indices, num_accepted_tokens=num_accepted_tokens,
                query_start_loc=query_start_loc, initial_state_idx=initial_state_idx,
                block_idx_last_scheduled_token=block_idx_last_scheduled_token, out=out)
    layout = _check(check_conv_update_args, args, activation=activation)
    device = platform.check_kernel_device(args)
    host = lambda t: t.cpu().numpy() if t is not None else None  # noqa: E731
    if validate_indices and not _capturing(device):
        check_conv_index_values(
            "causal_conv1d_update", layout, pad_slot_id=pad_slot_id,
            query_start_loc=host(query_start_loc), slot_indices=host(conv_state_indices),
            slot_arg="conv_state_indices", num_accepted_tokens=host(num_accepted_tokens),
            columns={"initial_state_idx": host(initial_state_idx),
                     "block_idx_last_scheduled_token": host(block_idx_last_scheduled_token)})
    if out is None:
        out = torch.empty_like(x)
    block_t = decode_block_t(query_start_loc is not None, max_query_len)
    _launch(layout, x_tok=x, out_tok=out, weight=weight, bias=bias, state=conv_state,
            query_start_loc=query_start_loc, indices=conv_state_indices, has_init=None,
            num_accepted_tokens=num_accepted_tokens, read_col=initial_state_idx,
            write_col=block_idx_last_scheduled_token, pad_slot_id=pad_slot_id,
            write_len=layout.state_len, decode=True, block_t=block_t)
    return out
