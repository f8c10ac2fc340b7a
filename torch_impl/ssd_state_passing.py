"""Chunked scan, stage 3 (Triton): carry the state across the chunks of
each sequence.

    end_states[c] = exp(dA_cumsum[h, c, L-1]) * start(c) + chunk_states[c]
    start(c)      = end_states[c-1] when chunk c-1 belongs to the same sequence,
                    else initial_states[seq_idx[c]] (zeros when not given)

The call also writes the states it returns, in ``state_dtype``: every
chunk's end state (``return_intermediate_states``) or each sequence's final
one. Mirror: ``jax_impl/ssd_state_passing.py``.
"""

from __future__ import annotations

import torch

from bridge.spec.launch_config import clip_block
from torch_impl import platform  # noqa: F401  (before triton: interpreter mode on CPU)
from torch_impl.ssd_chunk_state import launch_config

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _state_passing_kernel(
    chunk_states_ptr, dA_cumsum_ptr, seq_idx_ptr, initial_states_ptr, end_states_ptr, states_ptr,
    num_chunks, headdim, dstate,
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
    previous_seq = tl.load(seq_idx_ptr).to(tl.int64) - 1  # chunk 0 starts a sequence
    for chunk in range(num_chunks):
        seq = tl.load(seq_idx_ptr + chunk).to(tl.int64)
        if seq != previous_seq:
            if HAS_INITIAL_STATES:
                state = tl.load(initial_states_ptr + seq * stride_init_seq + init_tile,
                                mask=mask, other=0.0).to(tl.float32)
            else:
                state = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
        state = tl.exp(tl.load(dA_last_ptr)) * state + tl.load(chunk_states_ptrs, mask=mask, other=0.0)
        tl.store(end_states_ptrs, state.to(end_states_ptr.dtype.element_ty), mask=mask)
        if INTERMEDIATE:
            tl.store(intermediate_ptrs, state.to(states_ptr.dtype.element_ty), mask=mask)
        else:
            next_seq = tl.load(seq_idx_ptr + tl.minimum(chunk + 1, num_chunks - 1)).to(tl.int64)
            if (chunk == num_chunks - 1) | (next_seq != seq):  # the sequence's last chunk
                tl.store(states_ptr + seq * stride_states_row + out_tile,
                         state.to(states_ptr.dtype.element_ty), mask=mask)
        previous_seq = seq
        chunk_states_ptrs += stride_cs_chunk
        end_states_ptrs += stride_cs_chunk
        intermediate_ptrs += stride_states_row
        dA_last_ptr += stride_dA_chunk


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
    block_m = clip_block(headdim, config["BLOCK_SIZE_M"])
    block_n = clip_block(dstate, config["BLOCK_SIZE_N"])
    grid = (nheads, triton.cdiv(headdim, block_m), triton.cdiv(dstate, block_n))
    init_strides = initial_states.stride() if initial_states is not None else (0, 0, 0, 0)
    with torch.device(chunk_states.device):
        _state_passing_kernel[grid](
            chunk_states, dA_cumsum, seq_idx, initial_states, end_states, states,
            num_chunks, headdim, dstate,
            *chunk_states.stride(), *dA_cumsum.stride(), *init_strides, *states.stride(),
            HAS_INITIAL_STATES=initial_states is not None,
            INTERMEDIATE=bool(return_intermediate_states), CHUNK_SIZE=chunk_size,
            BLOCK_SIZE_M=block_m, BLOCK_SIZE_N=block_n,
            num_warps=config["num_warps"], num_stages=config["num_stages"])
    return end_states, states
