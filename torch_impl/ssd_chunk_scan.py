"""Chunked scan, stage 5 (Triton): every token's output from its chunk's
start state and the chunk's earlier tokens.

    out[s_c + i, h] = exp(dA_cumsum[h, c, i]) * C[s_c + i, g] @ start(c)^T
                    + sum_{j <= i} CB[c, g, i, j] * exp(dA_cumsum[h, c, i] - dA_cumsum[h, c, j])
                                   * dt_out[h, c, j] * x[s_c + j, h]
                    + D[h] * x[s_c + i, h]
    then out *= z * sigmoid(z) when z is given

``start(c)`` is the state the chunk starts from (``ssd_state_passing``); a
chunk whose sequence (``seq_idx``) is outside [0, Q) starts from NaN.
Mirror: ``jax_impl/ssd_chunk_scan.py``.
"""

from __future__ import annotations

import torch

from bridge.spec.launch_config import clip_block
from torch_impl import platform
from torch_impl.ssd_common import (
    chunk_bounds, dot_precision, launch_tiles, sequence_of, tile_dot, tile_offsets)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.heuristics({"HAS_D": lambda args: args["D_ptr"] is not None,
                    "HAS_Z": lambda args: args["z_ptr"] is not None,
                    "HAS_INITIAL_STATES": lambda args: args["initial_states_ptr"] is not None})
@triton.jit
def _chunk_scan_kernel(
    CB_ptr, x_ptr, dt_out_ptr, dA_cumsum_ptr, C_ptr, end_states_ptr, seq_idx_ptr, cu_chunk_ptr,
    D_ptr, z_ptr, initial_states_ptr, out_ptr,
    num_tokens, num_seqs, headdim, dstate, heads_per_group,
    stride_CB_chunk, stride_CB_group, stride_CB_row, stride_CB_col,
    stride_x_tok, stride_x_head, stride_x_dim,
    stride_dA_head, stride_dA_chunk, stride_dA_pos,
    stride_C_tok, stride_C_group, stride_C_dstate,
    stride_states_chunk, stride_states_head, stride_states_dim, stride_states_dstate,
    stride_init_seq, stride_init_head, stride_init_dim, stride_init_dstate,
    stride_D_head, stride_D_dim,
    stride_z_tok, stride_z_head, stride_z_dim,
    stride_out_tok, stride_out_head, stride_out_dim,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_INITIAL_STATES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    BLOCK_SIZE_DSTATE: tl.constexpr, CHUNK_SIZE: tl.constexpr,
):
    """Grid (cdiv(L, M) * cdiv(headdim, N), num_chunks, nheads): one (M, N)
    tile of (tokens, headdim) of a chunk's output. The tiles of a chunk run
    next to each other, so they share its C B^T and states in L2."""
    offs_m, offs_n = tile_offsets(tl.program_id(0), headdim, BLOCK_SIZE_M, BLOCK_SIZE_N)
    m0 = (tl.program_id(0) // tl.cdiv(headdim, BLOCK_SIZE_N)) * BLOCK_SIZE_M
    chunk = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2)
    group = head // heads_per_group
    start, length, _ = chunk_bounds(cu_chunk_ptr, chunk, num_tokens, CHUNK_SIZE)
    if m0 < length:  # tiles past a short chunk's end have no tokens
        offs_d = tl.arange(0, BLOCK_SIZE_DSTATE)
        mask_m = offs_m < length
        mask_n = offs_n < headdim
        dA_ptr = dA_cumsum_ptr + head * stride_dA_head + chunk * stride_dA_chunk
        dt_ptr = dt_out_ptr + head * stride_dA_head + chunk * stride_dA_chunk
        dA_m = tl.load(dA_ptr + offs_m * stride_dA_pos, mask=mask_m, other=0.0)

        # The start state's part: C (M, dstate) @ start^T (dstate, N).
        seq, row, seq_ok = sequence_of(seq_idx_ptr, chunk, num_seqs)
        previous_seq = tl.load(seq_idx_ptr + tl.maximum(chunk - 1, 0)).to(tl.int64)
        state_mask = (offs_d < dstate)[:, None] & mask_n[None, :]
        if (chunk > 0) & (seq == previous_seq):
            start_state = tl.load(end_states_ptr + (chunk - 1) * stride_states_chunk
                                  + head * stride_states_head + offs_d[:, None] * stride_states_dstate
                                  + offs_n[None, :] * stride_states_dim, mask=state_mask,
                                  other=0.0).to(tl.float32)
        elif HAS_INITIAL_STATES:
            start_state = tl.load(initial_states_ptr + row * stride_init_seq
                                  + head * stride_init_head + offs_d[:, None] * stride_init_dstate
                                  + offs_n[None, :] * stride_init_dim, mask=state_mask & seq_ok,
                                  other=0.0).to(tl.float32)
            start_state = tl.where(seq_ok, start_state, float("nan"))
        else:
            start_state = tl.where(seq_ok, 0.0, tl.full((BLOCK_SIZE_DSTATE, BLOCK_SIZE_N),
                                                        float("nan"), tl.float32))
        C = tl.load(C_ptr + (start + offs_m)[:, None] * stride_C_tok + group * stride_C_group
                    + offs_d[None, :] * stride_C_dstate,
                    mask=mask_m[:, None] & (offs_d < dstate)[None, :], other=0.0)
        acc = tile_dot(C, start_state.to(C.dtype), DOT_PRECISION)
        acc *= tl.exp(dA_m)[:, None]

        # The chunk's own tokens j <= i: (CB * decay * dt) (M, K) @ x (K, N),
        # K running only up to this row tile's last token.
        # Positions past the chunk's end need no mask on CB, dA or dt (all
        # inside the (L, L) / (L,) rows; dt is 0 there), only on x (past T).
        offs_k = tl.arange(0, BLOCK_SIZE_K)
        x_base = x_ptr + start * stride_x_tok + head * stride_x_head
        CB_ptrs = (CB_ptr + chunk * stride_CB_chunk + group * stride_CB_group
                   + offs_m[:, None] * stride_CB_row + offs_k[None, :] * stride_CB_col)
        dA_k_ptrs = dA_ptr + offs_k * stride_dA_pos
        dt_k_ptrs = dt_ptr + offs_k * stride_dA_pos
        x_ptrs = x_base + offs_k[:, None] * stride_x_tok + offs_n[None, :] * stride_x_dim
        k_end = tl.minimum(m0 + BLOCK_SIZE_M, length)
        for k in range(0, k_end, BLOCK_SIZE_K):
            CB = tl.load(CB_ptrs)
            dA_k = tl.load(dA_k_ptrs)
            dt_k = tl.load(dt_k_ptrs)
            weight = CB * tl.exp(dA_m[:, None] - dA_k[None, :]) * dt_k[None, :]
            # where, not a 0/1 product: CB tiles above the diagonal are unset.
            weight = tl.where(offs_m[:, None] >= (k + offs_k)[None, :], weight, 0.0)
            x_k = tl.load(x_ptrs, mask=((k + offs_k) < length)[:, None] & mask_n[None, :], other=0.0)
            acc += tile_dot(weight.to(x_k.dtype), x_k, DOT_PRECISION)
            CB_ptrs += BLOCK_SIZE_K * stride_CB_col
            dA_k_ptrs += BLOCK_SIZE_K * stride_dA_pos
            dt_k_ptrs += BLOCK_SIZE_K * stride_dA_pos
            x_ptrs += BLOCK_SIZE_K * stride_x_tok

        tile = mask_m[:, None] & mask_n[None, :]
        if HAS_D:
            x_m = tl.load(x_base + offs_m[:, None] * stride_x_tok + offs_n[None, :] * stride_x_dim,
                          mask=tile, other=0.0).to(tl.float32)
            D = tl.load(D_ptr + head * stride_D_head + offs_n * stride_D_dim, mask=mask_n, other=0.0)
            acc += x_m * D.to(tl.float32)[None, :]
        if HAS_Z:
            z = tl.load(z_ptr + (start + offs_m)[:, None] * stride_z_tok + head * stride_z_head
                        + offs_n[None, :] * stride_z_dim, mask=tile, other=0.0).to(tl.float32)
            acc *= z * tl.sigmoid(z)
        tl.store(out_ptr + (start + offs_m)[:, None] * stride_out_tok + head * stride_out_head
                 + offs_n[None, :] * stride_out_dim, acc.to(out_ptr.dtype.element_ty), mask=tile)


def chunk_scan(CB, x, dt_out, dA_cumsum, C, end_states, cu_chunk_seqlens, seq_idx, num_seqs,
               D=None, z=None, initial_states=None, out=None):
    """CB (K, G, L, L), x (T, H, P), dt_out / dA_cumsum (H, K, L), C (T, G, N),
    end_states (K, H, P, N), seq_idx (K,) in [0, num_seqs), D (H,) or (H, P),
    z (T, H, P), initial_states (Q, H, P, N) -> out (T, H, P), written in
    place when given."""
    num_tokens, nheads, headdim = x.shape
    ngroups, dstate = C.shape[1:]
    num_chunks, chunk_size = dA_cumsum.shape[1:]
    if out is None:
        out = torch.empty_like(x)
    if D is not None and D.dim() == 1:
        D = D.unsqueeze(1).expand(nheads, headdim)  # stride 0 over headdim
    launch_tiles(
        _chunk_scan_kernel, "chunk_scan", x.device, lambda tiles: (tiles, num_chunks, nheads),
        chunk_size, headdim, chunk_size,
        CB, x, dt_out, dA_cumsum, C, end_states, seq_idx, cu_chunk_seqlens, D, z, initial_states,
        out, num_tokens, num_seqs, headdim, dstate, nheads // ngroups,
        *CB.stride(), *x.stride(), *dA_cumsum.stride(), *C.stride(), *end_states.stride(),
        *platform.strides(initial_states, 4), *platform.strides(D, 2), *platform.strides(z, 3),
        *out.stride(),
        DOT_PRECISION=dot_precision(x.dtype), BLOCK_SIZE_DSTATE=clip_block(dstate),
        CHUNK_SIZE=chunk_size)
    return out
