"""Chunked scan, stages 1 and 2 (Triton): the per-chunk cumulative decay and
each chunk's own state contribution.

For chunk c (tokens s_c .. s_c + len_c, at most L = chunk_size), head h and
group g(h):

    dt_out[h, c, i]    = clamp(softplus(dt[s_c + i, h] + dt_bias[h]), dt_limit), 0 for i >= len_c
    dA_cumsum[h, c, i] = sum_{j <= i} dt_out[h, c, j] * A[h]
    chunk_states[c, h] = sum_i x[s_c + i, h]^T B[s_c + i, g] * dt_out[h, c, i]
                         * exp(dA_cumsum[h, c, L-1] - dA_cumsum[h, c, i])      (P, N)

A chunk whose range is malformed (``ssd_common.chunk_bounds``) gets a NaN
``dA_cumsum``, which poisons everything computed from it.
Mirror: ``jax_impl/ssd_chunk_state.py``.
"""

from __future__ import annotations

import math

import torch

from bridge.spec.launch_config import clip_block
from torch_impl import platform
from torch_impl.ssd_common import (
    TL_DTYPES, chunk_bounds, dot_precision, gated_dout, launch, launch_config, launch_tiles,
    softplus, tile_dot, tile_offsets)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _chunk_dt(dt_ptr, dt_bias_ptr, cu_chunk_ptr, num_tokens, nheads, stride_dt_tok, stride_dt_head,
              stride_dt_bias_head, HAS_DT_BIAS: tl.constexpr, BLOCK_SIZE_H: tl.constexpr,
              CHUNK_SIZE: tl.constexpr):
    """The chunk of a program of grid (num_chunks, cdiv(nheads, BLOCK_SIZE_H)),
    the whole chunk one tile: ``(chunk, offs_h, offs_l, start, valid, mask_h,
    in_chunk, dt)``, dt the chunk's dt + dt_bias, (L, BLOCK_SIZE_H) float32
    (0 past the chunk's end)."""
    chunk = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_SIZE_H + tl.arange(0, BLOCK_SIZE_H)
    start, length, valid = chunk_bounds(cu_chunk_ptr, chunk, num_tokens, CHUNK_SIZE)
    offs_l = tl.arange(0, CHUNK_SIZE)
    mask_h = offs_h < nheads
    in_chunk = (offs_l < length)[:, None] & mask_h[None, :]
    dt = tl.load(dt_ptr + (start + offs_l)[:, None] * stride_dt_tok + offs_h[None, :] * stride_dt_head,
                 mask=in_chunk, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + offs_h * stride_dt_bias_head, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    return chunk, offs_h, offs_l, start, valid, mask_h, in_chunk, dt


@triton.heuristics(platform.given_flags(HAS_DT_BIAS="dt_bias_ptr"))
@triton.jit
def _chunk_cumsum_kernel(
    dt_ptr, A_ptr, dt_bias_ptr, cu_chunk_ptr, dA_cumsum_ptr, dt_out_ptr, num_tokens, nheads,
    dt_min, dt_max, stride_dt_tok, stride_dt_head, stride_A_head, stride_dt_bias_head,
    stride_out_head, stride_out_chunk, stride_out_pos,
    DT_SOFTPLUS: tl.constexpr, HAS_DT_BIAS: tl.constexpr, HAS_DT_LIMIT: tl.constexpr,
    BLOCK_SIZE_H: tl.constexpr, CHUNK_SIZE: tl.constexpr,
):
    """Grid (num_chunks, cdiv(nheads, BLOCK_SIZE_H)): the whole chunk is one tile."""
    chunk, offs_h, offs_l, start, valid, mask_h, in_chunk, dt = _chunk_dt(
        dt_ptr, dt_bias_ptr, cu_chunk_ptr, num_tokens, nheads, stride_dt_tok, stride_dt_head,
        stride_dt_bias_head, HAS_DT_BIAS, BLOCK_SIZE_H, CHUNK_SIZE)
    if DT_SOFTPLUS:
        dt = softplus(dt)
    if HAS_DT_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    dt = tl.where(in_chunk, dt, 0.0)  # padding positions add no decay
    A = tl.load(A_ptr + offs_h * stride_A_head, mask=mask_h, other=0.0).to(tl.float32)
    dA_cumsum = tl.cumsum(dt * A[None, :], axis=0)
    dA_cumsum = tl.where(valid, dA_cumsum, float("nan"))  # poisons the chunk's state and outputs
    out_offsets = (offs_h[None, :] * stride_out_head + chunk * stride_out_chunk
                   + offs_l[:, None] * stride_out_pos)
    tl.store(dt_out_ptr + out_offsets, dt, mask=mask_h[None, :])
    tl.store(dA_cumsum_ptr + out_offsets, dA_cumsum, mask=mask_h[None, :])


def chunk_cumsum(dt, A, chunk_size, cu_chunk_seqlens, dt_bias=None, dt_softplus=False,
                 dt_limit=(0.0, math.inf)):
    """dt (T, H), A (H,), dt_bias (H,) -> (dA_cumsum, dt_out), each (H, K, L) float32."""
    num_tokens, nheads = dt.shape
    num_chunks = cu_chunk_seqlens.shape[0] - 1
    dA_cumsum = torch.empty(nheads, num_chunks, chunk_size, device=dt.device, dtype=torch.float32)
    dt_out = torch.empty_like(dA_cumsum)
    config = launch_config("chunk_cumsum", dt.device)
    block_h = clip_block(nheads, config.BLOCK_SIZE_H)
    grid = (num_chunks, platform.cdiv(nheads, block_h))
    launch(
        _chunk_cumsum_kernel, grid, config,
        dt, A, dt_bias, cu_chunk_seqlens, dA_cumsum, dt_out,
        num_tokens, nheads, float(dt_limit[0]), float(dt_limit[1]),
        *dt.stride(), *A.stride(), *platform.strides(dt_bias, 1), *dA_cumsum.stride(),
        DT_SOFTPLUS=bool(dt_softplus), HAS_DT_LIMIT=tuple(dt_limit) != (0.0, math.inf),
        BLOCK_SIZE_H=block_h, CHUNK_SIZE=chunk_size)
    return dA_cumsum, dt_out


@triton.heuristics(platform.given_flags(HAS_Z="z_ptr", HAS_DT="dt_out_ptr"))
@triton.jit
def _chunk_state_kernel(
    u_ptr, z_ptr, v_ptr, dt_out_ptr, dA_cumsum_ptr, cu_chunk_ptr, out_ptr,
    num_tokens, size_m, size_n, heads_per_group,
    stride_u_tok, stride_u_head, stride_u_dim, stride_z_tok, stride_z_head, stride_z_dim,
    stride_v_tok, stride_v_group, stride_v_dstate, stride_dA_head, stride_dA_chunk, stride_dA_pos,
    stride_out_chunk, stride_out_head, stride_out_dim, stride_out_dstate,
    HAS_Z: tl.constexpr, HAS_DT: tl.constexpr, DOT_DTYPE: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
):
    """Grid (num_chunks, nheads, cdiv(M, BM) * cdiv(N, BN)): one (BM, BN)
    tile of sum_k u_k^T (v_k scale_k) over a chunk's tokens, K at a time,
    u (T, H, M) (times silu(z) when given), v (T, G, N), the products in
    DOT_DTYPE. With dt_out (stage 2, the chunk's own state): u = x, v = B,
    scale_k = exp(a_last - a_k) dt_k; without (the backward's dS_prev):
    u = dout, z given, v = C, scale_k = exp(a_k)."""
    chunk = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_m, offs_n = tile_offsets(tl.program_id(2), size_n, BLOCK_SIZE_M, BLOCK_SIZE_N)
    group = head // heads_per_group
    start, length, _ = chunk_bounds(cu_chunk_ptr, chunk, num_tokens, CHUNK_SIZE)
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    dA_ptr = dA_cumsum_ptr + head * stride_dA_head + chunk * stride_dA_chunk
    if HAS_DT:
        dt_ptr = dt_out_ptr + head * stride_dA_head + chunk * stride_dA_chunk
        dA_last = tl.load(dA_ptr + (CHUNK_SIZE - 1) * stride_dA_pos)

    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k in range(0, length, BLOCK_SIZE_K):
        tok = k + offs_k
        in_chunk = tok < length
        u_t = gated_dout(u_ptr, z_ptr, (start + tok)[None, :], head, offs_m[:, None],
                         stride_u_tok, stride_u_head, stride_u_dim, stride_z_tok, stride_z_head,
                         stride_z_dim, (offs_m < size_m)[:, None] & in_chunk[None, :], HAS_Z)
        v = tl.load(v_ptr + (start + tok)[:, None] * stride_v_tok + group * stride_v_group
                    + offs_n[None, :] * stride_v_dstate,
                    mask=in_chunk[:, None] & (offs_n < size_n)[None, :], other=0.0).to(tl.float32)
        dA = tl.load(dA_ptr + tok * stride_dA_pos, mask=in_chunk, other=0.0)
        if HAS_DT:
            dt = tl.load(dt_ptr + tok * stride_dA_pos, mask=in_chunk, other=0.0)
            scale = tl.where(in_chunk, tl.exp(dA_last - dA) * dt, 0.0)
        else:
            scale = tl.exp(dA)
        acc += tile_dot(u_t.to(DOT_DTYPE), (v * scale[:, None]).to(DOT_DTYPE), DOT_PRECISION)

    tl.store(out_ptr + chunk * stride_out_chunk + head * stride_out_head
             + offs_m[:, None] * stride_out_dim + offs_n[None, :] * stride_out_dstate,
             acc, mask=(offs_m < size_m)[:, None] & (offs_n < size_n)[None, :])


def chunk_state_sum(stage, u, z, v, dt_out, dA_cumsum, cu_chunk_seqlens, dot_dtype):
    """``_chunk_state_kernel`` with ``stage``'s config: u, z (T, H, M), v
    (T, G, N), dt_out or None, dA_cumsum (H, K, L) -> (K, H, M, N) float32."""
    num_tokens, nheads, size_m = u.shape
    ngroups, size_n = v.shape[1:]
    _, num_chunks, chunk_size = dA_cumsum.shape
    out = torch.empty(num_chunks, nheads, size_m, size_n, device=u.device, dtype=torch.float32)
    launch_tiles(
        _chunk_state_kernel, stage, u.device, lambda tiles: (num_chunks, nheads, tiles),
        size_m, size_n, chunk_size,
        u, z, v, dt_out, dA_cumsum, cu_chunk_seqlens, out, num_tokens, size_m, size_n,
        nheads // ngroups, *u.stride(), *platform.strides(z, 3), *v.stride(), *dA_cumsum.stride(),
        *out.stride(),
        DOT_DTYPE=TL_DTYPES[dot_dtype], CHUNK_SIZE=chunk_size, DOT_PRECISION=dot_precision(dot_dtype))
    return out


def chunk_state(B, x, dt_out, dA_cumsum, cu_chunk_seqlens):
    """B (T, G, N), x (T, H, P), dt_out / dA_cumsum (H, K, L) -> chunk_states
    (K, H, P, N) float32: each chunk's state from a zero start."""
    return chunk_state_sum("chunk_state", x, None, B, dt_out, dA_cumsum, cu_chunk_seqlens, x.dtype)


# --- The backward (training) --------------------------------------------------------

@triton.heuristics(platform.given_flags(HAS_DT_BIAS="dt_bias_ptr"))
@triton.jit
def _chunk_cumsum_bwd_kernel(
    dt_ptr, A_ptr, dt_bias_ptr, cu_chunk_ptr, dt_out_ptr, ddt_x_ptr, ddA_j_ptr, ddA_i_ptr,
    dlast_ptr, dlast_state_ptr, ddt_ptr, dA_part_ptr, ddt_bias_part_ptr,
    num_tokens, nheads, dt_min, dt_max,
    stride_dt_tok, stride_dt_head, stride_A_head, stride_dt_bias_head,
    stride_b_head, stride_b_chunk, stride_b_pos,
    stride_ls_head, stride_ls_chunk,
    stride_ddt_tok, stride_ddt_head, stride_part_chunk,
    DT_SOFTPLUS: tl.constexpr, HAS_DT_BIAS: tl.constexpr, HAS_DT_LIMIT: tl.constexpr,
    BLOCK_SIZE_H: tl.constexpr, CHUNK_SIZE: tl.constexpr,
):
    """Grid (num_chunks, cdiv(nheads, BLOCK_SIZE_H)): the whole chunk is one
    tile. With da_i = ddA_j + ddA_i and d a_last = sum_j dlast_j + dlast_state:
    r_k = sum_{i >= k} da_i + d a_last, ddt_k = ddt_x_k + A r_k, dA += sum_k
    dt_k r_k; then back through the clamp and softplus to the raw dt."""
    chunk, offs_h, offs_l, start, _, mask_h, in_chunk, raw = _chunk_dt(
        dt_ptr, dt_bias_ptr, cu_chunk_ptr, num_tokens, nheads, stride_dt_tok, stride_dt_head,
        stride_dt_bias_head, HAS_DT_BIAS, BLOCK_SIZE_H, CHUNK_SIZE)
    buf = offs_h[None, :] * stride_b_head + chunk * stride_b_chunk + offs_l[:, None] * stride_b_pos
    da = (tl.load(ddA_j_ptr + buf, mask=in_chunk, other=0.0)
          + tl.load(ddA_i_ptr + buf, mask=in_chunk, other=0.0))
    d_last = (tl.sum(tl.load(dlast_ptr + buf, mask=in_chunk, other=0.0), axis=0)
              + tl.load(dlast_state_ptr + offs_h * stride_ls_head + chunk * stride_ls_chunk,
                        mask=mask_h, other=0.0))
    r = tl.cumsum(da, axis=0, reverse=True) + d_last[None, :]
    A = tl.load(A_ptr + offs_h * stride_A_head, mask=mask_h, other=0.0).to(tl.float32)
    dt = tl.load(dt_out_ptr + buf, mask=in_chunk, other=0.0)
    ddt = tl.load(ddt_x_ptr + buf, mask=in_chunk, other=0.0) + A[None, :] * r
    ddt = tl.where(in_chunk, ddt, 0.0)
    tl.store(dA_part_ptr + chunk * stride_part_chunk + offs_h,
             tl.sum(tl.where(in_chunk, dt * r, 0.0), axis=0), mask=mask_h)
    if HAS_DT_LIMIT:  # torch.clamp's gradient: through where dt_min <= value <= dt_max
        value = raw
        if DT_SOFTPLUS:
            value = softplus(raw)
        ddt = tl.where((value >= dt_min) & (value <= dt_max), ddt, 0.0)
    if DT_SOFTPLUS:
        ddt = tl.where(raw <= 20.0, ddt * tl.sigmoid(raw), ddt)
    tl.store(ddt_ptr + (start + offs_l)[:, None] * stride_ddt_tok + offs_h[None, :] * stride_ddt_head,
             ddt.to(ddt_ptr.dtype.element_ty), mask=in_chunk)
    if HAS_DT_BIAS:
        tl.store(ddt_bias_part_ptr + chunk * stride_part_chunk + offs_h, tl.sum(ddt, axis=0), mask=mask_h)


def chunk_cumsum_bwd(dt, A, dt_bias, cu_chunk_seqlens, dt_out, ddt_x, ddA_j, ddA_i, dlast,
                     dlast_state, dt_softplus=False, dt_limit=(0.0, math.inf)):
    """The decay's gradient back to dt, A and dt_bias: dt (T, H), A, dt_bias
    (H,), the (H, K, L) float32 partials of stage 4 and dlast_state (H, K)
    -> (ddt like dt, dA (H,) float32, d dt_bias (H,) float32 or None)."""
    num_tokens, nheads = dt.shape
    _, num_chunks, chunk_size = dt_out.shape
    ddt = torch.zeros_like(dt)  # tokens outside every chunk (malformed metadata) get 0
    dA_part = torch.empty(num_chunks, nheads, device=dt.device, dtype=torch.float32)
    ddt_bias_part = None if dt_bias is None else torch.empty_like(dA_part)
    config = launch_config("chunk_cumsum_bwd", dt.device)
    block_h = clip_block(nheads, config.BLOCK_SIZE_H)
    launch(
        _chunk_cumsum_bwd_kernel, (num_chunks, platform.cdiv(nheads, block_h)), config,
        dt, A, dt_bias, cu_chunk_seqlens, dt_out, ddt_x, ddA_j, ddA_i, dlast, dlast_state, ddt,
        dA_part, ddt_bias_part, num_tokens, nheads, float(dt_limit[0]), float(dt_limit[1]),
        *dt.stride(), *A.stride(), *platform.strides(dt_bias, 1), *dt_out.stride(),
        *dlast_state.stride(), *ddt.stride(), dA_part.stride(0),
        DT_SOFTPLUS=bool(dt_softplus), HAS_DT_LIMIT=tuple(dt_limit) != (0.0, math.inf),
        BLOCK_SIZE_H=block_h, CHUNK_SIZE=chunk_size)
    return ddt, dA_part.sum(0), (None if ddt_bias_part is None else ddt_bias_part.sum(0))
