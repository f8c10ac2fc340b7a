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
``causal_conv1d_fn`` is differentiable (``jax.custom_vjp``, a second Pallas
kernel for the backward); ``causal_conv1d_update`` is inference-only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bridge.spec.conv_contract import (
    INDEX_ARGS, NULL_BLOCK_ID, ConvLayout, ConvTiles, check_conv_fn_args, check_conv_fn_grad,
    check_conv_index_values, check_conv_update_args, conv_bwd_block_w,
    conv_tiles, stateless_states_shape)
from jax_impl import platform


def _causal_conv1d_kernel(state_ref, out_in_ref, x_ref, weight_ref, bias_ref, qsl_ref, indices_ref,
                          has_init_ref, accepted_ref, read_col_ref, write_col_ref, first_block_ref,
                          num_computed_ref, *out_refs, layout: ConvLayout, tiles: ConvTiles,
                          pad_slot_id: int, block_size: int, x_origin: tuple = (0, 0),
                          out_columns: tuple = ()):
    """Grid (num_seqs, cdiv(dim, block_d), tiles.splits): a program runs
    every splits-th token tile of one sequence for a block of channels; the
    first (the only one reading the history: block_t >= W - 1 when split)
    then writes that block of the sequence's state (and, given
    ``first_block_ref``, of the states at the block boundaries it crossed).
    A sequence whose indices break the contract is skipped, its
    outputs NaN. Tiles are addressed by index arrays (masked lanes clamped to
    row 0), so no slice starts before a sequence's first token. Index
    arithmetic is int32 throughout (x64 mode included).

    ``x_origin``: x's first row and column in ``x_ref`` (a wider array, read
    in place). ``out_columns``: the output split over several refs, the
    ``(first, end)`` channels of each (one ref of every channel when empty)."""
    # Without a given output (``out_in_ref`` None) padding sequences' rows are written as 0.
    zero_padding = out_in_ref is None
    del out_in_ref  # the same buffer as the (single) output
    *out_refs, state_out_ref = out_refs
    out_columns = out_columns or ((0, layout.dim),)
    i32 = jnp.int32
    zero = jnp.zeros((), i32)  # not a Python 0: see `run_len`
    num_tokens, num_slots, width = layout.num_tokens, layout.num_slots, layout.width
    seq, split = pl.program_id(0), pl.program_id(2)
    offs_d = pl.program_id(1) * tiles.block_d + jnp.arange(tiles.block_d, dtype=i32)
    mask_d = offs_d < layout.dim
    cols = offs_d[None, :]
    x_row0, x_cols = x_origin[0], x_origin[1] + cols
    if qsl_ref is not None:
        bos, eos = qsl_ref[seq], qsl_ref[seq + 1]
        ok = (bos >= 0) & (bos <= eos) & (eos <= num_tokens)
        bos = jnp.clip(bos, 0, num_tokens)  # the tokens clipped to [0, T)
        seqlen = jnp.clip(eos, bos, num_tokens) - bos
    else:
        bos, seqlen, ok = seq, jnp.ones((), i32), jnp.ones((), bool)
    write_col = zero
    if indices_ref is not None:
        read_col = read_col_ref[seq] if read_col_ref is not None else zero
        if write_col_ref is not None:
            write_col = write_col_ref[seq]
        cols_ok = ((read_col >= 0) & (read_col < layout.index_columns)
                   & (write_col >= 0) & (write_col < layout.index_columns))
        read_slot = indices_ref[seq, jnp.where(cols_ok, read_col, zero)]
        write_slot = indices_ref[seq, jnp.where(cols_ok, write_col, zero)]
        padding = cols_ok & (read_slot == pad_slot_id)  # output and cache untouched
        ok = (ok & cols_ok & (read_slot >= 0) & (read_slot < num_slots)
              & (write_slot >= 0) & (write_slot < num_slots))
    else:
        read_slot = write_slot = seq
        padding = seq < 0  # False, but traced: the Triton lowering cannot invert a constant
        ok = ok & (seq < num_slots)
    offset, shift = zero, seqlen
    if accepted_ref is not None:
        accepted = accepted_ref[seq]
        ok = (ok & (accepted >= 1) & (accepted <= layout.max_accepted)
              & (accepted <= jnp.maximum(seqlen, 1)))
        offset, shift = accepted - 1, accepted
    if first_block_ref is not None:
        computed, first_block = num_computed_ref[seq], first_block_ref[seq]
        ok = ok & (computed >= 0) & (first_block >= 0) & (first_block <= write_col)

        def count_bad_slot(block, bad):
            slot = indices_ref[seq, block]
            slot_bad = (slot != pad_slot_id) & ((slot < 0) | (slot >= num_slots))
            return bad + jnp.where(slot_bad, jnp.ones((), i32), zero)

        ok = ok & (jax.lax.fori_loop(first_block, jnp.where(ok, write_col, first_block),
                                     count_bad_slot, zero) == 0)
    active = ok & ~padding
    poison = ~ok & ~padding
    if layout.decode:
        has_history = active
    elif has_init_ref is not None:
        has_history = active & (has_init_ref[seq] != 0)
    else:
        has_history = jnp.zeros((), bool)
    read_slot = jnp.where(active, read_slot, zero)

    def load_window(rows, columns, from_x, from_state):
        """(len(rows), block_d) float32: x at ``rows`` where ``from_x``, the read
        slot's state at ``columns`` where ``from_state`` (and inside the state), else 0."""
        from_state = from_state & (columns >= 0) & (columns < layout.state_len)
        x = plgpu.load(x_ref.at[x_row0 + bos + jnp.where(from_x, rows, zero)[:, None], x_cols],
                       mask=from_x[:, None] & mask_d[None, :], other=0.0)
        old = plgpu.load(state_ref.at[read_slot, jnp.where(from_state, columns, zero)[:, None], cols],
                         mask=from_state[:, None] & mask_d[None, :], other=0.0)
        return jnp.where(from_x[:, None], x.astype(jnp.float32), old.astype(jnp.float32))

    if bias_ref is not None:
        bias = plgpu.load(bias_ref.at[offs_d], mask=mask_d, other=0.0).astype(jnp.float32)

    def window_sum(offs_t, load):
        """(block_t, block_d) float32: bias + sum over taps of weight * ``load(window positions)``."""
        acc = jnp.zeros((tiles.block_t, tiles.block_d), jnp.float32)
        if bias_ref is not None:
            acc = acc + bias[None, :]
        for k in range(width):
            weight = plgpu.load(weight_ref.at[offs_d, k], mask=mask_d, other=0.0)
            acc = acc + load(offs_t + (k - (width - 1))) * weight.astype(jnp.float32)[None, :]
        return acc

    def from_x(pos):
        return plgpu.load(x_ref.at[x_row0 + bos + pos[:, None], x_cols],
                          mask=(pos < seqlen)[:, None] & mask_d[None, :], other=0.0).astype(jnp.float32)

    def with_history(pos):  # window position < 0: the read slot's state
        return load_window(pos, offset + (width - 1) + pos, (pos >= 0) & (pos < seqlen),
                           (pos < 0) & has_history)

    def token_block(i, carry):
        start = (split + i * tiles.splits) * tiles.block_t
        offs_t = start + jnp.arange(tiles.block_t, dtype=i32)
        # Every tile but a sequence's first: the window lies in x (no history loads and selects).
        acc = jax.lax.cond(start >= width - 1, lambda: window_sum(offs_t, from_x),
                           lambda: window_sum(offs_t, with_history))
        if layout.silu:  # x sigmoid(x) with exp2 and a plain division, as the Triton kernel
            acc = acc / (1.0 + jnp.exp2(acc * -1.4426950408889634))
        acc = jnp.where(poison, jnp.nan, acc)
        if zero_padding:
            acc = jnp.where(padding, 0.0, acc)
        # Masked lanes past T not clamped: the interpreter's masked store
        # rewrites what it reads, and a clamped lane would race a real one.
        rows = (bos + offs_t)[:, None]
        for out_ref, (first, end) in zip(out_refs, out_columns):
            inside = (cols >= first) & (cols < end)
            # Compiled, the columns stay affine (vector stores; masked lanes
            # are never accessed). The interpreter reads every lane: those of
            # other refs go past the end (dropped), not to a negative column
            # that would wrap onto a real one.
            out_cols = jnp.where(inside, cols - first, end - first) if platform.INTERPRET else cols - first
            plgpu.store(out_ref.at[rows, out_cols], acc.astype(out_ref.dtype),
                        mask=(offs_t < seqlen)[:, None] & inside)
        return carry

    # An int32 operand on both sides: with a Python int, JAX folds the select
    # into a bool -> int cast that the Triton lowering leaves as i1.
    run_len = seqlen if zero_padding else jnp.where(padding, zero, seqlen)
    # (Not pl.cdiv: its lax.div sees an int64 divisor in x64 mode.)
    num_tiles = (run_len + tiles.block_t - 1) // tiles.block_t
    jax.lax.fori_loop(0, jnp.maximum(num_tiles - split + tiles.splits - 1, zero) // tiles.splits,
                      token_block, 0)

    # The new state: the newest inputs at the end, older history shifted in
    # front. Loaded before any state is written (it may read the slot).
    offs_r = jnp.arange(tiles.block_r, dtype=i32)
    in_state = offs_r < layout.write_len
    pos = offs_r - (layout.write_len - seqlen)
    new = load_window(pos, offs_r + shift, in_state & (pos >= 0), in_state & (pos < 0) & has_history)
    keep = active & (seqlen > 0) & (split == 0)
    if first_block_ref is not None:
        # The last W-1 inputs before each block boundary crossed, into that
        # block's slot. Only the first boundary can reach into the history.
        in_window = offs_r < width - 1

        def boundary(block, carry):
            cut = (block + 1) * block_size - computed - (width - 1) + offs_r  # window positions
            value = load_window(cut, offset + (width - 1) + cut,
                                in_window & (cut >= 0) & (cut < seqlen),
                                in_window & (cut < 0) & has_history)
            slot = indices_ref[seq, block]
            slot_ok = slot != pad_slot_id  # in range: checked above
            _barrier()  # the window's reads of the slot before it is overwritten
            plgpu.store(state_out_ref.at[jnp.where(slot_ok, slot, zero), offs_r[:, None], cols],
                        value.astype(state_out_ref.dtype),
                        mask=(in_window & slot_ok)[:, None] & mask_d[None, :])
            return carry

        jax.lax.fori_loop(first_block, jnp.where(keep, write_col, first_block), boundary, 0)
    _barrier()  # every read of the slot (by any warp) before it is overwritten
    plgpu.store(state_out_ref.at[jnp.where(keep, write_slot, zero), offs_r[:, None], cols],
                new.astype(state_out_ref.dtype), mask=(in_state & keep)[:, None] & mask_d[None, :])


def _barrier():
    if not platform.INTERPRET:  # the interpreter runs one program at a time
        plgpu.debug_barrier()


def _run(layout: ConvLayout, tiles: ConvTiles, *, x, state, out, weight, bias, query_start_loc,
         indices, pad_slot_id, has_initial_state=None, num_accepted_tokens=None,
         initial_state_idx=None, block_idx_last_scheduled_token=None,
         block_idx_first_scheduled_token=None, num_computed_tokens=None, block_size_to_align=0,
         x_origin=(0, 0), out_columns=()):
    """x, out (T, D) (out None: a new array); state (S, L, D). Returns
    (out (T, D), new state (S, L, D)). ``x_origin`` / ``out_columns``: see
    the kernel (x then holds more rows and columns; the output is one
    ``(T, end - first)`` array per ``out_columns`` entry, returned as a tuple
    in place of ``out``)."""
    out_dtype = x.dtype if out is None else out.dtype
    shapes = [(layout.num_tokens, end - first) for first, end in out_columns] or [(layout.num_tokens,
                                                                                    layout.dim)]
    if layout.num_seqs == 0 or layout.dim == 0 or layout.num_tokens == 0:
        outs = tuple(jnp.zeros(shape, out_dtype) for shape in shapes)
        return (outs if out_columns else (outs[0] if out is None else out)), state
    if indices is not None:
        indices = indices.reshape(indices.shape[0], -1)
    kernel = functools.partial(_causal_conv1d_kernel, layout=layout, tiles=tiles,
                               pad_slot_id=pad_slot_id, block_size=block_size_to_align,
                               x_origin=x_origin, out_columns=out_columns)
    # Flat operand numbers: the state first, then out when given.
    aliases = {0: len(shapes)} if out is None else {0: 1, 1: 0}
    *outs, new_state = pl.pallas_call(
        kernel,
        out_shape=(*(jax.ShapeDtypeStruct(shape, out_dtype) for shape in shapes),
                   jax.ShapeDtypeStruct(state.shape, state.dtype)),
        grid=(layout.num_seqs, pl.cdiv(layout.dim, tiles.block_d), tiles.splits),
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=platform.INTERPRET,
        name="causal_conv1d",
    )(state, out, x, weight, bias, *map(platform.int32_indices, (
        query_start_loc, indices, has_initial_state, num_accepted_tokens, initial_state_idx,
        block_idx_last_scheduled_token, block_idx_first_scheduled_token, num_computed_tokens)))
    return (tuple(outs) if out_columns else outs[0]), new_state


def _conv_fn_bwd_kernel(dx_in_ref, dstate_in_ref, x_ref, weight_ref, bias_ref, state_ref, qsl_ref,
                        indices_ref, has_init_ref, dout_ref, dnew_ref, dx_ref, dw_ref, db_ref,
                        dstate_ref, *, layout: ConvLayout, tiles: ConvTiles, pad_slot_id: int,
                        block_w: int):
    """The training form's backward (no prefix caching); the mirror of
    ``torch_impl.causal_conv1d._causal_conv1d_fn_bwd_kernel`` (see there),
    except that the 2W - 1 window rows around a tile are loaded once and
    shared by the W recomputed pre-activations (traced Python lists; the
    Triton kernel reloads them, from cache).
    Grid (num_seqs, cdiv(dim, block_d), tiles.splits); dx starts zeroed, dstate as
    d(new states); dw (num_seqs * splits, block_w, D) and db (num_seqs *
    splits, D) float32 partials."""
    del dx_in_ref, dstate_in_ref  # the same buffers as dx_ref, dstate_ref
    i32, f32 = jnp.int32, jnp.float32
    zero = jnp.zeros((), i32)
    width, splits = layout.width, tiles.splits
    seq, split = pl.program_id(0), pl.program_id(2)
    offs_d = pl.program_id(1) * tiles.block_d + jnp.arange(tiles.block_d, dtype=i32)
    mask_d = offs_d < layout.dim
    cols = offs_d[None, :]
    bos, eos = qsl_ref[seq], qsl_ref[seq + 1]
    ok = (bos >= 0) & (bos <= eos) & (eos <= layout.num_tokens)
    bos = jnp.clip(bos, 0, layout.num_tokens)
    seqlen = jnp.clip(eos, bos, layout.num_tokens) - bos
    if indices_ref is not None:
        slot = indices_ref[seq]
        padding = slot == pad_slot_id
        ok = ok & (slot >= 0) & (slot < layout.num_slots)
    else:
        slot, padding = seq, seq < 0  # False, traced (see above)
        ok = ok & (seq < layout.num_slots)
    active = ok & ~padding
    poison = ~ok & ~padding
    has_history = (active & (has_init_ref[seq] != 0) if has_init_ref is not None
                   else jnp.zeros((), bool))
    slot = jnp.where(active, slot, zero)
    keep = active & (seqlen > 0)

    def rows_of(ref, rows, valid):
        """(len(rows), block_d) float32 of a (T, D) ref at the sequence's ``rows``."""
        return plgpu.load(ref.at[bos + jnp.where(valid, rows, zero)[:, None], cols],
                          mask=valid[:, None] & mask_d[None, :], other=0.0).astype(f32)

    def window(pos, valid):
        """Window position ``pos`` (< 0: history, state column W - 1 + pos)."""
        from_x = valid & (pos >= 0) & (pos < seqlen)
        columns = (width - 1) + pos
        from_state = valid & (pos < 0) & has_history & (columns >= 0)
        old = plgpu.load(state_ref.at[slot, jnp.where(from_state, columns, zero)[:, None], cols],
                         mask=from_state[:, None] & mask_d[None, :], other=0.0).astype(f32)
        return jnp.where(from_x[:, None], rows_of(x_ref, pos, from_x), old)

    def weight_tap(k):
        return plgpu.load(weight_ref.at[offs_d, k], mask=mask_d, other=0.0).astype(f32)

    bias = (plgpu.load(bias_ref.at[offs_d], mask=mask_d, other=0.0).astype(f32)
            if bias_ref is not None else jnp.zeros((tiles.block_d,), f32))

    def dwindow(p):
        """The gradient of window positions ``p`` through out and the new state,
        and d(pre-activation) at tokens ``p`` and the window around them (the
        2W - 1 window rows loaded once: row m is position p + m - (W - 1))."""
        rows = [window(p + m - (width - 1), jnp.ones(p.shape, bool)) for m in range(2 * width - 1)]
        taps = [weight_tap(k)[None, :] for k in range(width)]
        grad = jnp.zeros((p.shape[0], tiles.block_d), f32)
        dacc0 = None
        for j in range(width):  # the outputs at tokens p + j read position p with tap W-1-j
            t = p + j
            in_seq = (t >= 0) & (t < seqlen)
            dacc = rows_of(dout_ref, t, in_seq)
            if layout.silu:
                acc = bias[None, :] + sum(rows[j + k] * taps[k] for k in range(width))
                sig = jax.nn.sigmoid(acc)
                dacc = dacc * sig * (1.0 + acc * (1.0 - sig))
            grad = grad + taps[width - 1 - j] * dacc
            dacc0 = dacc if j == 0 else dacc0
        if dnew_ref is not None:
            r = p - seqlen + (width - 1)
            in_new = keep & (r >= 0) & (r < width - 1)
            grad = grad + plgpu.load(dnew_ref.at[slot, jnp.where(in_new, r, zero)[:, None], cols],
                                     mask=in_new[:, None] & mask_d[None, :], other=0.0).astype(f32)
        return grad, dacc0, rows

    offs_w = jnp.arange(block_w, dtype=i32)

    def tile(i):
        """This program's i-th token tile: tile split + i * splits of the sequence."""
        return (split + i * splits) * tiles.block_t + jnp.arange(tiles.block_t, dtype=i32)

    def token_block(i, carry):
        dw, db = carry
        offs_t = tile(i)
        dx, dacc, rows = dwindow(offs_t)
        db = db + jnp.sum(dacc, axis=0)
        for k in range(width):  # the window of token t at tap k: row k (position t + k - (W-1))
            dw = dw + jnp.where(offs_w[:, None] == k, jnp.sum(dacc * rows[k], axis=0)[None, :], 0.0)
        plgpu.store(dx_ref.at[(bos + offs_t)[:, None], cols], dx.astype(dx_ref.dtype),
                    mask=(offs_t < seqlen)[:, None] & mask_d[None, :])
        return dw, db

    def poison_block(i, carry):
        offs_t = tile(i)
        plgpu.store(dx_ref.at[(bos + offs_t)[:, None], cols],
                    jnp.full((tiles.block_t, tiles.block_d), jnp.nan, dx_ref.dtype),
                    mask=(offs_t < seqlen)[:, None] & mask_d[None, :])
        return carry

    # This program's tiles of n tokens (not pl.cdiv: x64).
    blocks = lambda n: jnp.maximum(n - split * tiles.block_t + splits * tiles.block_t - 1,  # noqa: E731
                                   zero) // (splits * tiles.block_t)
    dw, db = jax.lax.fori_loop(0, blocks(jnp.where(active, seqlen, zero)), token_block,
                               (jnp.zeros((block_w, tiles.block_d), f32),
                                jnp.zeros((tiles.block_d,), f32)))
    jax.lax.fori_loop(0, blocks(jnp.where(poison, seqlen, zero)), poison_block, 0)
    part = seq * splits + split
    plgpu.store(dw_ref.at[part, offs_w[:, None], cols], jnp.where(poison, jnp.nan, dw),
                mask=jnp.broadcast_to(mask_d[None, :], dw.shape))
    plgpu.store(db_ref.at[part, offs_d], jnp.where(poison, jnp.nan, db), mask=mask_d)
    # The history gradient: window positions -(W-1) .. -1, state columns 0 .. W-2.
    offs_r = jnp.arange(tiles.block_r, dtype=i32)
    in_hist = offs_r < width - 1
    dhist = jnp.where(has_history, dwindow(offs_r - (width - 1))[0], 0.0)
    plgpu.store(dstate_ref.at[slot, offs_r[:, None], cols], dhist.astype(dstate_ref.dtype),
                mask=(in_hist & keep & (split == 0))[:, None] & mask_d[None, :])


def _conv_fn_bwd(layout: ConvLayout, tiles: ConvTiles, pad_slot_id: int, *, x, weight, bias, state,
                 query_start_loc, indices, has_initial_state, dout, dnew):
    """x, dout (T, D); state, dnew (S, L, D). Returns (dx, dweight, dbias, dstate)."""
    dx, dstate = jnp.zeros(x.shape, x.dtype), dnew.astype(state.dtype)
    block_w = conv_bwd_block_w(layout.width)
    splits = tiles.splits
    if layout.num_seqs == 0 or layout.dim == 0 or layout.num_tokens == 0:
        return dx, jnp.zeros(weight.shape, weight.dtype), bias if bias is None else \
            jnp.zeros(bias.shape, bias.dtype), dstate
    kernel = functools.partial(_conv_fn_bwd_kernel, layout=layout, tiles=tiles,
                               pad_slot_id=pad_slot_id, block_w=block_w)
    dx, dw, db, dstate = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(dx.shape, dx.dtype),
                   jax.ShapeDtypeStruct((layout.num_seqs * splits, block_w, layout.dim),
                                        jnp.float32),
                   jax.ShapeDtypeStruct((layout.num_seqs * splits, layout.dim), jnp.float32),
                   jax.ShapeDtypeStruct(dstate.shape, dstate.dtype)),
        grid=(layout.num_seqs, pl.cdiv(layout.dim, tiles.block_d), splits),
        input_output_aliases={0: 0, 1: 3},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=platform.INTERPRET,
        name="causal_conv1d_fn_bwd",
    )(dx, dstate, x, weight, bias, state,
      *map(platform.int32_indices, (query_start_loc, indices, has_initial_state)), dout, dnew)
    dweight = jnp.sum(dw, axis=0)[:layout.width].T.astype(weight.dtype)
    dbias = None if bias is None else jnp.sum(db, axis=0).astype(bias.dtype)
    return dx, dweight, dbias, dstate


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _conv_fn_train(layout, tiles, pad_slot_id, x, weight, bias, state, query_start_loc, indices,
                   has_initial_state):
    """The training form: x (T, D), state (S, L, D) -> (out (T, D), zero
    where no sequence writes; new state)."""
    return _run(layout, tiles, x=x, state=state, out=jnp.zeros(x.shape, x.dtype), weight=weight,
                bias=bias, query_start_loc=query_start_loc, indices=indices,
                pad_slot_id=pad_slot_id, has_initial_state=has_initial_state)


def _conv_fn_train_fwd(layout, tiles, pad_slot_id, *arrays):
    return _conv_fn_train(layout, tiles, pad_slot_id, *arrays), arrays


def _conv_fn_train_bwd(layout, tiles, pad_slot_id, arrays, cotangents):
    x, weight, bias, state, query_start_loc, indices, has_initial_state = arrays
    dout, dnew = cotangents
    dx, dweight, dbias, dstate = _conv_fn_bwd(
        layout, tiles, pad_slot_id, x=x, weight=weight, bias=bias, state=state,
        query_start_loc=query_start_loc, indices=indices, has_initial_state=has_initial_state,
        dout=dout, dnew=dnew)
    return dx, dweight, dbias, dstate, None, None, None


_conv_fn_train.defvjp(_conv_fn_train_fwd, _conv_fn_train_bwd)


def _check_values(function: str, layout: ConvLayout, arrays: dict, validate_indices,
                  pad_slot_id) -> None:
    """The index values, when concrete and not switched off."""
    values = platform.host_index_values(
        validate_indices, **{k: v for k, v in arrays.items() if k in INDEX_ARGS})
    if values is not None:
        check_conv_index_values(function, layout, values, pad_slot_id=pad_slot_id)


def _checked_fn(x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state,
                prefix: dict, *, out, activation, pad_slot_id, block_size_to_align, validate_indices):
    """``causal_conv1d_fn``'s checks (``x`` may be a ShapeDtypeStruct):
    ``(layout, state (S, L, D))``, zero states when ``conv_states`` is None."""
    if conv_states is None:
        conv_states = jnp.zeros(stateless_states_shape(
            x=x, weight=weight, query_start_loc=query_start_loc, cache_indices=cache_indices,
            has_initial_state=has_initial_state, **prefix), x.dtype)
    arrays = dict(x=x, weight=weight, bias=bias, query_start_loc=query_start_loc,
                  has_initial_state=has_initial_state, **prefix)
    layout = check_conv_fn_args(**arrays, conv_states=conv_states, cache_indices=cache_indices,
                                out=out, activation=activation, pad_slot_id=pad_slot_id,
                                block_size_to_align=block_size_to_align)
    _check_values("causal_conv1d_fn", layout, dict(arrays, cache_indices=cache_indices),
                  validate_indices, pad_slot_id)
    return layout, jnp.swapaxes(conv_states, 1, 2)


def causal_conv1d_fn(x, weight, bias=None, conv_states=None, query_start_loc=None,
                     cache_indices=None, has_initial_state=None, activation="silu",
                     pad_slot_id=NULL_BLOCK_ID, block_idx_first_scheduled_token=None,
                     block_idx_last_scheduled_token=None, initial_state_idx=None,
                     num_computed_tokens=None, block_size_to_align=0, *, out=None,
                     validate_indices=None):
    """Prefill over packed sequences: ``x (dim, T)``, ``weight (dim, width)``,
    ``bias (dim,)``, ``conv_states (S, dim, L)`` read at ``cache_indices`` (or
    a block table with prefix caching; ``bridge.spec.conv_contract``).
    Returns ``(out (dim, T), new_conv_states)``; a given ``out`` keeps its
    values in the columns of padding sequences (without one they are 0).
    ``conv_states=None``: no initial states (the new states are ``(num_seqs,
    dim, width - 1)``).

    Differentiable (``jax.custom_vjp``, Pallas backward) in x, weight, bias
    and conv_states, from ``out`` and the new states; not with prefix caching
    or a given ``out`` (refused by name under differentiation).

    Jittable with ``activation``, ``pad_slot_id`` and ``block_size_to_align``
    static. Concrete index values are checked (not with
    ``validate_indices=False``); traced ones follow the contract's unchecked
    rules (skipped, NaN outputs, no stray access).
    """
    prefix = dict(initial_state_idx=initial_state_idx,
                  block_idx_last_scheduled_token=block_idx_last_scheduled_token,
                  block_idx_first_scheduled_token=block_idx_first_scheduled_token,
                  num_computed_tokens=num_computed_tokens)
    layout, state = _checked_fn(x, weight, bias, conv_states, query_start_loc, cache_indices,
                                has_initial_state, prefix, out=out, activation=activation,
                                pad_slot_id=pad_slot_id, block_size_to_align=block_size_to_align,
                                validate_indices=validate_indices)
    tiles, pad_slot_id = conv_tiles(layout), int(pad_slot_id)
    if out is None and all(value is None for value in prefix.values()):
        new_out, new_state = _conv_fn_train(layout, tiles, pad_slot_id, x.T, weight, bias, state,
                                            query_start_loc, cache_indices, has_initial_state)
        return new_out.T, jnp.swapaxes(new_state, 1, 2)

    def run(x, weight, bias, state, out, index_arrays):
        return _run(layout, tiles, x=x, weight=weight, bias=bias, state=state, out=out,
                    pad_slot_id=pad_slot_id, block_size_to_align=int(block_size_to_align),
                    **index_arrays)

    index_arrays = dict(query_start_loc=query_start_loc, indices=cache_indices,
                        has_initial_state=has_initial_state, **prefix)
    # Differentiated: the contract's error (prefix caching, `out`).
    new_out, new_state = platform.inference_only(
        lambda: check_conv_fn_grad(out=out, **prefix), run, x.T, weight, bias, state,
        None if out is None else out.T, index_arrays)
    return new_out.T, jnp.swapaxes(new_state, 1, 2)


def causal_conv1d_fn_columns(source, rows, columns, splits, weight, bias=None, conv_states=None,
                             query_start_loc=None, cache_indices=None, has_initial_state=None,
                             activation="silu", pad_slot_id=NULL_BLOCK_ID,
                             block_idx_first_scheduled_token=None, block_idx_last_scheduled_token=None,
                             initial_state_idx=None, num_computed_tokens=None, block_size_to_align=0,
                             *, validate_indices=None):
    """``causal_conv1d_fn`` of ``x = source[rows[0]:rows[1],
    columns[0]:columns[1]].T`` read in place, its output split at the
    channels ``splits``: returns ``((T, width) per part..., new_conv_states)``.
    JAX only: a Pallas call takes whole arrays, so a sliced ``x`` (a mixer's
    columns of its projection) and slices of the output (x, B and C) would be
    copies. Inference only (refused under differentiation); the other
    arguments as in ``causal_conv1d_fn``."""
    (first_row, end_row), (first_col, end_col) = rows, columns
    if source.ndim != 2 or not (0 <= first_row <= end_row <= source.shape[0]
                                and 0 <= first_col <= end_col <= source.shape[1]):
        raise ValueError(f"causal_conv1d_fn_columns: rows {rows} and columns {columns} must lie in "
                         f"`source` of shape {source.shape}")
    edges = (0, *splits, end_col - first_col)
    if list(edges) != sorted(edges):
        raise ValueError(f"causal_conv1d_fn_columns: `splits` {splits} must rise within "
                         f"[0, {end_col - first_col}]")
    prefix = dict(initial_state_idx=initial_state_idx,
                  block_idx_last_scheduled_token=block_idx_last_scheduled_token,
                  block_idx_first_scheduled_token=block_idx_first_scheduled_token,
                  num_computed_tokens=num_computed_tokens)
    x = jax.ShapeDtypeStruct((end_col - first_col, end_row - first_row), source.dtype)
    layout, state = _checked_fn(x, weight, bias, conv_states, query_start_loc, cache_indices,
                                has_initial_state, prefix, out=None, activation=activation,
                                pad_slot_id=pad_slot_id, block_size_to_align=block_size_to_align,
                                validate_indices=validate_indices)

    def run(source, weight, bias, state, index_arrays):
        return _run(layout, conv_tiles(layout), x=source, weight=weight, bias=bias, state=state, out=None,
                    pad_slot_id=int(pad_slot_id), block_size_to_align=int(block_size_to_align),
                    x_origin=(first_row, first_col), out_columns=tuple(zip(edges[:-1], edges[1:])),
                    **index_arrays)

    index_arrays = dict(query_start_loc=query_start_loc, indices=cache_indices,
                        has_initial_state=has_initial_state, **prefix)
    outs, new_state = platform.inference_only("causal_conv1d_fn_columns", run, source, weight, bias,
                                              state, index_arrays)
    return (*outs, jnp.swapaxes(new_state, 1, 2))


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None,
                         conv_state_indices=None, num_accepted_tokens=None,
                         query_start_loc=None, max_query_len=-1, pad_slot_id=NULL_BLOCK_ID,
                         block_idx_last_scheduled_token=None, initial_state_idx=None, *,
                         out=None, validate_indices=None):
    """Decode, with the arguments of the mirror ``torch_impl.causal_conv1d_update``
    (``x (batch, dim)`` or packed ``(T, dim)``, ``conv_state (S, dim, L)``;
    ``bridge.spec.conv_contract``), functional: returns ``(out,
    new_conv_state)``; ``max_query_len`` is static. ``validate_indices``: as
    in ``causal_conv1d_fn``. Without ``out``, padding entries' rows are 0 (a
    given ``out`` keeps them). Inference only: refused (ValueError naming
    the op) under ``jax.grad`` / ``jax.vjp``.
    """
    arrays = dict(x=x, weight=weight, bias=bias, query_start_loc=query_start_loc,
                  num_accepted_tokens=num_accepted_tokens, initial_state_idx=initial_state_idx,
                  block_idx_last_scheduled_token=block_idx_last_scheduled_token)
    layout = check_conv_update_args(**arrays, conv_state=conv_state,
                                    conv_state_indices=conv_state_indices, out=out,
                                    activation=activation, pad_slot_id=pad_slot_id,
                                    max_query_len=max_query_len)
    _check_values("causal_conv1d_update", layout,
                  dict(arrays, conv_state_indices=conv_state_indices), validate_indices, pad_slot_id)
    tiles = conv_tiles(layout, varlen=query_start_loc is not None, max_query_len=max_query_len)

    def run(state, out, arrays):
        return _run(layout, tiles, **arrays, state=state, out=out, pad_slot_id=int(pad_slot_id))

    new_out, new_state = platform.inference_only(
        "causal_conv1d_update", run, jnp.swapaxes(conv_state, 1, 2), out,
        dict(arrays, indices=conv_state_indices))
    return new_out, jnp.swapaxes(new_state, 1, 2)
