"""Chunked scan, stage 3 (Triton): carry the state across the chunks of
each sequence.

    end_states[c] = exp(dA_cumsum[h, c, L-1]) * start(c) + chunk_states[c]
    start(c)      = end_states[c-1] when chunk c-1 belongs to the same sequence,
                    else initial_states[seq_idx[c]] (zeros when not given)

The call also writes the states it returns, in ``state_dtype``: every
chunk's end state (``return_intermediate_states``) or each sequence's final
one. A ``seq_idx`` outside [0, Q) starts its chunk from NaN and writes no
final state; final-state rows that no chunk ends are NaN. Mirror:
``jax_impl/ssd_state_passing.py``.
"""

from __future__ import annotations

import torch

from bridge.spec.launch_config import clip_block
from torch_impl import platform
from torch_impl.ssd_common import launch, launch_config, sequence_of

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _poison_rows(states_ptr, first, end, num_seqs, stride_row, tile, mask,
                 BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr):
    """NaN into the final-state rows [first, end) that lie in [0, num_seqs)."""
    nan = tl.full((BLOCK_SIZE_M, BLOCK_SIZE_N), float("nan"), states_ptr.dtype.element_ty)
    for row in range(tl.maximum(first, 0), tl.minimum(end, num_seqs)):
        tl.store(states_ptr + row * stride_row + tile, nan, mask=mask)


@triton.heuristics(platform.given_flags(HAS_INITIAL_STATES="initial_states_ptr"))
@triton.jit
def _state_passing_kernel(
    chunk_states_ptr, dA_cumsum_ptr, seq_idx_ptr, initial_states_ptr, end_states_ptr, states_ptr,
    num_chunks, num_seqs, headdim, dstate,
    stride_cs_chunk, stride_cs_head, stride_cs_dim, stride_cs_dstate,
    stride_dA_head, stride_dA_chunk, stride_dA_pos,
    stride_init_seq, stride_init_head, stride_init_dim, stride_init_dstate,
    stride_states_row, stride_states_head, stride_states_dim, stride_states_dstate,
    HAS_INITIAL_STATES: tl.constexpr, INTERMEDIATE: tl.constexpr, CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
):
    """Grid (nheads, cdiv(headdim, M), cdiv(dstate, N)): one (M, N) tile of
    one head's state, carried through all chunks in order."""
    head = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    offs_n = tl.program_id(2) * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    mask = (offs_m < headdim)[:, None] & (offs_n < dstate)[None, :]
    cs_tile = head * stride_cs_head + offs_m[:, None] * stride_cs_dim + offs_n[None, :] * stride_cs_dstate
    init_tile = (head * stride_init_head + offs_m[:, None] * stride_init_dim
                 + offs_n[None, :] * stride_init_dstate)
    out_tile = (head * stride_states_head + offs_m[:, None] * stride_states_dim
                + offs_n[None, :] * stride_states_dstate)

    # Pointers advance chunk by chunk (64-bit pointer arithmetic, no int32 overflow).
    chunk_states_ptrs = chunk_states_ptr + cs_tile
    end_states_ptrs = end_states_ptr + cs_tile
    intermediate_ptrs = states_ptr + out_tile
    dA_last_ptr = dA_cumsum_ptr + head * stride_dA_head + (CHUNK_SIZE - 1) * stride_dA_pos
    state = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    previous_seq = tl.full((), -1, tl.int64)
    for chunk in range(num_chunks):
        seq, row, seq_ok = sequence_of(seq_idx_ptr, chunk, num_seqs)
        if (chunk == 0) | (seq != previous_seq):  # the chunk starts a sequence
            if not INTERMEDIATE:  # rows of sequences skipped over get no final state
                _poison_rows(states_ptr, previous_seq + 1, seq, num_seqs, stride_states_row,
                             out_tile, mask, BLOCK_SIZE_M, BLOCK_SIZE_N)
            if HAS_INITIAL_STATES:
                state = tl.load(initial_states_ptr + row * stride_init_seq + init_tile,
                                mask=mask & seq_ok, other=float("nan")).to(tl.float32)
            else:
                state = tl.where(seq_ok, 0.0, tl.full((BLOCK_SIZE_M, BLOCK_SIZE_N), float("nan"),
                                                      tl.float32))
        state = tl.exp(tl.load(dA_last_ptr)) * state + tl.load(chunk_states_ptrs, mask=mask, other=0.0)
        tl.store(end_states_ptrs, state.to(end_states_ptr.dtype.element_ty), mask=mask)
        if INTERMEDIATE:
            tl.store(intermediate_ptrs, state.to(states_ptr.dtype.element_ty), mask=mask)
        else:
            next_seq = tl.load(seq_idx_ptr + tl.minimum(chunk + 1, num_chunks - 1)).to(tl.int64)
            if (chunk == num_chunks - 1) | (next_seq != seq):  # the sequence's last chunk
                tl.store(states_ptr + row * stride_states_row + out_tile,
                         state.to(states_ptr.dtype.element_ty), mask=mask & seq_ok)
        # Only valid sequences count as seen: rows after the last one get NaN below.
        previous_seq = tl.where(seq_ok, seq, previous_seq)
        chunk_states_ptrs += stride_cs_chunk
        end_states_ptrs += stride_cs_chunk
        intermediate_ptrs += stride_states_row
        dA_last_ptr += stride_dA_chunk
    if not INTERMEDIATE:
        _poison_rows(states_ptr, previous_seq + 1, num_seqs, num_seqs, stride_states_row,
                     out_tile, mask, BLOCK_SIZE_M, BLOCK_SIZE_N)


def state_passing(chunk_states, dA_cumsum, seq_idx, num_seqs,
                  initial_states=None, return_intermediate_states=False,
                  state_dtype=torch.float32, end_states_dtype=torch.float32):
    """chunk_states (K, H, P, N) float32, dA_cumsum (H, K, L), seq_idx (K,),
    initial_states (Q, H, P, N) -> (end_states (K, H, P, N), states): states
    (K, H, P, N) with intermediate states, else (Q, H, P, N), in state_dtype.
    The carried state is float32; end_states, which only feed the output
    products, are stored in ``end_states_dtype`` (the inputs' dtype halves
    their traffic)."""
    num_chunks, nheads, headdim, dstate = chunk_states.shape
    chunk_size = dA_cumsum.shape[2]
    end_states = torch.empty_like(chunk_states, dtype=end_states_dtype)
    rows = num_chunks if return_intermediate_states else num_seqs
    states = torch.empty(rows, nheads, headdim, dstate, device=chunk_states.device, dtype=state_dtype)
    config = launch_config("state_passing", chunk_states.device)
    block_m = clip_block(headdim, config.BLOCK_SIZE_M)
    block_n = clip_block(dstate, config.BLOCK_SIZE_N)
    grid = (nheads, platform.cdiv(headdim, block_m), platform.cdiv(dstate, block_n))
    launch(
        _state_passing_kernel, grid, config,
        chunk_states, dA_cumsum, seq_idx, initial_states, end_states, states,
        num_chunks, num_seqs, headdim, dstate,
        *chunk_states.stride(), *dA_cumsum.stride(), *platform.strides(initial_states, 4),
        *states.stride(),
        INTERMEDIATE=bool(return_intermediate_states), CHUNK_SIZE=chunk_size,
        BLOCK_SIZE_M=block_m, BLOCK_SIZE_N=block_n)
    return end_states, states


# --- The backward (training) --------------------------------------------------------

@triton.heuristics(platform.given_flags(HAS_INITIAL_STATES="initial_states_ptr"))
@triton.jit
def _state_passing_bwd_kernel(
    dS_prev_ptr, ddstates_ptr, dA_cumsum_ptr, end_states_ptr, initial_states_ptr, seq_idx_ptr,
    dinit_ptr, dlast_ptr,
    num_chunks, num_seqs, headdim, dstate,
    stride_g_chunk, stride_g_head, stride_g_dim, stride_g_dstate,
    stride_dd_row, stride_dd_head, stride_dd_dim, stride_dd_dstate,
    stride_dA_head, stride_dA_chunk, stride_dA_pos,
    stride_es_chunk, stride_es_head, stride_es_dim, stride_es_dstate,
    stride_init_seq, stride_init_head, stride_init_dim, stride_init_dstate,
    stride_dlast_tile, stride_dlast_head,
    HAS_INITIAL_STATES: tl.constexpr, INTERMEDIATE: tl.constexpr, CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
):
    """Grid (nheads, cdiv(headdim, M), cdiv(dstate, N)): one (M, N) tile of
    one head, walked back from the last chunk. Chunk c's dS_prev(c) is
    overwritten with G_c = dL/d(end state of c):

        G_c = d states[c] (intermediate) or d final[seq] (c last of seq)
              + exp(a_last(c+1)) G_{c+1} + dS_prev(c+1)   (c+1 in the same sequence)
        d a_last(c) = exp(a_last(c)) <G_c, S_prev(c)>   (this tile's part, into dlast)
        d initial[seq] = exp(a_last(c)) G_c + dS_prev(c) (c first of seq)"""
    head = tl.program_id(0)
    tile_id = tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)
    offs_m = tl.program_id(1) * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    offs_n = tl.program_id(2) * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    mask = (offs_m < headdim)[:, None] & (offs_n < dstate)[None, :]
    g_tile = head * stride_g_head + offs_m[:, None] * stride_g_dim + offs_n[None, :] * stride_g_dstate
    dd_tile = head * stride_dd_head + offs_m[:, None] * stride_dd_dim + offs_n[None, :] * stride_dd_dstate
    es_tile = head * stride_es_head + offs_m[:, None] * stride_es_dim + offs_n[None, :] * stride_es_dstate
    init_tile = (head * stride_init_head + offs_m[:, None] * stride_init_dim
                 + offs_n[None, :] * stride_init_dstate)
    carry = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for step in range(num_chunks):
        chunk = (num_chunks - 1 - step).to(tl.int64)
        seq, row, seq_ok = sequence_of(seq_idx_ptr, chunk, num_seqs)
        next_seq = tl.load(seq_idx_ptr + tl.minimum(chunk + 1, num_chunks - 1)).to(tl.int64)
        previous_seq = tl.load(seq_idx_ptr + tl.maximum(chunk - 1, 0)).to(tl.int64)
        is_last = (chunk == num_chunks - 1) | (next_seq != seq)
        is_first = (chunk == 0) | (previous_seq != seq)
        if INTERMEDIATE:
            G = tl.load(ddstates_ptr + chunk * stride_dd_row + dd_tile, mask=mask, other=0.0).to(tl.float32)
            G += tl.where(is_last, 0.0, carry)
        else:
            if is_last:
                G = tl.load(ddstates_ptr + row * stride_dd_row + dd_tile, mask=mask & seq_ok,
                            other=0.0).to(tl.float32)
            else:
                G = carry
        dS_prev = tl.load(dS_prev_ptr + chunk * stride_g_chunk + g_tile, mask=mask, other=0.0)
        decay = tl.exp(tl.load(dA_cumsum_ptr + head * stride_dA_head + chunk * stride_dA_chunk
                               + (CHUNK_SIZE - 1) * stride_dA_pos))
        if is_first:
            if HAS_INITIAL_STATES:
                S_prev = tl.load(initial_states_ptr + row * stride_init_seq + init_tile,
                                 mask=mask & seq_ok, other=0.0).to(tl.float32)
            else:
                S_prev = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
        else:
            S_prev = tl.load(end_states_ptr + (chunk - 1) * stride_es_chunk + es_tile, mask=mask,
                             other=0.0).to(tl.float32)
        tl.store(dlast_ptr + tile_id * stride_dlast_tile + head * stride_dlast_head + chunk,
                 decay * tl.sum(tl.sum(G * S_prev, axis=1), axis=0))
        tl.store(dS_prev_ptr + chunk * stride_g_chunk + g_tile, G, mask=mask)
        carry = decay * G + dS_prev
        if HAS_INITIAL_STATES:
            if is_first:
                tl.store(dinit_ptr + row * stride_init_seq + init_tile,
                         carry.to(dinit_ptr.dtype.element_ty), mask=mask & seq_ok)


def state_passing_bwd(dS_prev, dstates, dA_cumsum, end_states, seq_idx, num_seqs,
                      initial_states=None, return_intermediate_states=False):
    """dS_prev (K, H, P, N) float32 (overwritten with G = d end states), the
    states' gradient ``dstates`` ((Q, ...) final or (K, ...) intermediate),
    dA_cumsum (H, K, L), end_states (K, H, P, N) -> (G, d initial_states (Q,
    H, P, N) float32 or None, d a_last (H, K) float32 from the carried states)."""
    num_chunks, nheads, headdim, dstate = dS_prev.shape
    chunk_size = dA_cumsum.shape[2]
    config = launch_config("state_passing_bwd", dS_prev.device)
    block_m = clip_block(headdim, config.BLOCK_SIZE_M)
    block_n = clip_block(dstate, config.BLOCK_SIZE_N)
    grid = (nheads, platform.cdiv(headdim, block_m), platform.cdiv(dstate, block_n))
    dinit = None
    if initial_states is not None:  # with the layout of initial_states (strides shared)
        dinit = torch.zeros(initial_states.shape, device=dS_prev.device, dtype=torch.float32)
        initial_states = initial_states.contiguous()
    dlast = torch.empty(grid[1] * grid[2], nheads, num_chunks, device=dS_prev.device, dtype=torch.float32)
    launch(
        _state_passing_bwd_kernel, grid, config,
        dS_prev, dstates, dA_cumsum, end_states, initial_states, seq_idx, dinit, dlast,
        num_chunks, num_seqs, headdim, dstate,
        *dS_prev.stride(), *dstates.stride(), *dA_cumsum.stride(), *end_states.stride(),
        *platform.strides(initial_states, 4), *dlast.stride()[:2],
        INTERMEDIATE=bool(return_intermediate_states), CHUNK_SIZE=chunk_size,
        BLOCK_SIZE_M=block_m, BLOCK_SIZE_N=block_n)
    return dS_prev, dinit, dlast.sum(0)
