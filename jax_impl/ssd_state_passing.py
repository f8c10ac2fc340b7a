"""Chunked scan (SSD prefill), stage 2: carry the state across the chunks of
each sequence, as a Pallas kernel (Triton backend on GPU).

Mirror: ``torch_impl/ssd_state_passing.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bridge.spec.launch_config import clip_block
from jax_impl import platform
from jax_impl.ssd_chunk_state import compiler_params, launch_config


def _state_passing_kernel(*refs, has_initial_states, return_intermediate_states, num_chunks,
                          headdim, dstate, chunk_size, block_size_m, block_size_n):
    """Grid (H, cdiv(P, BM), cdiv(N, BN)): one program carries one (BM, BN)
    tile of one head through all chunks in order."""
    if has_initial_states:
        chunk_states_ref, dA_cumsum_ref, seq_idx_ref, initial_ref, end_states_ref, states_ref = refs
    else:
        chunk_states_ref, dA_cumsum_ref, seq_idx_ref, end_states_ref, states_ref = refs
    head, pid_m, pid_n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0, n0 = pid_m * block_size_m, pid_n * block_size_n
    rows, cols = pl.ds(m0, block_size_m), pl.ds(n0, block_size_n)
    tile_mask = ((m0 + jnp.arange(block_size_m) < headdim)[:, None]
                 & (n0 + jnp.arange(block_size_n) < dstate)[None, :])

    def chunk_step(chunk, prev_end_state):
        seq = seq_idx_ref[chunk]
        starts_seq = (chunk == 0) | (seq_idx_ref[jnp.maximum(chunk - 1, 0)] != seq)
        if has_initial_states:
            # Masked off (no memory traffic) unless this chunk starts its sequence.
            initial = plgpu.load(initial_ref.at[seq, head, rows, cols],
                                 mask=tile_mask & starts_seq, other=0.0).astype(jnp.float32)
            start_state = jnp.where(starts_seq, initial, prev_end_state)
        else:
            start_state = jnp.where(starts_seq, 0.0, prev_end_state)
        own = plgpu.load(chunk_states_ref.at[chunk, head, rows, cols], mask=tile_mask, other=0.0)
        end_state = jnp.exp(dA_cumsum_ref[head, chunk, chunk_size - 1]) * start_state + own
        plgpu.store(end_states_ref.at[chunk, head, rows, cols], end_state.astype(end_states_ref.dtype),
                    mask=tile_mask)
        if return_intermediate_states:
            plgpu.store(states_ref.at[chunk, head, rows, cols],
                        end_state.astype(states_ref.dtype), mask=tile_mask)
        else:
            ends_seq = ((chunk == num_chunks - 1)
                        | (seq_idx_ref[jnp.minimum(chunk + 1, num_chunks - 1)] != seq))
            plgpu.store(states_ref.at[seq, head, rows, cols],
                        end_state.astype(states_ref.dtype), mask=tile_mask & ends_seq)
        return end_state

    jax.lax.fori_loop(0, num_chunks, chunk_step,
                      jnp.zeros((block_size_m, block_size_n), jnp.float32))


def state_passing(chunk_states, dA_cumsum, seq_idx, num_seqs: int,
                  initial_states=None, return_intermediate_states=False,
                  state_dtype=jnp.float32, end_states_dtype=jnp.float32):
    """chunk_states (K, H, P, N) float32, dA_cumsum (H, K, L), seq_idx (K,),
    initial_states (num_seqs, H, P, N) -> ``(end_states, states)``.

    ``end_states`` (K, H, P, N): the state at the end of each chunk,
    ``exp(dA_cumsum[h, c, L-1]) * start + chunk_states[c]``, where ``start`` is
    ``end_states[c-1]`` within a sequence and, for a sequence's first chunk,
    its initial state (or 0). The carried state is float32; end_states, which
    only feed the output products, are stored in ``end_states_dtype`` (the
    inputs' dtype halves their traffic). ``states`` in ``state_dtype``: all K
    end states with ``return_intermediate_states``, else (num_seqs, H, P, N)
    with the end state of each sequence's last chunk.
    """
    K, H, P, N = chunk_states.shape
    L = dA_cumsum.shape[-1]
    config = launch_config("state_passing")
    block_size_m = clip_block(P, config["BLOCK_SIZE_M"])
    block_size_n = clip_block(N, config["BLOCK_SIZE_N"])
    operands = [chunk_states, dA_cumsum, seq_idx]
    if initial_states is not None:
        operands.append(initial_states)
    kernel = functools.partial(
        _state_passing_kernel, has_initial_states=initial_states is not None,
        return_intermediate_states=bool(return_intermediate_states), num_chunks=K,
        headdim=P, dstate=N, chunk_size=L, block_size_m=block_size_m, block_size_n=block_size_n)
    num_states = K if return_intermediate_states else num_seqs
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((K, H, P, N), end_states_dtype),
                   jax.ShapeDtypeStruct((num_states, H, P, N), state_dtype)),
        grid=(H, pl.cdiv(P, block_size_m), pl.cdiv(N, block_size_n)),
        compiler_params=compiler_params(config),
        interpret=platform.INTERPRET,
        name="ssd_state_passing",
    )(*operands)
