"""Chunked scan, stage 4 (Triton): the chunk-local products C B^T, once per
group (every head of the group reuses them).

    CB[c, g, i, j] = C[s_c + i, g] . B[s_c + j, g]     for i, j < len_c

Only tiles on or below the diagonal are computed: the scan reads j <= i.
Mirror: ``jax_impl/ssd_bmm.py``.
"""

from __future__ import annotations

import torch

from torch_impl.ssd_common import chunk_bounds, dot_precision, launch_tiles, tile_dot

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _bmm_chunk_kernel(
    C_ptr, B_ptr, cu_chunk_ptr, CB_ptr,
    num_tokens, dstate,
    stride_C_tok, stride_C_group, stride_C_dstate,
    stride_B_tok, stride_B_group, stride_B_dstate,
    stride_CB_chunk, stride_CB_group, stride_CB_row, stride_CB_col,
    CHUNK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
):
    """Grid (num_chunks, ngroups, cdiv(L, M) * cdiv(L, N)): one (M, N) tile
    of a chunk's C B^T, K running over dstate."""
    chunk = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    pid_m = tl.program_id(2) // tl.cdiv(CHUNK_SIZE, BLOCK_SIZE_N)
    pid_n = tl.program_id(2) % tl.cdiv(CHUNK_SIZE, BLOCK_SIZE_N)
    if pid_n * BLOCK_SIZE_N < (pid_m + 1) * BLOCK_SIZE_M:  # on or below the diagonal
        offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
        offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
        start, length, _ = chunk_bounds(cu_chunk_ptr, chunk, num_tokens, CHUNK_SIZE)
        offs_k = tl.arange(0, BLOCK_SIZE_K)
        C_base = C_ptr + start * stride_C_tok + group * stride_C_group
        B_base = B_ptr + start * stride_B_tok + group * stride_B_group
        acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
        for k in range(0, dstate, BLOCK_SIZE_K):
            d = k + offs_k
            C = tl.load(C_base + offs_m[:, None] * stride_C_tok + d[None, :] * stride_C_dstate,
                        mask=(offs_m < length)[:, None] & (d < dstate)[None, :], other=0.0)
            B_t = tl.load(B_base + d[:, None] * stride_B_dstate + offs_n[None, :] * stride_B_tok,
                          mask=(d < dstate)[:, None] & (offs_n < length)[None, :], other=0.0)
            acc += tile_dot(C, B_t, DOT_PRECISION)
        tl.store(CB_ptr + chunk * stride_CB_chunk + group * stride_CB_group
                 + offs_m[:, None] * stride_CB_row + offs_n[None, :] * stride_CB_col, acc,
                 mask=(offs_m < CHUNK_SIZE)[:, None] & (offs_n < CHUNK_SIZE)[None, :])


def bmm_chunk(C, B, cu_chunk_seqlens, chunk_size):
    """C, B (T, G, N) -> CB (K, G, L, L) float32 (tiles above the diagonal unset)."""
    num_tokens, ngroups, dstate = C.shape
    num_chunks = cu_chunk_seqlens.shape[0] - 1
    CB = torch.empty(num_chunks, ngroups, chunk_size, chunk_size, device=C.device, dtype=torch.float32)
    launch_tiles(
        _bmm_chunk_kernel, "bmm_chunk", C.device, lambda tiles: (num_chunks, ngroups, tiles),
        chunk_size, chunk_size, dstate,
        C, B, cu_chunk_seqlens, CB, num_tokens, dstate, *C.stride(), *B.stride(), *CB.stride(),
        CHUNK_SIZE=chunk_size, DOT_PRECISION=dot_precision(C.dtype))
    return CB
