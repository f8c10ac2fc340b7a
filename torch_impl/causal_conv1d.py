"""Causal depthwise conv1d of a Mamba-2 layer as one Triton kernel behind two
torch ops: ``causal_conv1d_fn`` (prefill over packed sequences) and
``causal_conv1d_update`` (decode, speculative decoding included). Both read
each sequence's history from the conv-state cache and write its new state
in place. Training: a functional op (the new states returned, not written)
with autograd through a second Triton kernel, the backward; the decode op is
inference-only. The math, the argument rules and the unchecked contract:
``bridge.spec.conv_contract``. Mirror: ``jax_impl/causal_conv1d.py``.
"""

from __future__ import annotations

import torch

from bridge.spec.conv_contract import (
    INDEX_ARGS, NULL_BLOCK_ID, check_conv_fn_args, check_conv_fn_grad, check_conv_index_values,
    check_conv_update_args, conv_bwd_block_w, conv_layout, conv_tiles,
    stateless_states_shape)
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
@triton.heuristics({"EVEN_D": lambda args: args["dim"] % args["BLOCK_D"] == 0})
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
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, SPLITS: tl.constexpr,
    HAS_BIAS: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_INDICES: tl.constexpr,
    HAS_INIT_FLAGS: tl.constexpr, IS_SPEC: tl.constexpr, HAS_READ_COL: tl.constexpr,
    HAS_WRITE_COL: tl.constexpr, HAS_BOUNDARIES: tl.constexpr, EVEN_D: tl.constexpr,
):
    """Grid (num_seqs, cdiv(dim, BLOCK_D), SPLITS): a program runs every
    SPLITS-th token tile of one sequence for a block of channels; the first
    (the only one reading the history: BLOCK_T >= W - 1 when SPLITS > 1)
    then writes that block of the sequence's state (and, with
    HAS_BOUNDARIES, of the states at the block boundaries it crossed).
    A sequence whose indices break the contract is skipped, its outputs NaN."""
    seq = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(2)
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
    # Tiles address x and out from a 64-bit tile base with 32-bit offsets
    # inside the tile (fewer live 64-bit pointers: registers, occupancy).
    x_seq = x_ptr + bos * stride_x_tok
    out_seq = out_ptr + bos * stride_o_tok
    for t0 in range(split * BLOCK_T, tl.where(padding, 0, seqlen), SPLITS * BLOCK_T):
        offs_i = tl.arange(0, BLOCK_T)
        offs_t = t0 + offs_i
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        if HAS_BIAS:
            acc += bias[None, :]
        if t0 >= WIDTH - 1:  # every tile but a sequence's first: the window lies in x
            x_tile = x_seq + (bos * 0 + t0) * stride_x_tok
            if EVEN_D and t0 + BLOCK_T <= seqlen:  # a full tile: no masks
                for k in tl.static_range(WIDTH):
                    rows = offs_i + (k - (WIDTH - 1))
                    value = tl.load(x_tile + rows[:, None] * stride_x_tok
                                    + offs_d[None, :] * stride_x_dim).to(tl.float32)
                    weight = tl.load(w_ptr + offs_d * stride_w_dim + k * stride_w_tap).to(tl.float32)
                    acc += value * weight[None, :]
            else:
                for k in tl.static_range(WIDTH):
                    rows = offs_i + (k - (WIDTH - 1))
                    value = tl.load(x_tile + rows[:, None] * stride_x_tok + offs_d[None, :] * stride_x_dim,
                                    mask=((offs_t + (k - (WIDTH - 1))) < seqlen)[:, None] & mask_d[None, :],
                                    other=0.0).to(tl.float32)
                    weight = tl.load(w_ptr + offs_d * stride_w_dim + k * stride_w_tap,
                                     mask=mask_d, other=0.0).to(tl.float32)
                    acc += value * weight[None, :]
        else:
            for k in tl.static_range(WIDTH):
                pos = offs_t + (k - (WIDTH - 1))  # window position; < 0 is history
                value = _load_window(x_base, read_base, pos, offset + (WIDTH - 1) + pos,
                                     (pos >= 0) & (pos < seqlen), (pos < 0) & has_history, mask_d,
                                     state_len, stride_x_tok, stride_s_pos)
                weight = tl.load(w_ptr + offs_d * stride_w_dim + k * stride_w_tap,
                                 mask=mask_d, other=0.0).to(tl.float32)
                acc += value * weight[None, :]
        if SILU:  # x sigmoid(x) with exp2 and a plain division: fewer instructions than tl.sigmoid
            acc = acc / (1.0 + tl.exp2(acc * -1.4426950408889634))
        acc = tl.where(poison, float("nan"), acc)
        tl.store(out_seq + (bos * 0 + t0) * stride_o_tok + offs_i[:, None] * stride_o_tok
                 + offs_d[None, :] * stride_o_dim,
                 acc.to(out_ptr.dtype.element_ty), mask=(offs_t < seqlen)[:, None] & mask_d[None, :])

    # The new state: the newest inputs at the end, older history shifted in
    # front. Loaded before any state is written (it may read the slot).
    offs_r = tl.arange(0, BLOCK_R)
    in_state = offs_r < write_len
    pos = offs_r - (write_len - seqlen)
    new = _load_window(x_base, read_base, pos, offs_r + shift, in_state & (pos >= 0),
                       in_state & (pos < 0) & has_history, mask_d, state_len,
                       stride_x_tok, stride_s_pos)
    keep = active & (seqlen > 0) & (split == 0)
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



@triton.jit
def _dacc(x_base, read_base, dout_base, w_ptr, bias, t, seqlen, has_history, mask_d, offs_d,
          state_len, stride_x_tok, stride_s_pos, stride_do_tok, stride_w_dim, stride_w_tap,
          WIDTH: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(len(t), BLOCK_D) float32: d(pre-activation) at tokens ``t`` of the
    sequence (0 outside it), the forward's sum recomputed."""
    in_seq = (t >= 0) & (t < seqlen)
    dout = tl.load(dout_base[None, :] + tl.where(in_seq, t, 0)[:, None] * stride_do_tok,
                   mask=in_seq[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    if SILU:
        acc = tl.zeros(dout.shape, dtype=tl.float32)
        if HAS_BIAS:
            acc += bias[None, :]
        for k in tl.static_range(WIDTH):
            pos = t + (k - (WIDTH - 1))
            value = _load_window(x_base, read_base, pos, (WIDTH - 1) + pos,
                                 in_seq & (pos >= 0), in_seq & (pos < 0) & has_history, mask_d,
                                 state_len, stride_x_tok, stride_s_pos)
            weight = tl.load(w_ptr + offs_d * stride_w_dim + k * stride_w_tap,
                             mask=mask_d, other=0.0).to(tl.float32)
            acc += value * weight[None, :]
        sig = tl.sigmoid(acc)
        dout = dout * sig * (1.0 + acc * (1.0 - sig))
    return dout


@triton.jit
def _dwindow(x_base, read_base, dout_base, dnew_base, w_ptr, bias, p, seqlen, has_history, keep,
             mask_d, offs_d, state_len, stride_x_tok, stride_s_pos, stride_do_tok, stride_dn_pos,
             stride_w_dim, stride_w_tap, WIDTH: tl.constexpr, SILU: tl.constexpr,
             HAS_BIAS: tl.constexpr, HAS_DNEW: tl.constexpr):
    """(len(p), BLOCK_D) float32: the gradient of window position ``p`` (< 0:
    history) through the outputs and, with HAS_DNEW, the new state."""
    grad = tl.zeros((p.shape[0], offs_d.shape[0]), dtype=tl.float32)
    for k in tl.static_range(WIDTH):
        weight = tl.load(w_ptr + offs_d * stride_w_dim + k * stride_w_tap,
                         mask=mask_d, other=0.0).to(tl.float32)
        grad += weight[None, :] * _dacc(
            x_base, read_base, dout_base, w_ptr, bias, p + (WIDTH - 1 - k), seqlen, has_history,
            mask_d, offs_d, state_len, stride_x_tok, stride_s_pos, stride_do_tok, stride_w_dim,
            stride_w_tap, WIDTH, SILU, HAS_BIAS)
    if HAS_DNEW:
        # new_state[r] = window[r + seqlen - (W - 1)], r < W - 1, when the state is written
        r = p - seqlen + (WIDTH - 1)
        in_new = keep & (r >= 0) & (r < WIDTH - 1)
        grad += tl.load(dnew_base[None, :] + tl.where(in_new, r, 0)[:, None] * stride_dn_pos,
                        mask=in_new[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    return grad


@triton.heuristics(platform.given_flags(
    HAS_BIAS="bias_ptr", HAS_INDICES="idx_ptr", HAS_INIT_FLAGS="has_init_ptr", HAS_DNEW="dnew_ptr"))
@triton.jit
def _causal_conv1d_fn_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, qsl_ptr, idx_ptr, has_init_ptr, dout_ptr, dnew_ptr,
    dx_ptr, dw_ptr, db_ptr, dstate_ptr,
    dim, num_tokens, num_slots, state_len, pad_slot_id,
    stride_x_tok, stride_x_dim, stride_w_dim, stride_w_tap, stride_bias,
    stride_s_slot, stride_s_dim, stride_s_pos, stride_idx,
    stride_do_tok, stride_do_dim, stride_dn_slot, stride_dn_dim, stride_dn_pos,
    stride_dx_tok, stride_dx_dim, stride_ds_slot, stride_ds_dim, stride_ds_pos,
    WIDTH: tl.constexpr, SILU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, SPLITS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_INDICES: tl.constexpr, HAS_INIT_FLAGS: tl.constexpr,
    HAS_DNEW: tl.constexpr,
):
    """The training form's backward (no prefix caching). Grid (num_seqs,
    cdiv(dim, BLOCK_D), SPLITS): a program takes every SPLITS-th token tile of
    one sequence for a block of channels (``ConvTiles.splits``): their dx, and
    its dweight (num_seqs * SPLITS, W, dim) and dbias (num_seqs * SPLITS, dim)
    partials (zero for padding; NaN, with NaN dx, for a sequence whose indices
    break the contract); split 0 also the history gradient. dx starts zeroed and dstate
    as d(new states): the state columns a sequence overwrote get the history
    gradient (0 without initial state); columns it left pass through."""
    seq = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(2)
    mask_d = offs_d < dim
    bos = tl.load(qsl_ptr + seq).to(tl.int64)
    eos = tl.load(qsl_ptr + seq + 1).to(tl.int64)
    ok = (bos >= 0) & (bos <= eos) & (eos <= num_tokens)
    bos = tl.minimum(tl.maximum(bos, 0), num_tokens)
    seqlen = tl.minimum(tl.maximum(eos, bos), num_tokens) - bos
    if HAS_INDICES:
        slot = tl.load(idx_ptr + seq * stride_idx).to(tl.int64)
        padding = slot == pad_slot_id
        ok = ok & (slot >= 0) & (slot < num_slots)
    else:
        slot = seq
        padding = seq < 0  # False, as a tensor
        ok = ok & (seq < num_slots)
    active = ok & ~padding
    poison = ~ok & ~padding
    if HAS_INIT_FLAGS:
        has_history = active & (tl.load(has_init_ptr + seq) != 0)
    else:
        has_history = active & False
    slot = tl.where(active, slot, 0)
    keep = active & (seqlen > 0)
    read_base = state_ptr + slot * stride_s_slot + offs_d * stride_s_dim
    x_base = x_ptr + bos * stride_x_tok + offs_d * stride_x_dim
    dout_base = dout_ptr + bos * stride_do_tok + offs_d * stride_do_dim
    dnew_base = dout_base  # unused without HAS_DNEW (dnew_ptr is None then)
    if HAS_DNEW:
        dnew_base = dnew_ptr + slot * stride_dn_slot + offs_d * stride_dn_dim
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d * stride_bias, mask=mask_d, other=0.0).to(tl.float32)
    offs_w = tl.arange(0, BLOCK_W)
    dw = tl.zeros((BLOCK_W, BLOCK_D), dtype=tl.float32)
    db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t0 in range(split * BLOCK_T, tl.where(active, seqlen, 0), SPLITS * BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        dacc = _dacc(x_base, read_base, dout_base, w_ptr, bias, offs_t, seqlen, has_history,
                     mask_d, offs_d, state_len, stride_x_tok, stride_s_pos, stride_do_tok,
                     stride_w_dim, stride_w_tap, WIDTH, SILU, HAS_BIAS)
        db += tl.sum(dacc, axis=0)
        for k in tl.static_range(WIDTH):
            pos = offs_t + (k - (WIDTH - 1))
            value = _load_window(x_base, read_base, pos, (WIDTH - 1) + pos,
                                 (pos >= 0) & (pos < seqlen), (pos < 0) & has_history, mask_d,
                                 state_len, stride_x_tok, stride_s_pos)
            dw += tl.where(offs_w[:, None] == k, tl.sum(dacc * value, axis=0)[None, :], 0.0)
        dx = _dwindow(x_base, read_base, dout_base, dnew_base, w_ptr, bias, offs_t, seqlen,
                      has_history, keep, mask_d, offs_d, state_len, stride_x_tok, stride_s_pos,
                      stride_do_tok, stride_dn_pos, stride_w_dim, stride_w_tap, WIDTH, SILU,
                      HAS_BIAS, HAS_DNEW)
        tl.store(dx_ptr + (bos + offs_t)[:, None] * stride_dx_tok + offs_d[None, :] * stride_dx_dim,
                 dx.to(dx_ptr.dtype.element_ty), mask=(offs_t < seqlen)[:, None] & mask_d[None, :])
    for t0 in range(split * BLOCK_T, tl.where(poison, seqlen, 0), SPLITS * BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        tl.store(dx_ptr + (bos + offs_t)[:, None] * stride_dx_tok + offs_d[None, :] * stride_dx_dim,
                 tl.full((BLOCK_T, BLOCK_D), float("nan"), tl.float32).to(dx_ptr.dtype.element_ty),
                 mask=(offs_t < seqlen)[:, None] & mask_d[None, :])
    dw = tl.where(poison, float("nan"), dw)
    db = tl.where(poison, float("nan"), db)
    part = seq * SPLITS + split
    tl.store(dw_ptr + (part * WIDTH + offs_w[:, None]) * dim + offs_d[None, :],
             dw, mask=(offs_w < WIDTH)[:, None] & mask_d[None, :])
    tl.store(db_ptr + part * dim + offs_d, db, mask=mask_d)
    # The history gradient: window positions -(W-1) .. -1, state columns 0 .. W-2.
    offs_r = tl.arange(0, BLOCK_R)
    in_hist = offs_r < WIDTH - 1
    dhist = _dwindow(x_base, read_base, dout_base, dnew_base, w_ptr, bias, offs_r - (WIDTH - 1),
                     seqlen, has_history, keep, mask_d, offs_d, state_len, stride_x_tok,
                     stride_s_pos, stride_do_tok, stride_dn_pos, stride_w_dim, stride_w_tap, WIDTH,
                     SILU, HAS_BIAS, HAS_DNEW)
    dhist = tl.where(has_history, dhist, 0.0)
    tl.store(dstate_ptr + slot * stride_ds_slot + offs_r[:, None] * stride_ds_pos
             + offs_d[None, :] * stride_ds_dim, dhist.to(dstate_ptr.dtype.element_ty),
             mask=(in_hist & keep & (split == 0))[:, None] & mask_d[None, :])


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
    grid = (layout.num_seqs, platform.cdiv(layout.dim, tiles.block_d), tiles.splits)
    with platform.on_device(x_tok.device):
        platform.launch(_causal_conv1d_kernel, grid,
            x_tok, weight, bias, state, out_tok,
            query_start_loc, indices2, has_initial_state, num_accepted_tokens, initial_state_idx,
            block_idx_last_scheduled_token, block_idx_first_scheduled_token, num_computed_tokens,
            layout.dim, layout.num_tokens, layout.num_slots, layout.state_len,
            layout.index_columns, layout.write_len, layout.max_accepted, pad_slot_id,
            block_size_to_align,
            *x_tok.stride(), *weight.stride(), *platform.strides(bias, 1), *state.stride(),
            *out_tok.stride(), *platform.strides(indices2, 2),
            WIDTH=layout.width, SILU=silu, ALWAYS_HISTORY=decode,
            BLOCK_T=tiles.block_t, BLOCK_D=tiles.block_d, BLOCK_R=tiles.block_r,
            SPLITS=tiles.splits, num_warps=4)


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


# The launches as torch ops (``output``, not ``out``: torch.compile reads an
# ``out=`` argument as an out-variant's).
_OPS = {
    "causal_conv1d_fn": platform.define_op(
        "causal_conv1d_fn",
        "(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) conv_states, Tensor query_start_loc, "
        "Tensor? cache_indices, Tensor? has_initial_state, Tensor? block_idx_first_scheduled_token, "
        "Tensor? block_idx_last_scheduled_token, Tensor? initial_state_idx, "
        "Tensor? num_computed_tokens, Tensor(b!) output, bool silu, int pad_slot_id, "
        "int block_size_to_align) -> ()", _conv_fn_op),
    "causal_conv1d_update": platform.define_op(
        "causal_conv1d_update",
        "(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, Tensor? conv_state_indices, "
        "Tensor? num_accepted_tokens, Tensor? query_start_loc, Tensor? initial_state_idx, "
        "Tensor? block_idx_last_scheduled_token, Tensor(b!) output, bool silu, int max_query_len, "
        "int pad_slot_id) -> ()", _conv_update_op),
}


def _checked(function: str, check, arrays: dict, *, out, activation, pad_slot_id,
             validate_indices, **sizes):
    """The checks (in debug mode the index values too): the call's layout."""
    layout = check(**arrays, out=out, activation=activation, pad_slot_id=pad_slot_id, **sizes)
    device = platform.check_kernel_device(dict(arrays, out=out))
    values = platform.host_index_values(
        validate_indices, device, **{k: v for k, v in arrays.items() if k in INDEX_ARGS})
    if values is not None:
        check_conv_index_values(function, layout, values, pad_slot_id=pad_slot_id)
    return layout


def _call(function: str, check, arrays: dict, *, out, activation, pad_slot_id, validate_indices,
          **sizes):
    """The checks, then the op ``function`` writing ``out`` (allocated like
    ``x`` when not given)."""
    layout = _checked(function, check, arrays, out=out, activation=activation,
                      pad_slot_id=pad_slot_id, validate_indices=validate_indices, **sizes)
    out = torch.empty_like(arrays["x"]) if out is None else out
    _OPS[function](**arrays, output=out, silu=layout.silu, pad_slot_id=int(pad_slot_id),
                   **{k: int(v) for k, v in sizes.items()})
    return out


def _conv_fn_functional(x, weight, bias, conv_states, query_start_loc, cache_indices,
                        has_initial_state, silu, pad_slot_id):
    """(out (dim, T) laid out like x, zero where no sequence writes; the new
    states, a copy of ``conv_states`` with the sequences' slots rewritten)."""
    out, new_states = torch.zeros_like(x), conv_states.clone()
    _launch(x_tok=x.t(), out_tok=out.t(), weight=weight, bias=bias, state=new_states,
            query_start_loc=query_start_loc, indices=cache_indices, silu=silu, decode=False,
            pad_slot_id=pad_slot_id, has_initial_state=has_initial_state)
    return out, new_states


def _bwd_plan(x, weight, conv_states, query_start_loc, cache_indices, silu):
    """The backward's layout and tiles (``tiles.splits`` programs per sequence)."""
    layout = conv_layout(x.shape[1], weight, conv_states, query_start_loc, cache_indices,
                         silu=silu, decode=False)
    tiles = conv_tiles(layout)
    return layout, tiles


def _conv_fn_backward(x, weight, bias, conv_states, query_start_loc, cache_indices,
                      has_initial_state, dout, dnew_states, dx, dweight, dbias, dstates, silu,
                      pad_slot_id):
    """dx (dim, T) zeroed, dweight (num_seqs * splits, W, dim) / dbias
    (num_seqs * splits, dim) float32 partials (``ConvTiles.splits``), dstates
    holding d(new states) (zeros when None)."""
    layout, tiles = _bwd_plan(x, weight, conv_states, query_start_loc, cache_indices, silu)
    splits = tiles.splits
    if layout.num_seqs == 0 or layout.dim == 0:
        return
    x_tok, dout_tok, dx_tok = x.t(), dout.t(), dx.t()
    grid = (layout.num_seqs, platform.cdiv(layout.dim, tiles.block_d), splits)
    with platform.on_device(x.device):
        platform.launch(_causal_conv1d_fn_bwd_kernel, grid,
            x_tok, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state,
            dout_tok, dnew_states, dx_tok, dweight, dbias, dstates,
            layout.dim, layout.num_tokens, layout.num_slots, layout.state_len, pad_slot_id,
            *x_tok.stride(), *weight.stride(), *platform.strides(bias, 1), *conv_states.stride(),
            *platform.strides(cache_indices, 1), *dout_tok.stride(),
            *platform.strides(dnew_states, 3), *dx_tok.stride(), *dstates.stride(),
            WIDTH=layout.width, SILU=silu, BLOCK_T=tiles.block_t, BLOCK_D=tiles.block_d,
            BLOCK_R=tiles.block_r, BLOCK_W=conv_bwd_block_w(layout.width), SPLITS=splits,
            num_warps=4)


def _conv_fn_functional_fake(x, weight, bias, conv_states, *args):
    return torch.empty_like(x), torch.empty_like(conv_states)


_BACKWARD = platform.define_op(
    "causal_conv1d_fn_backward",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor conv_states, Tensor query_start_loc, "
    "Tensor? cache_indices, Tensor? has_initial_state, Tensor dout, Tensor? dnew_states, "
    "Tensor(a!) dx, Tensor(b!) dweight, Tensor(c!) dbias, Tensor(d!) dstates, bool silu, "
    "int pad_slot_id) -> ()", _conv_fn_backward)

_FN_SAVED = ("x", "weight", "bias", "conv_states", "query_start_loc", "cache_indices",
             "has_initial_state")


def _conv_fn_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:len(_FN_SAVED)])
    ctx.silu, ctx.pad_slot_id = inputs[len(_FN_SAVED):]


def _conv_fn_autograd_backward(ctx, dout, dnew_states):
    x, weight, bias, conv_states, qsl, indices, has_init = ctx.saved_tensors
    layout, tiles = _bwd_plan(x, weight, conv_states, qsl, indices, ctx.silu)
    parts = layout.num_seqs * tiles.splits
    dout = torch.zeros_like(x) if dout is None else dout
    dx = torch.zeros_like(x)
    dweight = weight.new_zeros((parts, weight.shape[1], weight.shape[0]), dtype=torch.float32)
    dbias = weight.new_zeros((parts, weight.shape[0]), dtype=torch.float32)
    dstates = (torch.zeros_like(conv_states) if dnew_states is None
               else dnew_states.to(conv_states.dtype, copy=True))
    _BACKWARD(
        x, weight, bias, conv_states, qsl, indices, has_init, dout, dnew_states, dx, dweight,
        dbias, dstates, ctx.silu, ctx.pad_slot_id)
    needs = ctx.needs_input_grad
    return (dx if needs[0] else None, dweight.sum(0).t().to(weight.dtype) if needs[1] else None,
            dbias.sum(0).to(bias.dtype) if bias is not None and needs[2] else None,
            dstates if needs[3] else None, None, None, None, None, None)


# The training form (differentiable): a functional op returning the new
# states (a mutating op cannot carry autograd), its backward the op above.
_FUNCTIONAL = platform.define_op(
    "causal_conv1d_fn_functional",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor conv_states, Tensor query_start_loc, "
    "Tensor? cache_indices, Tensor? has_initial_state, bool silu, int pad_slot_id) "
    "-> (Tensor, Tensor)", _conv_fn_functional, _conv_fn_functional_fake,
    autograd=(_conv_fn_autograd_backward, _conv_fn_setup_context))


def _requires_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def causal_conv1d_fn(x, weight, bias=None, conv_states=None, query_start_loc=None,
                     cache_indices=None, has_initial_state=None, activation="silu",
                     pad_slot_id=NULL_BLOCK_ID, block_idx_first_scheduled_token=None,
                     block_idx_last_scheduled_token=None, initial_state_idx=None,
                     num_computed_tokens=None, block_size_to_align=0, *, out=None,
                     validate_indices=None, return_states=False):
    """Prefill over packed sequences: ``x (dim, T)`` (a transposed token-major
    buffer), ``weight (dim, width)``, ``bias (dim,)``, ``conv_states (S, dim,
    L)`` read and written in place at ``cache_indices`` (or a block table with
    prefix caching; ``bridge.spec.conv_contract``). Returns ``out (dim, T)``
    (allocated when not given; padding sequences' columns left as they were).

    Training: with ``return_states=True`` the call is functional and
    differentiable (x, weight, bias, conv_states): ``conv_states`` is not
    written, ``(out, new_conv_states)`` is returned. ``conv_states=None``: no
    initial states (the new states are ``(num_seqs, dim, width - 1)``).
    Inputs that require grad without ``return_states`` take the same path and
    write the new states into ``conv_states`` afterwards (no gradient flows
    through that write); refused when ``conv_states`` itself requires grad,
    with ``out`` given, or with prefix caching.

    ``validate_indices=True`` (or ``$MAMBA_TWIN_CHECK_INDICES=1``) checks the
    index values on the host first (a device sync; skipped under CUDA-graph
    capture and torch.compile); unchecked, bad values follow the contract's
    unchecked rules (skipped, NaN outputs, no stray access).
    """
    prefix = dict(block_idx_first_scheduled_token=block_idx_first_scheduled_token,
                  block_idx_last_scheduled_token=block_idx_last_scheduled_token,
                  initial_state_idx=initial_state_idx, num_computed_tokens=num_computed_tokens)
    states = conv_states
    if conv_states is None:
        states = torch.zeros(stateless_states_shape(
            x=x, weight=weight, query_start_loc=query_start_loc, cache_indices=cache_indices,
            has_initial_state=has_initial_state, **prefix), dtype=x.dtype, device=x.device)
    arrays = dict(x=x, weight=weight, bias=bias, conv_states=states,
                  query_start_loc=query_start_loc, cache_indices=cache_indices,
                  has_initial_state=has_initial_state, **prefix)
    options = dict(out=out, activation=activation, pad_slot_id=pad_slot_id,
                   validate_indices=validate_indices, block_size_to_align=block_size_to_align)
    grad = _requires_grad(x, weight, bias, conv_states)
    if not (grad or return_states):
        out = _call("causal_conv1d_fn", check_conv_fn_args, arrays, **options)
        return out
    check_conv_fn_grad(out=out, **prefix)
    if grad and not return_states and conv_states is not None and conv_states.requires_grad:
        raise ValueError("causal_conv1d_fn: `conv_states` requires grad, but the call writes it in "
                         "place, which cannot carry a gradient: pass return_states=True (the "
                         "functional form returns the new states)")
    layout = _checked("causal_conv1d_fn", check_conv_fn_args, arrays, **options)
    # In place afterwards: the op must not keep (for its backward) the tensor it overwrites.
    source = states if return_states or conv_states is None else states.detach().clone()
    out, new_states = _FUNCTIONAL(
        x, weight, bias, source, query_start_loc, cache_indices, has_initial_state,
        layout.silu, int(pad_slot_id))
    if return_states:
        return out, new_states
    if conv_states is not None:
        with torch.no_grad():
            conv_states.copy_(new_states)
    return out


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
    ``causal_conv1d_fn``. Inference only: refused (RuntimeError) when an input
    requires grad with grad mode on.
    """
    if _requires_grad(x, conv_state, weight, bias):
        raise RuntimeError("causal_conv1d_update is an inference-only (decode) op: it has no "
                           "gradient and writes `conv_state` in place; call it under "
                           "torch.no_grad() or torch.inference_mode() (to train: causal_conv1d_fn)")
    return _call("causal_conv1d_update", check_conv_update_args, dict(
        x=x, conv_state=conv_state, weight=weight, bias=bias,
        conv_state_indices=conv_state_indices, num_accepted_tokens=num_accepted_tokens,
        query_start_loc=query_start_loc, initial_state_idx=initial_state_idx,
        block_idx_last_scheduled_token=block_idx_last_scheduled_token),
        out=out, activation=activation, pad_slot_id=pad_slot_id,
        validate_indices=validate_indices, max_query_len=max_query_len)
