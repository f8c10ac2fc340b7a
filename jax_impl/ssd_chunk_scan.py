"""Chunked scan, stage 5 (chunk_scan), in Pallas (Triton backend on GPU):
every token's output from its chunk's start state and the chunk's earlier
tokens. The formula: as in the mirror, ``torch_impl/ssd_chunk_scan.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bridge.spec.launch_config import clip_block
from jax_impl.ssd_chunk_state import chunk_state_sum
from jax_impl.ssd_common import (
    chunk_bounds, launch_config, load_rows, pallas_call, sequence_of, start_state, tile_call,
    tile_dot, tile_origin, token_tile)


def _chunk_scan_kernel(CB_ref, x_ref, dt_out_ref, dA_cumsum_ref, C_ref, end_states_ref,
                       cu_chunk_ref, seq_idx_ref, D_ref, z_ref, initial_states_ref, _out_in_ref,
                       out_ref, y_ref=None, *, num_tokens, num_seqs, heads_per_group, headdim, dstate,
                       chunk_size, D_per_head, block_size_m, block_size_n, block_size_k,
                       block_size_dstate):
    """Grid (cdiv(L, BM) * cdiv(P, BN), K, H): one (BM, BN) tile of one
    chunk's outputs for one head (the tiles of a chunk run next to each
    other, sharing its C B^T and states in L2). ``_out_in_ref`` is the given
    ``out`` (aliased to ``out_ref``) or None; ``y_ref``, when given, gets the
    output before the z gate (saved for the backward)."""
    chunk, head = pl.program_id(1), pl.program_id(2)
    m0, n0 = tile_origin(pl.program_id(0), headdim, block_size_m, block_size_n)
    group = head // heads_per_group
    start, length, _ = chunk_bounds(cu_chunk_ref, chunk, num_tokens, chunk_size)

    @pl.when(m0 < length)  # tiles past a short chunk's end have no tokens
    def _():
        offs_m = m0 + jnp.arange(block_size_m)
        mask_m = offs_m < length
        mask_n = n0 + jnp.arange(block_size_n) < headdim
        tile_mask = mask_m[:, None] & mask_n[None, :]
        rows, cols = pl.ds(start + m0, block_size_m), pl.ds(n0, block_size_n)
        dA_m = dA_cumsum_ref[head, chunk, pl.ds(m0, block_size_m)]

        # The start state's part: C (BM, N) @ start^T (N, BN). The start state
        # is the previous chunk's end state within a sequence, else the
        # sequence's initial state (or 0). Loads masked off move no memory.
        seq, row, seq_ok = sequence_of(seq_idx_ref, chunk, num_seqs)
        starts_seq = (chunk == 0) | (seq_idx_ref[jnp.maximum(chunk - 1, 0)] != seq)
        mask_d = jnp.arange(block_size_dstate) < dstate
        state_mask = mask_n[:, None] & mask_d[None, :]
        state_cols = pl.ds(jnp.int32(0), block_size_dstate)
        start_state = plgpu.load(
            end_states_ref.at[jnp.maximum(chunk - 1, 0), head, cols, state_cols],
            mask=state_mask & ~starts_seq, other=0.0).astype(jnp.float32)  # (BN, N)
        initial = jnp.zeros_like(start_state)
        if initial_states_ref is not None:
            initial = plgpu.load(initial_states_ref.at[row, head, cols, state_cols],
                                 mask=state_mask & starts_seq & seq_ok, other=0.0).astype(jnp.float32)
        start_state = jnp.where(starts_seq, jnp.where(seq_ok, initial, jnp.nan), start_state)
        C = plgpu.load(C_ref.at[rows, group, state_cols],
                       mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (BM, N)
        acc = tile_dot(C, start_state.astype(C.dtype).T) * jnp.exp(dA_m)[:, None]

        # The chunk's own tokens j <= i, only up to the row tile's last token.
        def causal_block(k, acc):
            k0 = k * block_size_k
            offs_k = k0 + jnp.arange(block_size_k)
            CB = CB_ref[chunk, group, pl.ds(m0, block_size_m), pl.ds(k0, block_size_k)]
            dA_k = dA_cumsum_ref[head, chunk, pl.ds(k0, block_size_k)]
            dt_k = dt_out_ref[head, chunk, pl.ds(k0, block_size_k)]
            # where, not a product with a 0/1 mask: above the diagonal the
            # exponent may overflow and CB may be unset.
            weight = jnp.where(offs_k[None, :] <= offs_m[:, None],
                               CB * jnp.exp(dA_m[:, None] - dA_k[None, :]) * dt_k[None, :], 0.0)
            x = plgpu.load(x_ref.at[pl.ds(start + k0, block_size_k), head, cols],
                           mask=(offs_k < length)[:, None] & mask_n[None, :], other=0.0)
            return acc + tile_dot(weight.astype(x.dtype), x)

        causal_end = jnp.minimum(m0 + block_size_m, length)
        acc = jax.lax.fori_loop(0, pl.cdiv(causal_end, block_size_k), causal_block, acc)

        if D_ref is not None:
            x = plgpu.load(x_ref.at[rows, head, cols], mask=tile_mask, other=0.0)
            if D_per_head:
                D = D_ref[head].astype(jnp.float32)
            else:
                D = plgpu.load(D_ref.at[head, cols], mask=mask_n, other=0.0).astype(jnp.float32)[None, :]
            acc = acc + x.astype(jnp.float32) * D
        if y_ref is not None:
            plgpu.store(y_ref.at[rows, head, cols], acc.astype(y_ref.dtype), mask=tile_mask)
        if z_ref is not None:
            z = plgpu.load(z_ref.at[rows, head, cols], mask=tile_mask, other=0.0).astype(jnp.float32)
            acc = acc * z * jax.nn.sigmoid(z)
        plgpu.store(out_ref.at[rows, head, cols], acc.astype(out_ref.dtype), mask=tile_mask)


def chunk_scan(CB, x, dt_out, dA_cumsum, C, end_states, cu_chunk_seqlens, seq_idx, num_seqs: int,
               D=None, z=None, initial_states=None, out=None, return_y=False):
    """CB (K, G, L, L), x (T, H, P), dt_out / dA_cumsum (H, K, L), C (T, G, N),
    end_states (K, H, P, N), seq_idx (K,) in [0, num_seqs), D (H,) or (H, P),
    z (T, H, P), initial_states (Q, H, P, N) -> out (T, H, P) in ``out``'s
    dtype (x's when not given). A given ``out`` is written in place when
    donated under jit (``input_output_aliases``). With ``return_y``:
    ``(out, y)``, y the output before the z gate in x's dtype."""
    num_tokens, nheads, headdim = x.shape
    ngroups, dstate = C.shape[1:]
    num_chunks, chunk_size = dA_cumsum.shape[1:]
    operands = (CB, x, dt_out, dA_cumsum, C, end_states, cu_chunk_seqlens, seq_idx, D, z,
                initial_states, out)
    out_shape = jax.ShapeDtypeStruct(x.shape, x.dtype if out is None else out.dtype)
    return tile_call(
        "chunk_scan", _chunk_scan_kernel, chunk_size, headdim, chunk_size,
        lambda tiles: (tiles, num_chunks, nheads),
        dict(num_tokens=num_tokens, num_seqs=num_seqs, heads_per_group=nheads // ngroups,
             headdim=headdim, dstate=dstate, chunk_size=chunk_size,
             D_per_head=D is not None and D.ndim == 1, block_size_dstate=clip_block(dstate)),
        out_shape=((out_shape, jax.ShapeDtypeStruct(x.shape, x.dtype)) if return_y else out_shape),
        # Aliases index the flattened operands, where an absent (None) one takes no place.
        input_output_aliases={} if out is None else {sum(a is not None for a in operands) - 1: 0},
    )(*operands)


# The backward (issue 12). The math and the stage names: as in the mirror,
# ``torch_impl/ssd_chunk_scan.py``; dy is the gradient of the output before
# the z gate, G_c the gradient of chunk c's end state (state_passing_bwd).


def chunk_scan_bwd_dstates(dy, C, dA_cumsum, cu_chunk_seqlens):
    """dy (T, H, P) (the gradient before the z gate, in the inputs' dtype),
    C (T, G, N), dA_cumsum (H, K, L) -> the gradient of every chunk's start
    state from the chunk's outputs, sum_i exp(a_i) dy_i (outer) C_i,
    (K, H, P, N) float32 (stage 2's kernel without dt)."""
    return chunk_state_sum("chunk_scan_bwd_dstates", dy, C, None, dA_cumsum, cu_chunk_seqlens,
                           C.dtype)


def _bwd_block(cu_chunk_ref, num_tokens, heads_per_group, heads_per_program, headdim, dstate,
               chunk_size, block_size_m, block_size_p, block_size_dstate):
    """What a chunk_scan_bwd program of grid (K, G * splits, cdiv(L, BM))
    covers: ``(chunk, pid_h, group, first_head, start, length, offs, mask,
    mask_p, mask_d, rows, positions)``: its chunk's token range, the first
    of the group's ``heads_per_program`` heads it walks, its (BM,) tile of
    positions (offsets, mask, token rows, position slice) and the masks of
    headdim and dstate."""
    chunk, pid_h = pl.program_id(0), pl.program_id(1)
    splits = heads_per_group // heads_per_program
    group = pid_h // splits
    first_head = group * heads_per_group + (pid_h % splits) * heads_per_program
    start, length, _ = chunk_bounds(cu_chunk_ref, chunk, num_tokens, chunk_size)
    m0 = pl.program_id(2) * block_size_m
    offs = m0 + jnp.arange(block_size_m)
    return (chunk, pid_h, group, first_head, start, length, offs, offs < length,
            jnp.arange(block_size_p) < headdim, jnp.arange(block_size_dstate) < dstate,
            pl.ds(start + m0, block_size_m), pl.ds(m0, block_size_m))


def _chunk_scan_bwd_dx_kernel(x_ref, dy_ref, dt_out_ref, dA_cumsum_ref, B_ref, C_ref, dend_ref,
                              end_states_ref, initial_states_ref, cu_chunk_ref, seq_idx_ref, D_ref,
                              dx_ref, ddt_ref, da_ref, da_last_ref, dB_ref, *, num_tokens,
                              num_seqs, heads_per_group, heads_per_program, headdim, dstate,
                              chunk_size, D_per_head, block_size_m, block_size_k, block_size_p,
                              block_size_dstate):
    """Grid (K, G * splits, cdiv(L, BM)): the tokens j of one (BM,) tile of a
    chunk, for ``heads_per_program`` heads of one group (their dB summed in
    registers): dx, ddt, dB and the decay gradients indexed by j, the chunk's
    later tokens i >= j walked in (BK,) tiles with C_i B_j^T recomputed."""
    (chunk, pid_h, group, first_head, start, length, offs_j, mask_j, mask_p, mask_d, rows,
     positions) = _bwd_block(cu_chunk_ref, num_tokens, heads_per_group, heads_per_program, headdim,
                             dstate, chunk_size, block_size_m, block_size_p, block_size_dstate)
    j0 = pl.program_id(2) * block_size_m
    p_cols, d_cols = pl.ds(jnp.int32(0), block_size_p), pl.ds(jnp.int32(0), block_size_dstate)
    B = load_rows(B_ref, rows, group, d_cols, mask_j, mask_d)  # (BM, N)
    state_mask = mask_p[:, None] & mask_d[None, :]

    def head_step(h, dB_acc):
        head = first_head + h
        x = load_rows(x_ref, rows, head, p_cols, mask_j, mask_p)  # (BM, P)
        dt_j = dt_out_ref[head, chunk, positions]
        a_j = dA_cumsum_ref[head, chunk, positions]
        a_last = dA_cumsum_ref[head, chunk, jnp.int32(chunk_size - 1)]

        def later_block(k, carry):
            dx_acc, dB_acc, colsum = carry
            i0, offs_i, mask_i, tokens = token_tile(k, start, length, block_size_k)
            C = load_rows(C_ref, tokens, group, d_cols, mask_i, mask_d)  # (BK, N)
            dy = load_rows(dy_ref, tokens, head, p_cols, mask_i, mask_p)  # (BK, P)
            a_i = dA_cumsum_ref[head, chunk, pl.ds(i0, block_size_k)]
            causal = (offs_i[:, None] >= offs_j[None, :]) & mask_i[:, None] & mask_j[None, :]
            # where, not a 0/1 product: above the diagonal the exponent may overflow.
            decay = jnp.where(causal, jnp.exp(a_i[:, None] - a_j[None, :]), 0.0)  # (BK, BM)
            CB = tile_dot(C, B.T)
            dyx = tile_dot(dy, x.T)  # dy_i . x_j
            weight = CB * decay
            dxB = decay * dt_j[None, :] * dyx
            dx_acc = dx_acc + tile_dot(weight.T.astype(dy.dtype), dy)
            dB_acc = dB_acc + tile_dot(dxB.T.astype(C.dtype), C)
            colsum = colsum + jnp.sum(CB * dxB, axis=0)
            return dx_acc, dB_acc, colsum

        # dB accumulates over the group's heads in one register tile.
        carry = (jnp.zeros((block_size_m, block_size_p), jnp.float32), dB_acc,
                 jnp.zeros((block_size_m,), jnp.float32))
        dx_acc, dB_acc, colsum = jax.lax.fori_loop(
            j0 // block_size_k, pl.cdiv(length, block_size_k), later_block, carry)

        # The end state's part: G_c B_j and G_c^T x_j, scaled by exp(a_last - a_j).
        dend = plgpu.load(dend_ref.at[chunk, head, p_cols, d_cols], mask=state_mask,
                          other=0.0)  # (P, N)
        to_end = jnp.where(mask_j, jnp.exp(a_last - a_j), 0.0)
        GB = tile_dot(B, dend.astype(B.dtype).T)  # (BM, P)
        inner = dx_acc + to_end[:, None] * GB
        dx = dt_j[:, None] * inner
        if D_ref is not None:
            dy_j = load_rows(dy_ref, rows, head, p_cols, mask_j, mask_p).astype(jnp.float32)
            if D_per_head:
                D = D_ref[head].astype(jnp.float32)
            else:
                D = plgpu.load(D_ref.at[head, p_cols], mask=mask_p, other=0.0).astype(jnp.float32)[None, :]
            dx = dx + D * dy_j
        x32 = x.astype(jnp.float32)
        ddt = jnp.sum(x32 * inner, axis=1)
        dB_acc = dB_acc + (to_end * dt_j)[:, None] * tile_dot(x, dend.astype(x.dtype))
        v = to_end * dt_j * jnp.sum(x32 * GB, axis=1)
        # d a_last: the v terms and, once per chunk (the tile holding token 0),
        # the start state's exp(a_last) <G_c, S_prev>.
        first_tile = j0 == 0
        start_tile = start_state(end_states_ref, initial_states_ref, seq_idx_ref, chunk, head,
                                 p_cols, d_cols, state_mask & first_tile, num_seqs)
        carried = jnp.exp(a_last) * jnp.sum(jnp.where(state_mask, dend * start_tile, 0.0))
        da_last = v + jnp.where((offs_j == 0) & first_tile, carried, 0.0)

        plgpu.store(dx_ref.at[rows, head, p_cols], dx.astype(dx_ref.dtype),
                    mask=mask_j[:, None] & mask_p[None, :])
        ddt_ref[head, chunk, positions] = ddt
        da_ref[head, chunk, positions] = -colsum - v
        da_last_ref[head, chunk, positions] = da_last
        return dB_acc

    dB = jax.lax.fori_loop(0, heads_per_program, head_step,
                           jnp.zeros((block_size_m, block_size_dstate), jnp.float32))
    plgpu.store(dB_ref.at[rows, pid_h, d_cols], dB, mask=mask_j[:, None] & mask_d[None, :])


def _chunk_scan_bwd_dc_kernel(x_ref, dy_ref, dt_out_ref, dA_cumsum_ref, B_ref, C_ref,
                              end_states_ref, initial_states_ref, cu_chunk_ref, seq_idx_ref,
                              da_ref, dC_ref, *, num_tokens, num_seqs, heads_per_group,
                              heads_per_program, headdim, dstate, chunk_size, block_size_m,
                              block_size_k, block_size_p, block_size_dstate):
    """Grid (K, G * splits, cdiv(L, BM)): the tokens i of one (BM,) tile of a
    chunk, for ``heads_per_program`` heads of one group (their dC summed in
    registers): dC and the decay gradient indexed by i, the chunk's earlier
    tokens j <= i walked in (BK,) tiles with C_i B_j^T recomputed."""
    (chunk, pid_h, group, first_head, start, length, offs_i, mask_i, mask_p, mask_d, rows,
     positions) = _bwd_block(cu_chunk_ref, num_tokens, heads_per_group, heads_per_program, headdim,
                             dstate, chunk_size, block_size_m, block_size_p, block_size_dstate)
    i0 = pl.program_id(2) * block_size_m
    state_mask = mask_p[:, None] & mask_d[None, :]
    p_cols, d_cols = pl.ds(jnp.int32(0), block_size_p), pl.ds(jnp.int32(0), block_size_dstate)
    C = load_rows(C_ref, rows, group, d_cols, mask_i, mask_d)  # (BM, N)

    def head_step(h, dC_acc):
        head = first_head + h
        dy = load_rows(dy_ref, rows, head, p_cols, mask_i, mask_p)  # (BM, P)
        a_i = dA_cumsum_ref[head, chunk, positions]

        def earlier_block(k, carry):
            dC_acc, rowsum = carry
            j0, offs_j, mask_j, tokens = token_tile(k, start, length, block_size_k)
            B = load_rows(B_ref, tokens, group, d_cols, mask_j, mask_d)  # (BK, N)
            x = load_rows(x_ref, tokens, head, p_cols, mask_j, mask_p)  # (BK, P)
            a_j = dA_cumsum_ref[head, chunk, pl.ds(j0, block_size_k)]
            dt_j = dt_out_ref[head, chunk, pl.ds(j0, block_size_k)]
            causal = (offs_j[None, :] <= offs_i[:, None]) & mask_i[:, None] & mask_j[None, :]
            decay = jnp.where(causal, jnp.exp(a_i[:, None] - a_j[None, :]), 0.0)  # (BM, BK)
            CB = tile_dot(C, B.T)
            dxB = decay * dt_j[None, :] * tile_dot(dy, x.T)
            dC_acc = dC_acc + tile_dot(dxB.astype(B.dtype), B)
            rowsum = rowsum + jnp.sum(CB * dxB, axis=1)
            return dC_acc, rowsum

        # dC accumulates over the group's heads in one register tile.
        carry = (dC_acc, jnp.zeros((block_size_m,), jnp.float32))
        causal_end = jnp.minimum(i0 + block_size_m, length)
        dC_acc, rowsum = jax.lax.fori_loop(0, pl.cdiv(causal_end, block_size_k), earlier_block,
                                            carry)
        # The start state's part: exp(a_i) dy_i S_prev (its decay term: . C_i).
        start_tile = start_state(end_states_ref, initial_states_ref, seq_idx_ref, chunk, head,
                                 p_cols, d_cols, state_mask, num_seqs)
        from_start = jnp.where(mask_i, jnp.exp(a_i), 0.0)[:, None] * tile_dot(
            dy, start_tile.astype(dy.dtype))  # (BM, N)
        da = rowsum + jnp.sum(from_start * C.astype(jnp.float32), axis=1)
        da_ref[head, chunk, positions] = da
        return dC_acc + from_start

    dC = jax.lax.fori_loop(0, heads_per_program, head_step,
                           jnp.zeros((block_size_m, block_size_dstate), jnp.float32))
    plgpu.store(dC_ref.at[rows, pid_h, d_cols], dC, mask=mask_i[:, None] & mask_d[None, :])


# chunk_scan_bwd's programs to aim for: 4 per SM of an H200.
TARGET_PROGRAMS = 4 * 132


def heads_per_program(num_chunks: int, nheads: int, ngroups: int, num_tiles: int) -> int:
    """How many of a group's heads one chunk_scan_bwd program walks (their dB
    and dC summed in registers): the largest divisor of the heads per group
    that still leaves about ``TARGET_PROGRAMS`` programs, so that the float32
    partials over head splits stay small."""
    heads_per_group = nheads // ngroups
    want = max(1, (num_chunks * nheads * num_tiles) // TARGET_PROGRAMS)
    return max(d for d in range(1, heads_per_group + 1) if heads_per_group % d == 0 and d <= want)


def chunk_scan_bwd(x, dy, dt_out, dA_cumsum, B, C, dend_states, end_states, cu_chunk_seqlens,
                   seq_idx, num_seqs: int, D=None, initial_states=None):
    """The gradients of the chunk-local part of the scan. x, dy (T, H, P)
    (dy before the z gate, x's dtype), dt_out / dA_cumsum (H, K, L), B, C
    (T, G, N), dend_states (K, H, P, N) float32 (G_c, from
    state_passing_bwd), end_states (K, H, P, N) and initial_states (the
    forward's start states) -> ``(dx (T, H, P) x's dtype, ddt (H, K, L),
    da (H, K, L), da_last (H, K, L), dB (T, G, N), dC (T, G, N))``, float32
    but dx: ``ddt`` the direct gradient of dt_out; ``da`` of dA_cumsum per
    position and ``da_last`` the per-token parts of the gradient of the
    chunk's last dA_cumsum (chunk_cumsum_bwd sums them; positions past a
    chunk's end unset in all three)."""
    num_tokens, nheads, headdim = x.shape
    ngroups, dstate = B.shape[1:]
    _, num_chunks, chunk_size = dA_cumsum.shape
    heads_per_group = nheads // ngroups

    def launch(stage):
        """(config, statics, grid, splits) of one of the two kernels: stage
        chunk_scan_bwd is two launches, configs "chunk_scan_bwd" (dx, dB)
        and "chunk_scan_bwd_dC" (dC), as in the Triton mirror."""
        config = launch_config(stage)
        block_size_m = clip_block(chunk_size, config.BLOCK_SIZE_M)
        num_tiles = pl.cdiv(chunk_size, block_size_m)
        per_program = heads_per_program(num_chunks, nheads, ngroups, num_tiles)
        statics = dict(num_tokens=num_tokens, num_seqs=num_seqs, heads_per_group=heads_per_group,
                       heads_per_program=per_program, headdim=headdim, dstate=dstate,
                       chunk_size=chunk_size, block_size_m=block_size_m,
                       block_size_k=clip_block(chunk_size, config.BLOCK_SIZE_K),
                       block_size_p=clip_block(headdim), block_size_dstate=clip_block(dstate))
        splits = heads_per_group // per_program
        return config, statics, (num_chunks, ngroups * splits, num_tiles), splits

    per_position = jax.ShapeDtypeStruct((nheads, num_chunks, chunk_size), jnp.float32)
    partial = lambda splits: jax.ShapeDtypeStruct(  # noqa: E731
        (num_tokens, ngroups * splits, dstate), jnp.float32)
    reduce = lambda d, splits: d.reshape(num_tokens, ngroups, splits, dstate).sum(axis=2)  # noqa: E731

    config, statics, grid, splits_b = launch("chunk_scan_bwd")
    dx, ddt, da_j, da_last, dB = pallas_call(
        functools.partial(_chunk_scan_bwd_dx_kernel, D_per_head=D is not None and D.ndim == 1,
                          **statics),
        config,
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype), per_position, per_position,
                   per_position, partial(splits_b)),
        grid=grid, name="ssd_chunk_scan_bwd_dx",
    )(x, dy, dt_out, dA_cumsum, B, C, dend_states, end_states, initial_states, cu_chunk_seqlens,
      seq_idx, D)
    config, statics, grid, splits_c = launch("chunk_scan_bwd_dC")
    da_i, dC = pallas_call(
        functools.partial(_chunk_scan_bwd_dc_kernel, **statics), config,
        out_shape=(per_position, partial(splits_c)),
        grid=grid, name="ssd_chunk_scan_bwd_dc",
    )(x, dy, dt_out, dA_cumsum, B, C, end_states, initial_states, cu_chunk_seqlens, seq_idx)
    return dx, ddt, da_j + da_i, da_last, reduce(dB, splits_b), reduce(dC, splits_c)
