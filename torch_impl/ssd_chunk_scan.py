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
from torch_impl.ssd_chunk_state import chunk_state_sum
from torch_impl.ssd_common import (
    chunk_bounds, dot_precision, gated_dout, launch, launch_config, launch_tiles, sequence_of,
    tile_dot, tile_offsets)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.heuristics(platform.given_flags(HAS_D="D_ptr", HAS_Z="z_ptr",
                                        HAS_INITIAL_STATES="initial_states_ptr", HAS_Y="y_ptr"))
@triton.jit
def _chunk_scan_kernel(
    CB_ptr, x_ptr, dt_out_ptr, dA_cumsum_ptr, C_ptr, end_states_ptr, seq_idx_ptr, cu_chunk_ptr,
    D_ptr, z_ptr, initial_states_ptr, out_ptr, y_ptr,
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
    HAS_Y: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
        if HAS_Y:  # the pre-gate output, saved for the backward (same strides as out)
            tl.store(y_ptr + (start + offs_m)[:, None] * stride_out_tok + head * stride_out_head
                     + offs_n[None, :] * stride_out_dim, acc.to(y_ptr.dtype.element_ty), mask=tile)
        if HAS_Z:
            z = tl.load(z_ptr + (start + offs_m)[:, None] * stride_z_tok + head * stride_z_head
                        + offs_n[None, :] * stride_z_dim, mask=tile, other=0.0).to(tl.float32)
            acc *= z * tl.sigmoid(z)
        tl.store(out_ptr + (start + offs_m)[:, None] * stride_out_tok + head * stride_out_head
                 + offs_n[None, :] * stride_out_dim, acc.to(out_ptr.dtype.element_ty), mask=tile)


def chunk_scan(CB, x, dt_out, dA_cumsum, C, end_states, cu_chunk_seqlens, seq_idx, num_seqs,
               D=None, z=None, initial_states=None, out=None, y=None):
    """CB (K, G, L, L), x (T, H, P), dt_out / dA_cumsum (H, K, L), C (T, G, N),
    end_states (K, H, P, N), seq_idx (K,) in [0, num_seqs), D (H,) or (H, P),
    z (T, H, P), initial_states (Q, H, P, N) -> out (T, H, P), written in
    place when given; ``y`` (laid out like ``out``), when given, gets the
    output before the z gate (the backward's saved tensor)."""
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
        out, y, num_tokens, num_seqs, headdim, dstate, nheads // ngroups,
        *CB.stride(), *x.stride(), *dA_cumsum.stride(), *C.stride(), *end_states.stride(),
        *platform.strides(initial_states, 4), *platform.strides(D, 2), *platform.strides(z, 3),
        *out.stride(),
        DOT_PRECISION=dot_precision(x.dtype), BLOCK_SIZE_DSTATE=clip_block(dstate),
        CHUNK_SIZE=chunk_size)
    return out


# --- The backward (training) --------------------------------------------------------
# Notation of ``ssd_combined``'s backward docstring: per chunk c and head h,
# a_i = dA_cumsum, dt_j = dt_out, dy = dout * silu(z) (the gate undone), S_prev
# the state the chunk starts from, G_c = dL/d(end state of chunk c).

def chunk_scan_bwd_dstates(dout, z, C, dA_cumsum, cu_chunk_seqlens, nheads, headdim):
    """dout, z (T, H, P), C (T, G, N), dA_cumsum (H, K, L) -> dS_prev (K, H, P, N)
    float32: the gradient of each chunk's start state from the outputs,
    sum_i exp(a_i) dy_i (x) C_i (stage 2's kernel without dt)."""
    return chunk_state_sum("chunk_scan_bwd_dstates", dout, z, C, None, dA_cumsum, cu_chunk_seqlens,
                           C.dtype)


@triton.jit
def _bwd_program(cu_chunk_ptr, num_tokens, heads_per_group, heads_per_program, num_splits,
                 CHUNK_SIZE: tl.constexpr, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_P: tl.constexpr,
                 BLOCK_SIZE_N: tl.constexpr):
    """What a stage-4 backward program covers (grid (cdiv(L, M), num_chunks,
    ngroups * num_splits)): ``(chunk, group, split, start, length,
    head_first, head_end, offs_m, offs_p, offs_n)``: the chunk's token
    range, the heads [head_first, head_end) of the group it walks, and the
    offsets of its block of M positions, of headdim and of dstate."""
    chunk = tl.program_id(1).to(tl.int64)
    group = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
    start, length, _ = chunk_bounds(cu_chunk_ptr, chunk, num_tokens, CHUNK_SIZE)
    head_first = group * heads_per_group + split * heads_per_program
    head_end = tl.minimum(head_first + heads_per_program, (group + 1) * heads_per_group)
    offs_m = tl.program_id(0) * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    return (chunk, group, split, start, length, head_first, head_end, offs_m,
            tl.arange(0, BLOCK_SIZE_P), tl.arange(0, BLOCK_SIZE_N))


@triton.jit
def _rows(ptr, tok, index, offs, stride_tok, stride_index, stride_col):
    """Pointers of rows ``tok`` (a column block), columns ``offs`` (a row
    block) of one head or group ``index`` of a (T, H|G, cols) tensor."""
    return ptr + tok * stride_tok + index * stride_index + offs * stride_col


@triton.heuristics(platform.given_flags(HAS_D="D_ptr", HAS_Z="z_ptr"))
@triton.jit
def _chunk_scan_bwd_kernel(
    x_ptr, B_ptr, C_ptr, dout_ptr, z_ptr, y_ptr, D_ptr, dt_out_ptr, dA_cumsum_ptr, dstates_ptr,
    cu_chunk_ptr, dx_ptr, dz_ptr, ddt_ptr, ddA_ptr, dlast_ptr, dB_ptr, dD_ptr,
    num_tokens, headdim, dstate, heads_per_group, heads_per_program, num_splits,
    stride_x_tok, stride_x_head, stride_x_dim,
    stride_B_tok, stride_B_group, stride_B_dstate, stride_C_tok, stride_C_group, stride_C_dstate,
    stride_dout_tok, stride_dout_head, stride_dout_dim, stride_z_tok, stride_z_head, stride_z_dim,
    stride_y_tok, stride_y_head, stride_y_dim,
    stride_D_head, stride_D_dim,
    stride_dA_head, stride_dA_chunk, stride_dA_pos,
    stride_ds_chunk, stride_ds_head, stride_ds_dim, stride_ds_dstate,
    stride_dx_tok, stride_dx_head, stride_dx_dim,
    stride_dz_tok, stride_dz_head, stride_dz_dim,
    stride_dB_split, stride_dB_tok, stride_dB_group, stride_dB_dstate,
    stride_dD_block, stride_dD_head,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, CHUNK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    BLOCK_SIZE_P: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
):
    """Grid (cdiv(L, M), num_chunks, ngroups * num_splits): tokens j of a
    block of M of one chunk, for heads_per_program heads of one group; the
    later tokens i >= j walked K at a time, C B^T recomputed per tile.

        U_j   = sum_{i>=j} CB_ij M_ij dy_i + exp(a_last - a_j) G_c B_j          (P)
        dx_j  = dt_j U_j + D dy_j,       ddt_j (from x) = x_j . U_j
        dB_j  = sum_{i>=j} M_ij dt_j (dy_i . x_j) C_i + dt_j exp(a_last - a_j) G_c^T x_j
        d a_j -= B_j . dB_j (per head),  v_j = dt_j exp(a_last - a_j) x_j . (G_c B_j)
    plus dz and the block's dD partial. dB summed over the program's heads
    into a float32 partial per head split."""
    j0 = tl.program_id(0) * BLOCK_SIZE_M
    chunk, group, split, start, length, head_first, head_end, offs_j, offs_p, offs_n = _bwd_program(
        cu_chunk_ptr, num_tokens, heads_per_group, heads_per_program, num_splits, CHUNK_SIZE,
        BLOCK_SIZE_M, BLOCK_SIZE_P, BLOCK_SIZE_N)
    if j0 < length:
        mask_j, mask_p, mask_n = offs_j < length, offs_p < headdim, offs_n < dstate
        tok_j = (start + offs_j)[:, None]
        tile_jp = mask_j[:, None] & mask_p[None, :]
        offs_k = tl.arange(0, BLOCK_SIZE_K)
        B_j = tl.load(_rows(B_ptr, tok_j, group, offs_n[None, :], stride_B_tok, stride_B_group,
                            stride_B_dstate), mask=mask_j[:, None] & mask_n[None, :], other=0.0)
        dB_acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
        for head in range(head_first, head_end):
            dA_ptr = dA_cumsum_ptr + head * stride_dA_head + chunk * stride_dA_chunk
            a_j = tl.load(dA_ptr + offs_j * stride_dA_pos, mask=mask_j, other=0.0)
            dt_j = tl.load(dt_out_ptr + head * stride_dA_head + chunk * stride_dA_chunk
                           + offs_j * stride_dA_pos, mask=mask_j, other=0.0)
            a_last = tl.load(dA_ptr + (CHUNK_SIZE - 1) * stride_dA_pos)
            x_j = tl.load(_rows(x_ptr, tok_j, head, offs_p[None, :], stride_x_tok, stride_x_head,
                                stride_x_dim), mask=tile_jp, other=0.0)
            # The end state's part: G_c (P, N), here as G_c^T (N, P) and G_c.
            ds_base = dstates_ptr + chunk * stride_ds_chunk + head * stride_ds_head
            G_t = tl.load(ds_base + offs_n[:, None] * stride_ds_dstate + offs_p[None, :] * stride_ds_dim,
                          mask=mask_n[:, None] & mask_p[None, :], other=0.0)
            to_end = tl.where(mask_j, tl.exp(a_last - a_j), 0.0)
            U = tile_dot(B_j, G_t.to(B_j.dtype), DOT_PRECISION) * to_end[:, None]        # (M, P)
            dB_h = tile_dot(x_j, tl.trans(G_t).to(x_j.dtype), DOT_PRECISION) * (to_end * dt_j)[:, None]
            v_j = dt_j * tl.sum(x_j.to(tl.float32) * U, axis=1)
            # The chunk's later tokens i >= j.
            for i0 in range(j0, length, BLOCK_SIZE_K):
                offs_i = i0 + offs_k
                mask_i = offs_i < length
                C_t = tl.load(_rows(C_ptr, (start + offs_i)[None, :], group, offs_n[:, None],
                                    stride_C_tok, stride_C_group, stride_C_dstate),
                              mask=mask_n[:, None] & mask_i[None, :], other=0.0)          # (N, K)
                a_i = tl.load(dA_ptr + offs_i * stride_dA_pos, mask=mask_i, other=0.0)
                dy_i = gated_dout(dout_ptr, z_ptr, (start + offs_i)[:, None], head, offs_p[None, :],
                                  stride_dout_tok, stride_dout_head, stride_dout_dim, stride_z_tok,
                                  stride_z_head, stride_z_dim, mask_i[:, None] & mask_p[None, :], HAS_Z)
                causal = (offs_i[None, :] >= offs_j[:, None]) & mask_i[None, :] & mask_j[:, None]
                decay = tl.where(causal, tl.exp(a_i[None, :] - a_j[:, None]), 0.0)        # (M, K)
                CB_t = tile_dot(B_j, C_t.to(B_j.dtype), DOT_PRECISION)                   # B_j . C_i
                U += tile_dot((CB_t * decay).to(x_j.dtype), dy_i.to(x_j.dtype), DOT_PRECISION)
                dyx = tile_dot(x_j, tl.trans(dy_i).to(x_j.dtype), DOT_PRECISION)          # x_j . dy_i
                dB_h += tile_dot((dyx * decay * dt_j[:, None]).to(C_t.dtype), tl.trans(C_t),
                                 DOT_PRECISION)
            dy_j = gated_dout(dout_ptr, z_ptr, tok_j, head, offs_p[None, :], stride_dout_tok,
                              stride_dout_head, stride_dout_dim, stride_z_tok, stride_z_head,
                              stride_z_dim, tile_jp, HAS_Z)
            x_f = x_j.to(tl.float32)
            dx = U * dt_j[:, None]
            if HAS_D:
                D = tl.load(D_ptr + head * stride_D_head + offs_p * stride_D_dim, mask=mask_p,
                            other=0.0).to(tl.float32)
                dx += dy_j * D[None, :]
                tl.store(dD_ptr + (chunk * tl.num_programs(0) + tl.program_id(0)) * stride_dD_block
                         + head * stride_dD_head + offs_p, tl.sum(dy_j * x_f, axis=0), mask=mask_p)
            tl.store(_rows(dx_ptr, tok_j, head, offs_p[None, :], stride_dx_tok, stride_dx_head,
                           stride_dx_dim), dx.to(dx_ptr.dtype.element_ty), mask=tile_jp)
            if HAS_Z:
                dout = tl.load(_rows(dout_ptr, tok_j, head, offs_p[None, :], stride_dout_tok,
                                     stride_dout_head, stride_dout_dim), mask=tile_jp, other=0.0)
                z = tl.load(_rows(z_ptr, tok_j, head, offs_p[None, :], stride_z_tok, stride_z_head,
                                  stride_z_dim), mask=tile_jp, other=0.0).to(tl.float32)
                y = tl.load(_rows(y_ptr, tok_j, head, offs_p[None, :], stride_y_tok, stride_y_head,
                                  stride_y_dim), mask=tile_jp, other=0.0).to(tl.float32)
                sig = tl.sigmoid(z)
                dz = dout.to(tl.float32) * y * sig * (1.0 + z * (1.0 - sig))
                tl.store(_rows(dz_ptr, tok_j, head, offs_p[None, :], stride_dz_tok, stride_dz_head,
                               stride_dz_dim), dz.to(dz_ptr.dtype.element_ty), mask=tile_jp)
            pos = head * stride_dA_head + chunk * stride_dA_chunk + offs_j * stride_dA_pos
            tl.store(ddt_ptr + pos, tl.sum(x_f * U, axis=1), mask=mask_j)
            tl.store(ddA_ptr + pos, -tl.sum(B_j.to(tl.float32) * dB_h, axis=1), mask=mask_j)
            tl.store(dlast_ptr + pos, v_j, mask=mask_j)
            dB_acc += dB_h
        tl.store(_rows(dB_ptr + split.to(tl.int64) * stride_dB_split, tok_j, group, offs_n[None, :],
                       stride_dB_tok, stride_dB_group, stride_dB_dstate), dB_acc,
                 mask=mask_j[:, None] & mask_n[None, :])


@triton.heuristics(platform.given_flags(HAS_Z="z_ptr", HAS_INITIAL_STATES="initial_states_ptr"))
@triton.jit
def _chunk_scan_bwd_dC_kernel(
    x_ptr, B_ptr, C_ptr, dout_ptr, z_ptr, dt_out_ptr, dA_cumsum_ptr, end_states_ptr,
    initial_states_ptr, seq_idx_ptr, cu_chunk_ptr, ddA_ptr, dC_ptr,
    num_tokens, num_seqs, headdim, dstate, heads_per_group, heads_per_program, num_splits,
    stride_x_tok, stride_x_head, stride_x_dim,
    stride_B_tok, stride_B_group, stride_B_dstate, stride_C_tok, stride_C_group, stride_C_dstate,
    stride_dout_tok, stride_dout_head, stride_dout_dim, stride_z_tok, stride_z_head, stride_z_dim,
    stride_dA_head, stride_dA_chunk, stride_dA_pos,
    stride_es_chunk, stride_es_head, stride_es_dim, stride_es_dstate,
    stride_init_seq, stride_init_head, stride_init_dim, stride_init_dstate,
    stride_dC_split, stride_dC_tok, stride_dC_group, stride_dC_dstate,
    HAS_Z: tl.constexpr, HAS_INITIAL_STATES: tl.constexpr, CHUNK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    BLOCK_SIZE_P: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
):
    """Grid (cdiv(L, M), num_chunks, ngroups * num_splits): tokens i of a
    block of M of one chunk, earlier tokens j <= i walked K at a time:

        dC_i  = sum_{j<=i} M_ij dt_j (dy_i . x_j) B_j + exp(a_i) S_prev^T dy_i
        d a_i += C_i . dC_i (per head: the intra-chunk and start-state terms)
    dC summed over the program's heads into a float32 partial per head split."""
    i0 = tl.program_id(0) * BLOCK_SIZE_M
    chunk, group, split, start, length, head_first, head_end, offs_i, offs_p, offs_n = _bwd_program(
        cu_chunk_ptr, num_tokens, heads_per_group, heads_per_program, num_splits, CHUNK_SIZE,
        BLOCK_SIZE_M, BLOCK_SIZE_P, BLOCK_SIZE_N)
    # The start state: the previous chunk's end state or the sequence's initial state.
    seq, row, seq_ok = sequence_of(seq_idx_ptr, chunk, num_seqs)
    previous_seq = tl.load(seq_idx_ptr + tl.maximum(chunk - 1, 0)).to(tl.int64)
    continues = (chunk > 0) & (seq == previous_seq)
    if i0 < length:
        mask_i, mask_p, mask_n = offs_i < length, offs_p < headdim, offs_n < dstate
        offs_k = tl.arange(0, BLOCK_SIZE_K)
        tok_i = (start + offs_i)[:, None]
        state_mask = mask_p[:, None] & mask_n[None, :]
        C_i = tl.load(_rows(C_ptr, tok_i, group, offs_n[None, :], stride_C_tok, stride_C_group,
                            stride_C_dstate), mask=mask_i[:, None] & mask_n[None, :], other=0.0)
        dC_acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
        for head in range(head_first, head_end):
            dA_ptr = dA_cumsum_ptr + head * stride_dA_head + chunk * stride_dA_chunk
            dt_ptr = dt_out_ptr + head * stride_dA_head + chunk * stride_dA_chunk
            a_i = tl.load(dA_ptr + offs_i * stride_dA_pos, mask=mask_i, other=0.0)
            dy_i = gated_dout(dout_ptr, z_ptr, tok_i, head, offs_p[None, :], stride_dout_tok,
                              stride_dout_head, stride_dout_dim, stride_z_tok, stride_z_head,
                              stride_z_dim, mask_i[:, None] & mask_p[None, :], HAS_Z)
            # The start state's part (the forward's start(c), as ``chunk_scan`` reads it).
            if continues:
                S_prev = tl.load(end_states_ptr + (chunk - 1) * stride_es_chunk + head * stride_es_head
                                 + offs_p[:, None] * stride_es_dim + offs_n[None, :] * stride_es_dstate,
                                 mask=state_mask, other=0.0).to(tl.float32)
            elif HAS_INITIAL_STATES:
                S_prev = tl.load(initial_states_ptr + row * stride_init_seq + head * stride_init_head
                                 + offs_p[:, None] * stride_init_dim + offs_n[None, :] * stride_init_dstate,
                                 mask=state_mask & seq_ok, other=0.0).to(tl.float32)
            else:
                S_prev = tl.zeros((BLOCK_SIZE_P, BLOCK_SIZE_N), dtype=tl.float32)
            dC_h = tile_dot(dy_i.to(C_i.dtype), S_prev.to(C_i.dtype), DOT_PRECISION)
            dC_h *= tl.where(mask_i, tl.exp(a_i), 0.0)[:, None]
            for j0 in range(0, tl.minimum(i0 + BLOCK_SIZE_M, length), BLOCK_SIZE_K):
                offs_j = j0 + offs_k
                mask_j = offs_j < length
                x_t = tl.load(_rows(x_ptr, (start + offs_j)[None, :], head, offs_p[:, None],
                                    stride_x_tok, stride_x_head, stride_x_dim),
                              mask=mask_p[:, None] & mask_j[None, :], other=0.0)            # (P, K)
                B_j = tl.load(_rows(B_ptr, (start + offs_j)[:, None], group, offs_n[None, :],
                                    stride_B_tok, stride_B_group, stride_B_dstate),
                              mask=mask_j[:, None] & mask_n[None, :], other=0.0)
                a_j = tl.load(dA_ptr + offs_j * stride_dA_pos, mask=mask_j, other=0.0)
                dt_j = tl.load(dt_ptr + offs_j * stride_dA_pos, mask=mask_j, other=0.0)
                causal = (offs_i[:, None] >= offs_j[None, :]) & mask_j[None, :] & mask_i[:, None]
                decay = tl.where(causal, tl.exp(a_i[:, None] - a_j[None, :]), 0.0)           # (M, K)
                dyx = tile_dot(dy_i.to(x_t.dtype), x_t, DOT_PRECISION)                       # dy_i . x_j
                dC_h += tile_dot((dyx * decay * dt_j[None, :]).to(B_j.dtype), B_j, DOT_PRECISION)
            tl.store(ddA_ptr + head * stride_dA_head + chunk * stride_dA_chunk + offs_i * stride_dA_pos,
                     tl.sum(C_i.to(tl.float32) * dC_h, axis=1), mask=mask_i)
            dC_acc += dC_h
        tl.store(_rows(dC_ptr + split.to(tl.int64) * stride_dC_split, tok_i, group, offs_n[None, :],
                       stride_dC_tok, stride_dC_group, stride_dC_dstate), dC_acc,
                 mask=mask_i[:, None] & mask_n[None, :])


# The stage-4 kernels' programs each loop over heads of one group, summing
# dB / dC over them in registers; a group's heads are split over several
# programs (one float32 partial per split, reduced after) only as far as
# needed for about TARGET_PROGRAMS programs: long prefills get one split
# (no partial buffers beyond one), short ones enough programs to fill the GPU.
# HEADS_PER_PROGRAM, when set, pins the heads per program (tests).
TARGET_PROGRAMS = 1024
HEADS_PER_PROGRAM = None


def _head_splits(stage, x, B, dA_cumsum):
    """``(heads per program, splits of a group's heads, the float32 (splits,
    T, G, N) partial sums)`` of a stage-4 launch."""
    num_tokens, nheads = x.shape[:2]
    ngroups, dstate = B.shape[1:]
    num_chunks, chunk_size = dA_cumsum.shape[1:]
    heads_per_group = nheads // ngroups
    per_program = HEADS_PER_PROGRAM
    if per_program is None:
        block_m = clip_block(chunk_size, launch_config(stage, x.device).BLOCK_SIZE_M)
        programs = platform.cdiv(chunk_size, block_m) * num_chunks * ngroups
        splits = min(heads_per_group, max(1, platform.cdiv(TARGET_PROGRAMS, programs)))
        per_program = platform.cdiv(heads_per_group, splits)
    per_program = max(1, min(per_program, heads_per_group))
    splits = platform.cdiv(heads_per_group, per_program)
    partial = torch.empty(splits, num_tokens, ngroups, dstate, device=x.device, dtype=torch.float32)
    return per_program, splits, partial


def _scan_bwd_launch(stage, kernel, x, B, dA_cumsum, splits, *args, **meta):
    """Launch a stage-4 kernel over (cdiv(L, M), K, G * splits) programs."""
    num_chunks, chunk_size = dA_cumsum.shape[1:]
    config = launch_config(stage, x.device)
    block_m = clip_block(chunk_size, config.BLOCK_SIZE_M)
    launch(kernel, (platform.cdiv(chunk_size, block_m), num_chunks, B.shape[1] * splits), config,
           *args, BLOCK_SIZE_M=block_m, BLOCK_SIZE_K=clip_block(chunk_size, config.BLOCK_SIZE_K),
           CHUNK_SIZE=chunk_size, DOT_PRECISION=dot_precision(x.dtype),
           BLOCK_SIZE_P=clip_block(x.shape[2]), BLOCK_SIZE_N=clip_block(B.shape[2]), **meta)


def chunk_scan_bwd(x, B, C, dout, z, y, D, dt_out, dA_cumsum, dstates, cu_chunk_seqlens):
    """Stage 4, the later-token side (see the kernel). x, dout, z, y (T, H,
    P), B, C (T, G, N), D (H,) or (H, P), dt_out / dA_cumsum (H, K, L),
    dstates = G (K, H, P, N) -> (dx like x, dz like z or None, ddt_x, ddA,
    dlast (H, K, L) float32, dB (T, G, N) float32, dD like D (float32) or None).
    Positions past a chunk's end in the (H, K, L) results are unset."""
    per_program, splits, dB = _head_splits("chunk_scan_bwd", x, B, dA_cumsum)
    num_tokens, nheads, headdim = x.shape
    dx = torch.empty_like(x)
    dz = None if z is None else torch.empty_like(z)
    ddt_x = torch.empty_like(dA_cumsum)
    ddA = torch.empty_like(dA_cumsum)
    dlast = torch.empty_like(dA_cumsum)
    D2 = None if D is None else (D.unsqueeze(1).expand(nheads, headdim) if D.dim() == 1 else D)
    num_chunks, chunk_size = dA_cumsum.shape[1:]
    config = launch_config("chunk_scan_bwd", x.device)
    num_blocks = platform.cdiv(chunk_size, clip_block(chunk_size, config.BLOCK_SIZE_M))
    dD = None if D is None else torch.zeros(num_chunks * num_blocks, nheads, headdim,
                                            device=x.device, dtype=torch.float32)
    _scan_bwd_launch(
        "chunk_scan_bwd", _chunk_scan_bwd_kernel, x, B, dA_cumsum, splits,
        x, B, C, dout, z, y if z is not None else None, D2, dt_out, dA_cumsum, dstates,
        cu_chunk_seqlens, dx, dz, ddt_x, ddA, dlast, dB, dD,
        num_tokens, headdim, B.shape[2], nheads // B.shape[1], per_program, splits,
        *x.stride(), *B.stride(), *C.stride(), *dout.stride(), *platform.strides(z, 3),
        *platform.strides(y if z is not None else None, 3), *platform.strides(D2, 2),
        *dA_cumsum.stride(), *dstates.stride(), *dx.stride(), *platform.strides(dz, 3), *dB.stride(),
        *(platform.strides(dD, 3)[:2]))
    dB = dB.sum(0) if splits > 1 else dB[0]
    if dD is not None:
        dD = dD.sum(0)
        dD = dD.sum(1) if D.dim() == 1 else dD
    return dx, dz, ddt_x, ddA, dlast, dB, dD


def chunk_scan_bwd_dC(x, B, C, dout, z, dt_out, dA_cumsum, end_states, initial_states,
                      cu_chunk_seqlens, seq_idx, num_seqs):
    """Stage 4, the earlier-token side (see the kernel) -> (dC (T, G, N)
    float32, ddA (H, K, L) float32: C_i . dC_i per head)."""
    per_program, splits, dC = _head_splits("chunk_scan_bwd_dC", x, B, dA_cumsum)
    ddA = torch.empty_like(dA_cumsum)
    _scan_bwd_launch(
        "chunk_scan_bwd_dC", _chunk_scan_bwd_dC_kernel, x, B, dA_cumsum, splits,
        x, B, C, dout, z, dt_out, dA_cumsum, end_states, initial_states, seq_idx, cu_chunk_seqlens,
        ddA, dC, x.shape[0], num_seqs, x.shape[2], B.shape[2], x.shape[1] // B.shape[1],
        per_program, splits,
        *x.stride(), *B.stride(), *C.stride(), *dout.stride(), *platform.strides(z, 3),
        *dA_cumsum.stride(), *end_states.stride(), *platform.strides(initial_states, 4),
        *dC.stride())
    return (dC.sum(0) if splits > 1 else dC[0]), ddA
