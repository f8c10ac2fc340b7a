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
from bridge.spec.ssd_launch_config import tile_sizes
from jax_impl.ssd_common import (
    chunk_bounds, launch_config, pallas_call, sequence_of, tile_dot, tile_origin)


def _chunk_scan_kernel(CB_ref, x_ref, dt_out_ref, dA_cumsum_ref, C_ref, end_states_ref,
                       cu_chunk_ref, seq_idx_ref, D_ref, z_ref, initial_states_ref, _out_in_ref,
                       out_ref, *, num_tokens, num_seqs, heads_per_group, headdim, dstate,
                       chunk_size, D_per_head, block_size_m, block_size_n, block_size_k,
                       block_size_dstate):
    """Grid (cdiv(L, BM) * cdiv(P, BN), K, H): one (BM, BN) tile of one
    chunk's outputs for one head (the tiles of a chunk run next to each
    other, sharing its C B^T and states in L2). ``_out_in_ref`` is the given
    ``out`` (aliased to ``out_ref``) or None."""
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
        if z_ref is not None:
            z = plgpu.load(z_ref.at[rows, head, cols], mask=tile_mask, other=0.0).astype(jnp.float32)
            acc = acc * z * jax.nn.sigmoid(z)
        plgpu.store(out_ref.at[rows, head, cols], acc.astype(out_ref.dtype), mask=tile_mask)


def chunk_scan(CB, x, dt_out, dA_cumsum, C, end_states, cu_chunk_seqlens, seq_idx, num_seqs: int,
               D=None, z=None, initial_states=None, out=None):
    """CB (K, G, L, L), x (T, H, P), dt_out / dA_cumsum (H, K, L), C (T, G, N),
    end_states (K, H, P, N), seq_idx (K,) in [0, num_seqs), D (H,) or (H, P),
    z (T, H, P), initial_states (Q, H, P, N) -> out (T, H, P) in ``out``'s
    dtype (x's when not given). A given ``out`` is written in place when
    donated under jit (``input_output_aliases``)."""
    num_tokens, nheads, headdim = x.shape
    ngroups, dstate = C.shape[1:]
    num_chunks, chunk_size = dA_cumsum.shape[1:]
    config = launch_config("chunk_scan")
    block_size_m, block_size_n, num_tiles = tile_sizes(config, chunk_size, headdim)
    kernel = functools.partial(
        _chunk_scan_kernel, num_tokens=num_tokens, num_seqs=num_seqs,
        heads_per_group=nheads // ngroups, headdim=headdim, dstate=dstate, chunk_size=chunk_size,
        D_per_head=D is not None and D.ndim == 1, block_size_m=block_size_m,
        block_size_n=block_size_n, block_size_k=clip_block(chunk_size, config.BLOCK_SIZE_K),
        block_size_dstate=clip_block(dstate))
    operands = (CB, x, dt_out, dA_cumsum, C, end_states, cu_chunk_seqlens, seq_idx, D, z,
                initial_states, out)
    return pallas_call(
        kernel, config,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype if out is None else out.dtype),
        grid=(num_tiles, num_chunks, nheads),
        # Aliases index the flattened operands, where an absent (None) one takes no place.
        input_output_aliases={} if out is None else {sum(a is not None for a in operands) - 1: 0},
        name="ssd_chunk_scan",
    )(*operands)
