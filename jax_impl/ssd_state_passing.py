"""Chunked scan, stage 3 (state_passing), in Pallas (Triton backend on
GPU): carry the state across the chunks of each sequence. The formulas and
the rules for out-of-range ``seq_idx``: as in the mirror,
``torch_impl/ssd_state_passing.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bridge.spec.launch_config import clip_block
from jax_impl.ssd_common import launch_config, pallas_call, sequence_of


def _state_passing_kernel(chunk_states_ref, dA_cumsum_ref, seq_idx_ref, initial_states_ref,
                          end_states_ref, states_ref, *, return_intermediate_states, num_chunks,
                          num_seqs, headdim, dstate, chunk_size, block_size_m, block_size_n):
    """Grid (H, cdiv(P, BM), cdiv(N, BN)): one program carries one (BM, BN)
    tile of one head through all chunks in order."""
    head, pid_m, pid_n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0, n0 = pid_m * block_size_m, pid_n * block_size_n
    rows, cols = pl.ds(m0, block_size_m), pl.ds(n0, block_size_n)
    tile_mask = ((m0 + jnp.arange(block_size_m) < headdim)[:, None]
                 & (n0 + jnp.arange(block_size_n) < dstate)[None, :])
    zeros = jnp.zeros((block_size_m, block_size_n), jnp.float32)

    def poison_rows(first, end):
        """NaN into the final-state rows [first, end) that lie in [0, num_seqs)."""
        nan = jnp.full((block_size_m, block_size_n), jnp.nan, states_ref.dtype)

        def poison(row, carry):
            plgpu.store(states_ref.at[row, head, rows, cols], nan, mask=tile_mask)
            return carry

        bounds = [jnp.clip(v, 0, num_seqs).astype(jnp.int32) for v in (first, end)]
        jax.lax.fori_loop(*bounds, poison, 0)

    def chunk_step(chunk, carry):
        prev_end_state, previous_seq = carry
        seq, row, seq_ok = sequence_of(seq_idx_ref, chunk, num_seqs)
        starts_seq = (chunk == 0) | (seq != previous_seq)
        if not return_intermediate_states:
            poison_rows(previous_seq + 1, seq)  # sequences skipped over get no final state
        initial = zeros
        if initial_states_ref is not None:
            # Masked off (no memory traffic) unless this chunk starts its sequence.
            initial = plgpu.load(initial_states_ref.at[row, head, rows, cols],
                                 mask=tile_mask & starts_seq & seq_ok, other=0.0).astype(jnp.float32)
        start_state = jnp.where(starts_seq, jnp.where(seq_ok, initial, jnp.nan), prev_end_state)
        own = plgpu.load(chunk_states_ref.at[chunk, head, rows, cols], mask=tile_mask, other=0.0)
        end_state = jnp.exp(dA_cumsum_ref[head, chunk, jnp.int32(chunk_size - 1)]) * start_state + own
        plgpu.store(end_states_ref.at[chunk, head, rows, cols], end_state.astype(end_states_ref.dtype),
                    mask=tile_mask)
        if return_intermediate_states:
            plgpu.store(states_ref.at[chunk, head, rows, cols],
                        end_state.astype(states_ref.dtype), mask=tile_mask)
        else:
            ends_seq = ((chunk == num_chunks - 1)
                        | (seq_idx_ref[jnp.minimum(chunk + 1, num_chunks - 1)] != seq))
            plgpu.store(states_ref.at[row, head, rows, cols],
                        end_state.astype(states_ref.dtype), mask=tile_mask & ends_seq & seq_ok)
        # Only valid sequences count as seen: rows after the last one get NaN below.
        return end_state, jnp.where(seq_ok, seq, previous_seq)

    _, last_seq = jax.lax.fori_loop(0, num_chunks, chunk_step,
                                    (zeros, jnp.array(-1, seq_idx_ref.dtype)))
    if not return_intermediate_states:
        poison_rows(last_seq + 1, num_seqs)


def state_passing(chunk_states, dA_cumsum, seq_idx, num_seqs: int,
                  initial_states=None, return_intermediate_states=False,
                  state_dtype=jnp.float32, end_states_dtype=jnp.float32):
    """chunk_states (K, H, P, N) float32, dA_cumsum (H, K, L), seq_idx (K,),
    initial_states (Q, H, P, N) -> ``(end_states (K, H, P, N), states)``:
    states (K, H, P, N) with intermediate states, else (Q, H, P, N), in
    state_dtype. The carried state is float32; end_states, which only feed
    the output products, are stored in ``end_states_dtype`` (the inputs'
    dtype halves their traffic)."""
    num_chunks, nheads, headdim, dstate = chunk_states.shape
    config = launch_config("state_passing")
    block_size_m = clip_block(headdim, config.BLOCK_SIZE_M)
    block_size_n = clip_block(dstate, config.BLOCK_SIZE_N)
    kernel = functools.partial(
        _state_passing_kernel, return_intermediate_states=bool(return_intermediate_states),
        num_chunks=num_chunks, num_seqs=num_seqs, headdim=headdim, dstate=dstate,
        chunk_size=dA_cumsum.shape[-1], block_size_m=block_size_m, block_size_n=block_size_n)
    rows = num_chunks if return_intermediate_states else num_seqs
    return pallas_call(
        kernel, config,
        out_shape=(jax.ShapeDtypeStruct((num_chunks, nheads, headdim, dstate), end_states_dtype),
                   jax.ShapeDtypeStruct((rows, nheads, headdim, dstate), state_dtype)),
        grid=(nheads, pl.cdiv(headdim, block_size_m), pl.cdiv(dstate, block_size_n)),
        name="ssd_state_passing",
    )(chunk_states, dA_cumsum, seq_idx, initial_states)
