"""Mamba-1's prefill scan ``selective_scan_fn`` as a Pallas kernel (Triton
backend on GPU). The math, shapes, prefix-caching writes and the unchecked
contract: ``bridge.spec.selective_scan_contract``. Mirror:
``torch_impl/selective_scan.py``.

JAX is functional: the call returns ``(out, new_ssm_states)``. ``out`` is
the new value of the buffer vLLM writes in place (``z`` when given, else
``delta``: padding sequences keep its values) and both outputs alias their
inputs (``input_output_aliases``), so under ``jax.jit`` with ``ssm_states``
(and that buffer) donated, the update is in place.

The kernel mirrors the Triton one tile for tile (tiles from
``scan_tiles``): each thread owns one channel (block_d = 32 x num_warps
channels per program) and keeps that channel's dstate row of the state; the
tokens go in tiles of block_t aligned to multiples of block_t, B and C
loaded as a (block_t, block_d, block_n) broadcast (index stride 0 over
channels); exp2 with log2(e) folded into A. Tiles inside a sequence take an
unmasked path (``lax.cond``); those crossing a sequence end or a
prefix-caching block boundary take the masked edge path, which also writes
the boundary states. Lowered for sm_90 (Triton 3.6 on the CPU, from the
Pallas TTIR), its loop has the Triton kernel's instruction mix: no shuffles,
no shared memory, no spills, the same vector loads.

The single long sequence (1 x 16k tokens at dim 5120) gets no more than
dim / block_d programs, each walking all 16k tokens in order: the scan is
sequential over tokens, so ``scan_tiles`` shrinks block_d to 8 to spread
the channels over the multiprocessors (640 one-warp programs, the threads
then also splitting dstate, with shuffles), and the time is set by the
latency of the per-token chain, not by memory: far below the copy bandwidth
in both frameworks (the benchmark's 1 x 16k row). Reaching it needs a chunked scan over tokens (chunk states, then a pass
over chunks, as in the SSD kernels), which neither kernel does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bridge.spec.selective_scan_contract import (
    NULL_BLOCK_ID, ScanLayout, ScanTiles, check_selective_scan_args, check_selective_scan_index_values,
    scan_tiles)
from jax_impl import platform

LOG2_E = 1.4426950408889634


def _pick(tile, at):
    """The row of ``tile`` that the one-hot mask ``at`` selects, over axis 0,
    which each thread holds whole: a sum of the values' integer bits (x + 0
    folds away; a float sum kept one add per value, the conversion's cost
    again)."""
    int_type = jnp.int16 if tile.dtype.itemsize == 2 else jnp.int32
    bits = jax.lax.bitcast_convert_type(tile, int_type)
    picked = jnp.sum(jnp.where(at, bits, 0), axis=0).astype(int_type)
    return jax.lax.bitcast_convert_type(picked, tile.dtype)


def _load(ref, mask):
    """``plgpu.load`` with 0 where ``mask`` is False; unmasked when None."""
    return plgpu.load(ref) if mask is None else plgpu.load(ref, mask=mask, other=0.0)


def _selective_scan_kernel(
        u_ref, delta_ref, A_ref, B_ref, C_ref, D_ref, z_ref, delta_bias_ref, qsl_ref, cache_ref,
        has_init_ref, first_col_ref, last_col_ref, init_col_ref, cu_chunk_ref, last_chunk_ref,
        states_in_ref, out_ref, states_ref, *, layout: ScanLayout, tiles: ScanTiles,
        delta_softplus: bool, null_block_id: int, block_size: int):
    """Grid (cdiv(dim, block_d), num_seqs): one program holds a (block_d,
    dstate) float32 state of one sequence while it walks the sequence's
    tokens, block_t at a time. Index arithmetic is int32 (x64 mode included); table reads are
    clamped into their arrays; a sequence breaking the contract writes no
    state and NaN outputs."""
    i32 = jnp.int32
    zero = jnp.zeros((), i32)
    num_tokens, num_slots = layout.num_tokens, layout.num_slots
    pid_d, seq = pl.program_id(0), pl.program_id(1)
    if qsl_ref is not None:
        bos, eos = qsl_ref[seq], qsl_ref[seq + 1]
        b = zero  # the packed arrays have one (batch) row
    else:
        bos, eos, b = zero, zero + num_tokens, seq
    ok = (bos >= 0) & (bos <= eos) & (eos <= num_tokens)
    first_tok = jnp.clip(bos, 0, num_tokens)
    end_tok = jnp.clip(eos, first_tok, num_tokens)
    seqlen = end_tok - first_tok

    padding = seq < 0  # False, but traced: the Triton lowering cannot invert a constant
    read_slot = write_slot = seq
    if cache_ref is not None:
        if first_col_ref is not None:
            init_col, first_col, last_col = init_col_ref[seq], first_col_ref[seq], last_col_ref[seq]
            cols_ok = ((init_col >= 0) & (init_col < layout.index_columns) & (first_col >= 0)
                       & (first_col <= last_col) & (last_col < layout.index_columns))
            read_slot = cache_ref[seq, jnp.where(cols_ok, init_col, zero)]
            write_slot = cache_ref[seq, jnp.where(cols_ok, last_col, zero)]
            padding = cols_ok & (read_slot == null_block_id)
            ok = ok & cols_ok
        else:
            read_slot = write_slot = cache_ref[seq, 0]
            padding = read_slot == null_block_id
    write_ok = (write_slot >= 0) & (write_slot < num_slots)
    if cache_ref is not None:
        write_ok = write_ok | (write_slot == null_block_id)  # not kept
    ok = ok & (read_slot >= 0) & (read_slot < num_slots) & write_ok

    offset = zero  # of the first scheduled token in its block (APC)
    if first_col_ref is not None:
        if cu_chunk_ref is not None:
            last_chunk = last_chunk_ref[seq]
            first_chunk = jnp.where(seq > 0, last_chunk_ref[jnp.maximum(seq - 1, 0)] + 1, zero)
            chunks_ok = (first_chunk >= 0) & (first_chunk <= last_chunk) & (last_chunk < layout.num_chunks)
            chunk = jnp.where(chunks_ok, first_chunk, zero)
            first_len = cu_chunk_ref[chunk + 1] - cu_chunk_ref[chunk]
            partial = chunks_ok & (last_chunk > first_chunk) & (first_len > 0) & (first_len < block_size)
            offset = jnp.where(partial, block_size - first_len, zero)
            ok = ok & chunks_ok
        boundaries = (offset + jnp.maximum(seqlen, 1) - 1) // block_size
        ok = ok & (last_col == first_col + boundaries)

        def count_bad_slot(col, bad):
            slot = cache_ref[seq, col]
            slot_bad = (slot != null_block_id) & ((slot < 0) | (slot >= num_slots))
            return bad + jnp.where(slot_bad, jnp.ones((), i32), zero)

        ok = ok & (jax.lax.fori_loop(first_col, jnp.where(ok & ~padding, last_col, first_col),
                                     count_bad_slot, zero) == 0)

    # Threads over channels in every tile (the state (block_d, block_n), token
    # tiles (block_t, block_d), B / C (block_t, block_d, block_n)), as in the
    # Triton kernel: each thread keeps its channel's dstate row and a tile's
    # tokens, so the reductions over dstate and the token picks stay inside it.
    offs_d = pid_d * tiles.block_d + jnp.arange(tiles.block_d, dtype=i32)
    offs_n = jnp.arange(tiles.block_n, dtype=i32)
    mask_d, mask_n = offs_d < layout.dim, offs_n < layout.dstate
    state_mask = mask_d[:, None] & mask_n[None, :]
    # The dstate index through a (no-op) min: Triton's axis analysis then sees
    # no contiguity over dstate, so the state and A tiles load with the
    # threads over channels, the layout of every tile of the loop (the Triton
    # kernel leaves its dstate strides unspecialized for this; Pallas's
    # strides are static). Else the state is converted through shared
    # memory at every token.
    rows, cols = offs_d[:, None], jnp.minimum(offs_n, tiles.block_n - 1)[None, :]
    group = (pid_d * tiles.block_d) // layout.channels_per_group

    if has_init_ref is not None:
        load_state = ok & ~padding & (has_init_ref[seq] != 0)
        h = plgpu.load(states_in_ref.at[jnp.where(load_state, read_slot, zero), rows, cols],
                       mask=state_mask & load_state, other=0.0).astype(jnp.float32)
    else:
        h = jnp.zeros((tiles.block_d, tiles.block_n), jnp.float32)
    # exp(dt * A) as exp2(dt * A2): log2(e) folded in once.
    A2 = plgpu.load(A_ref.at[rows, cols], mask=state_mask, other=0.0).astype(jnp.float32) * LOG2_E
    vector = lambda ref: plgpu.load(ref.at[offs_d], mask=mask_d, other=0.0).astype(jnp.float32)  # noqa: E731
    D = None if D_ref is None else vector(D_ref)
    delta_bias = None if delta_bias_ref is None else vector(delta_bias_ref)

    def store_state(slot, keep, h):
        plgpu.store(states_ref.at[jnp.where(keep, slot, zero), rows, cols],
                    h.astype(states_ref.dtype), mask=state_mask & keep)

    offs_t = jnp.arange(tiles.block_t, dtype=i32)
    chans = offs_d[None, :]
    over_d = (offs_d * 0)[None, :, None]  # B, C broadcast over channels (index stride 0)

    def scan_tile(start, h, *, edge: int):
        """One tile of block_t tokens from ``start``: the state ``h`` carried
        through them, the outputs stored; returns ``h``. ``edge`` 0: the tile
        lies inside the sequence (no masks over tokens, and none at all when
        ``tiles.even``); 1: it may cross an end of the sequence (masked); 2:
        also a prefix-caching block boundary may lie in it (states written
        there)."""
        toks = start + offs_t
        if edge:
            valid = (toks >= first_tok) & (toks < end_tok)
        else:
            valid = offs_t < tiles.block_t
        if edge == 0 and tiles.even:  # no masks: unpredicated vector loads
            mask_td = mask_tdn = None
        else:
            mask_td = valid[:, None] & mask_d[None, :]
            mask_tdn = mask_td[:, :, None] & mask_n[None, None, :]

        def channels(ref):  # a (block_t, block_d) tile, float32
            return _load(ref.at[b, chans, toks[:, None]], mask_td).astype(jnp.float32)
        u, dt = channels(u_ref), channels(delta_ref)
        if delta_bias is not None:
            dt = dt + delta_bias[None, :]
        if delta_softplus:
            dt = jnp.where(dt <= 20.0, jnp.log(1.0 + jnp.exp(dt)), dt)
        if edge:
            dt = jnp.where(valid[:, None], dt, 0.0)  # outside the sequence: h unchanged
        du = dt * u
        # (block_t, block_d, block_n), the same values for every channel: each
        # thread reads the whole tile (broadcast loads), laid out like the state.
        tile_bc = lambda ref: _load(  # noqa: E731
            ref.at[b, group + over_d, offs_n[None, None, :], toks[:, None, None]], mask_tdn)
        B, C = tile_bc(B_ref), tile_bc(C_ref)
        y = jnp.zeros((tiles.block_t, tiles.block_d), jnp.float32)
        for j in range(tiles.block_t):
            at_j = offs_t == j
            dt_j = _pick(dt, at_j[:, None])
            du_j = _pick(du, at_j[:, None])
            B_j = _pick(B, at_j[:, None, None]).astype(jnp.float32)
            C_j = _pick(C, at_j[:, None, None]).astype(jnp.float32)
            h = jnp.exp2(dt_j[:, None] * A2) * h + du_j[:, None] * B_j
            y = jnp.where(at_j[:, None], jnp.sum(C_j * h, axis=1)[None, :], y)
            if edge == 2:
                # The state after a token that completes a block (not the last token).
                i = start + j - first_tok
                boundary = ok & (i >= 0) & ((offset + i + 1) % block_size == 0) & (start + j + 1 < end_tok)

                @pl.when(boundary)
                def _():
                    slot = cache_ref[seq, first_col + (offset + i) // block_size]
                    store_state(slot, slot != null_block_id, h)
        if D is not None:
            y = y + D[None, :] * u
        if z_ref is not None:
            z = channels(z_ref)
            y = y * z * jax.nn.sigmoid(z)
        y = jnp.where(ok, y, jnp.nan)
        plgpu.store(out_ref.at[b, chans, toks[:, None]], y.astype(out_ref.dtype), mask=mask_td)
        return h

    # Tokens in tiles of block_t starting at multiples of block_t (aligned
    # vector loads). Tiles inside the sequence run unmasked over tokens; the
    # first and last are masked at the sequence's ends.
    first_tile = first_tok // tiles.block_t * tiles.block_t

    def token_tile(k, h):
        start = first_tile + k * tiles.block_t
        inside = (start >= first_tok) & (start + tiles.block_t <= end_tok)
        if first_col_ref is not None:  # a block boundary in the tile takes the slow path too
            i = start - first_tok
            inside = inside & ((offset + i + tiles.block_t) // block_size == (offset + i) // block_size)
        return jax.lax.cond(inside, functools.partial(scan_tile, start, edge=0),
                            functools.partial(scan_tile, start, edge=1 + (first_col_ref is not None)), h)

    run_end = jnp.where(padding, first_tile, end_tok)
    h = jax.lax.fori_loop(0, (run_end - first_tile + tiles.block_t - 1) // tiles.block_t, token_tile, h)
    keep = ok & ~padding & (seqlen > 0)
    if cache_ref is not None:
        keep = keep & (write_slot != null_block_id)
    store_state(write_slot, keep, h)


def _refuse_grad():
    raise ValueError("selective_scan_fn is an inference-only (prefill) op: it has no gradient; call it "
                     "outside jax.grad / jax.vjp")


def selective_scan_fn(u, ssm_states, delta, A, B, C, D=None, z=None, delta_bias=None,
                      delta_softplus=False, query_start_loc=None, cache_indices=None,
                      has_initial_state=None, null_block_id=NULL_BLOCK_ID, block_size=1024,
                      block_idx_first_scheduled_token=None, block_idx_last_scheduled_token=None,
                      initial_state_idx=None, cu_chunk_seqlen=None, last_chunk_indices=None, *,
                      validate_indices=None):
    """Mamba-1 prefill: ``u, delta, z (dim, T)`` packed by ``query_start_loc``
    (or ``(batch, dim, seqlen)``), ``B, C (ngroups, dstate, T)``, the cache
    ``ssm_states (slots, dim, dstate)`` read and written at ``cache_indices``
    (a block table with prefix caching). Returns ``(out, new_ssm_states)``,
    ``out`` shaped like ``delta`` (see the module docstring).

    Jittable with ``delta_softplus``, ``null_block_id`` and ``block_size``
    static. Concrete index values are checked (``validate_indices=False``:
    not); traced ones follow the unchecked contract of
    ``bridge.spec.selective_scan_contract`` (skipped, NaN outputs).
    Inference only: refused (ValueError naming the op) under ``jax.grad`` /
    ``jax.vjp``.
    """
    index_args = dict(query_start_loc=query_start_loc, cache_indices=cache_indices,
                      has_initial_state=has_initial_state,
                      block_idx_first_scheduled_token=block_idx_first_scheduled_token,
                      block_idx_last_scheduled_token=block_idx_last_scheduled_token,
                      initial_state_idx=initial_state_idx, cu_chunk_seqlen=cu_chunk_seqlen,
                      last_chunk_indices=last_chunk_indices)
    layout = check_selective_scan_args(
        u=u, ssm_states=ssm_states, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
        **index_args, null_block_id=null_block_id, block_size=block_size,
        delta_softplus=delta_softplus)
    host = platform.host_index_values(validate_indices, **index_args)
    if host is not None:
        check_selective_scan_index_values(layout, null_block_id=int(null_block_id),
                                          block_size=int(block_size), **host)
    target = delta if z is None else z
    if layout.num_seqs == 0 or layout.num_tokens == 0 or layout.dim == 0:
        return target, ssm_states

    # Everything with a leading batch axis (one row for the packed form) and
    # B, C with a group axis; the state as (slots, dim, dstate).
    lead = (lambda a: a[None]) if layout.varlen else (lambda a: a)
    grouped = lambda a: a if a.ndim == (3 if layout.varlen else 4) else jnp.expand_dims(  # noqa: E731
        a, -3)
    states = ssm_states.reshape(layout.num_slots, layout.dim, layout.dstate)
    operands = [
        lead(u), lead(delta), A, lead(grouped(B)), lead(grouped(C)), D,
        None if z is None else lead(z), delta_bias,
        *map(platform.int32_indices, (query_start_loc,
                      None if cache_indices is None else cache_indices.reshape(len(cache_indices), -1),
                      has_initial_state, block_idx_first_scheduled_token,
                      block_idx_last_scheduled_token, initial_state_idx, cu_chunk_seqlen,
                      last_chunk_indices)),
        states]
    present = [i for i, a in enumerate(operands) if a is not None]  # flat operand numbers
    out_operand = 6 if z is not None else 1
    aliases = {present.index(out_operand): 0, present.index(len(operands) - 1): 1}
    tiles = scan_tiles(layout)
    kernel = functools.partial(
        _selective_scan_kernel, layout=layout, tiles=tiles, delta_softplus=bool(delta_softplus),
        null_block_id=int(null_block_id), block_size=int(block_size))
    launch = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(operands[out_operand].shape, target.dtype),
                   jax.ShapeDtypeStruct(states.shape, states.dtype)),
        grid=(pl.cdiv(layout.dim, tiles.block_d), layout.num_seqs),
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=1),
        interpret=platform.INTERPRET,
        name="selective_scan",
    )
    out, new_states = platform.inference_only(  # jax.grad through it: a clear error
        _refuse_grad, platform.eager_interpreted(launch, operands), *operands)
    return out.reshape(target.shape), new_states.reshape(ssm_states.shape)
