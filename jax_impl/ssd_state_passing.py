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


def _carry_call(stage, kernel, shape, dA_cumsum, num_seqs: int, return_intermediate_states,
                **options):
    """``pallas_call`` of a stage that carries (BM, BN) tiles of every
    head's (K, H, P, N) ``shape`` states through the chunks: grid (H,
    cdiv(P, BM), cdiv(N, BN)), the tile and the statics from ``stage``'s
    config and the shapes."""
    num_chunks, nheads, headdim, dstate = shape
    config = launch_config(stage)
    block_size_m = clip_block(headdim, config.BLOCK_SIZE_M)
    block_size_n = clip_block(dstate, config.BLOCK_SIZE_N)
    kernel = functools.partial(
        kernel, return_intermediate_states=bool(return_intermediate_states),
        num_chunks=num_chunks, num_seqs=num_seqs, headdim=headdim, dstate=dstate,
        chunk_size=dA_cumsum.shape[-1], block_size_m=block_size_m, block_size_n=block_size_n)
    return pallas_call(
        kernel, config, grid=(nheads, pl.cdiv(headdim, block_size_m), pl.cdiv(dstate, block_size_n)),
        name=f"ssd_{stage}", **options)


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
    rows = num_chunks if return_intermediate_states else num_seqs
    return _carry_call(
        "state_passing", _state_passing_kernel, chunk_states.shape, dA_cumsum, num_seqs,
        return_intermediate_states,
        out_shape=(jax.ShapeDtypeStruct(chunk_states.shape, end_states_dtype),
                   jax.ShapeDtypeStruct((rows, nheads, headdim, dstate), state_dtype)),
    )(chunk_states, dA_cumsum, seq_idx, initial_states)


# The backward (issue 12): mirror ``torch_impl/ssd_state_passing.py``.

def _state_passing_bwd_kernel(dstart_ref, dA_cumsum_ref, seq_idx_ref, dstates_ref, _dinit_in_ref,
                              dend_ref, dinit_ref=None, *, return_intermediate_states, num_chunks,
                              num_seqs, headdim, dstate, chunk_size, block_size_m, block_size_n):
    """Grid (H, cdiv(P, BM), cdiv(N, BN)): one program carries one (BM, BN)
    tile of the gradient of one head's end states back through all chunks,
    G_c = dstates[c or seq] + exp(a_last(c+1)) G_{c+1} + dstart(c+1) within a
    sequence; a sequence's first chunk gives d initial_states."""
    head, pid_m, pid_n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0, n0 = pid_m * block_size_m, pid_n * block_size_n
    rows, cols = pl.ds(m0, block_size_m), pl.ds(n0, block_size_n)
    tile_mask = ((m0 + jnp.arange(block_size_m) < headdim)[:, None]
                 & (n0 + jnp.arange(block_size_n) < dstate)[None, :])

    def chunk_step(step, to_previous):
        chunk = num_chunks - 1 - step
        seq, row, seq_ok = sequence_of(seq_idx_ref, chunk, num_seqs)
        ends_seq = ((chunk == num_chunks - 1)
                    | (seq_idx_ref[jnp.minimum(chunk + 1, num_chunks - 1)] != seq))
        starts_seq = (chunk == 0) | (seq_idx_ref[jnp.maximum(chunk - 1, 0)] != seq)
        dend = jnp.where(ends_seq, 0.0, to_previous)
        if dstates_ref is not None:
            if return_intermediate_states:
                given = plgpu.load(dstates_ref.at[chunk, head, rows, cols], mask=tile_mask, other=0.0)
            else:  # the final state: the sequence's last chunk's end state
                given = plgpu.load(dstates_ref.at[row, head, rows, cols],
                                   mask=tile_mask & ends_seq & seq_ok, other=0.0)
            dend = dend + given.astype(jnp.float32)
        plgpu.store(dend_ref.at[chunk, head, rows, cols], dend, mask=tile_mask)
        dstart = plgpu.load(dstart_ref.at[chunk, head, rows, cols], mask=tile_mask, other=0.0)
        to_start = jnp.exp(dA_cumsum_ref[head, chunk, jnp.int32(chunk_size - 1)]) * dend + dstart
        if dinit_ref is not None:
            plgpu.store(dinit_ref.at[row, head, rows, cols], to_start.astype(dinit_ref.dtype),
                        mask=tile_mask & starts_seq & seq_ok)
        return to_start

    jax.lax.fori_loop(0, num_chunks, chunk_step,
                      jnp.zeros((block_size_m, block_size_n), jnp.float32))


def state_passing_bwd(dstart, dA_cumsum, seq_idx, num_seqs: int, dstates=None,
                      return_intermediate_states=False, has_initial_states=False):
    """dstart (K, H, P, N) float32 (the gradient of every chunk's start state
    from its outputs, chunk_scan_bwd_dstates), dA_cumsum (H, K, L), seq_idx
    (K,), dstates (the gradient of the returned states: (K, H, P, N) with
    intermediate states, else (Q, H, P, N); None for none) -> ``(dend (K, H,
    P, N) float32, the gradient of every chunk's end state; dinit (Q, H, P,
    N) float32, of the initial states, or None)``. The decay's part
    (exp(a_last) <G_c, S_prev>) is chunk_scan_bwd's."""
    _, nheads, headdim, dstate = dstart.shape
    # d initial_states starts at 0: a sequence no chunk starts keeps it.
    dinit = jnp.zeros((num_seqs, nheads, headdim, dstate), jnp.float32) if has_initial_states else None
    operands = (dstart, dA_cumsum, seq_idx, dstates, dinit)
    result = _carry_call(
        "state_passing_bwd", _state_passing_bwd_kernel, dstart.shape, dA_cumsum, num_seqs,
        return_intermediate_states,
        out_shape=(jax.ShapeDtypeStruct(dstart.shape, jnp.float32),) + (
            (jax.ShapeDtypeStruct(dinit.shape, jnp.float32),) if has_initial_states else ()),
        # Aliases index the flattened operands, where an absent (None) one takes no place.
        input_output_aliases={sum(a is not None for a in operands) - 1: 1} if has_initial_states else {},
    )(*operands)
    return (result[0], result[1]) if has_initial_states else (result[0], None)
