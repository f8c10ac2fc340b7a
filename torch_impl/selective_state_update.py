"""Selective state update (one Mamba-2 decode step on a cached state) as a
Triton kernel, with its launcher and launch-config lookup.

Per (sequence q, head h, token t) with dt already biased and softplus-ed:

    state[h] = exp(A[h] * dt) * state[h] + dt * x[:, None] * B[g(h)][None, :]
    out[t, h] = state[h] @ C[g(h)] + D[h] * x, then * z * sigmoid(z) when z is given

Shapes and argument rules: ``bridge.spec.ssu_contract``. The mirror of this file
is ``jax_impl/selective_state_update.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bridge.spec import launch_config as lc
from bridge.spec.ssu_contract import (
    NULL_BLOCK_ID, check_ssu_args, check_ssu_index_values, philox_rounds)
from torch_impl import platform

import triton  # noqa: E402  (after platform, which may set TRITON_INTERPRET)
import triton.language as tl  # noqa: E402

SSU_CONFIGS = lc.LaunchConfigTable(
    "triton", "selective_state_update", Path(__file__).parent / "configs",
    lc.default_ssu_launch_config)


def get_ssm_config_file_name(headdim: int, dstate: int, cache_dtype: str, device_name: str) -> str:
    return lc.config_file_name(headdim, dstate, cache_dtype, device_name)


def get_ssm_configs(headdim: int, dstate: int, cache_dtype: str, device_name: str | None = None):
    """Tuned {effective_batch: {"BLOCK_SIZE_M", "num_warps"}} for this GPU, or None."""
    device_name = device_name or platform.device_name(platform.default_device())
    return SSU_CONFIGS.get_configs(headdim, dstate, cache_dtype, device_name)


def try_get_optimal_ssm_config(headdim: int, dstate: int, batch: int, nheads: int,
                               cache_dtype: str, is_blackwell: bool = False,
                               device_name: str | None = None) -> tuple[int, int]:
    """(BLOCK_SIZE_M, num_warps) keyed by effective batch = batch * nheads."""
    device_name = device_name or platform.device_name(platform.default_device())
    return SSU_CONFIGS.lookup(headdim, dstate, batch, nheads, cache_dtype, device_name, is_blackwell)


override_ssm_config = SSU_CONFIGS.override
MAX_GRID_Z = 2**16 - 1  # sequences are the grid's z axis


@triton.jit
def _round_to_f16_stochastic(value, random_bits):
    """fp32 -> fp16 rounding up or down with probability proportional to the
    distance: add random bits below fp16's last mantissa bit, then truncate.
    Integer-only, so no compiler can fold a float round trip away. Unbiased
    for |value| >= 2**-24 (fp16 subnormals included); beyond the fp16 range
    the result is inf, as with round-to-nearest."""
    bits = value.to(tl.uint32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF
    exponent = ((magnitude >> 23) & 0xFF).to(tl.int32) - 127
    # fp32 mantissa bits below fp16's spacing: 13 for normals, more for subnormals.
    dropped = 13 + tl.minimum(tl.maximum(-14 - exponent, 0), 10)
    below = ((1 << dropped) - 1).to(tl.uint32)
    summed = magnitude + (random_bits & below)
    rounded = summed - (summed & below)
    rounded = tl.where(magnitude >= 0x7F800000, magnitude, rounded)  # inf and NaN unchanged
    return ((bits & 0x80000000) | rounded).to(tl.float32, bitcast=True).to(tl.float16)


@triton.jit
def _store_state(ptrs, state, mask, seed_ptr, token, head, nheads, offs_m, offs_n, dstate,
                 STOCHASTIC_ROUNDING: tl.constexpr, PHILOX_ROUNDS: tl.constexpr):
    if STOCHASTIC_ROUNDING:
        # One philox stream per (token, head) and element: counters (c0, c1).
        element = (offs_m[:, None] * dstate + offs_n[None, :]).to(tl.uint32)
        stream = (element * 0 + (token * nheads + head).to(tl.uint32))
        random_bits, _, _, _ = tl.philox(tl.load(seed_ptr), element, stream,
                                         element * 0, element * 0, PHILOX_ROUNDS)
        tl.store(ptrs, _round_to_f16_stochastic(state, random_bits), mask=mask)
    else:
        tl.store(ptrs, state.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _selective_state_update_kernel(
    state_ptr, x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, out_ptr,
    src_idx_ptr, dst_idx_ptr, num_accepted_ptr, cu_seqlens_ptr, seed_ptr,
    null_block_id, num_slots, index_columns, nheads, dim, dstate, heads_per_group,
    stride_state_slot, stride_state_head, stride_state_dim, stride_state_dstate,
    stride_x_tok, stride_x_head, stride_x_dim,
    stride_dt_tok, stride_dt_head, stride_dt_dim,
    stride_dt_bias_head, stride_dt_bias_dim,
    stride_A_head, stride_A_dim, stride_A_dstate,
    stride_B_tok, stride_B_group, stride_B_dstate,
    stride_C_tok, stride_C_group, stride_C_dstate,
    stride_D_head, stride_D_dim,
    stride_z_tok, stride_z_head, stride_z_dim,
    stride_out_tok, stride_out_head, stride_out_dim,
    stride_src_seq, stride_src_col, stride_dst_seq, stride_dst_col,
    DT_SOFTPLUS: tl.constexpr, TIE_HDIM: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_INDICES: tl.constexpr,
    IS_SPEC_DECODING: tl.constexpr, IS_VARLEN: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr, PHILOX_ROUNDS: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_DSTATE: tl.constexpr,
):
    """Grid (cdiv(dim, BLOCK_SIZE_M), nheads, num_seqs): one program holds a
    (BLOCK_SIZE_M, dstate) tile of one sequence's state for one head in
    registers across that sequence's tokens. Heads vary before sequences so
    that programs running together stream through one cache slot rather
    than touching many (measured on the H100: 2370 -> 2925 GB/s at batch 256)."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2).to(tl.int64)
    group = head // heads_per_group

    if IS_VARLEN:
        bos = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
        seqlen = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64) - bos
    else:
        bos = seq
        seqlen = 1
    if HAS_INDICES:
        first_col = 0
        if IS_SPEC_DECODING:
            # The state after the last accepted token is the one to continue from.
            first_col = tl.maximum(tl.load(num_accepted_ptr + seq).to(tl.int64) - 1, 0)
        src_slot = tl.load(src_idx_ptr + seq * stride_src_seq + first_col * stride_src_col).to(tl.int64)
        final_dst_slot = tl.load(dst_idx_ptr + seq * stride_dst_seq).to(tl.int64)
        active = src_slot != null_block_id  # padding: state and output untouched
    else:
        src_slot = seq
        final_dst_slot = seq
        active = True
    # Bad indices never touch memory; their outputs become NaN (the launcher
    # raises before this when it can see the indices).
    src_ok = (src_slot >= 0) & (src_slot < num_slots)
    final_dst_ok = (final_dst_slot >= 0) & (final_dst_slot < num_slots)
    if HAS_INDICES:
        final_dst_ok = final_dst_ok | (final_dst_slot == null_block_id)

    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    offs_n = tl.arange(0, BLOCK_SIZE_DSTATE)
    mask_m = offs_m < dim
    mask_n = offs_n < dstate
    tile_mask = mask_m[:, None] & mask_n[None, :]
    tile_offsets = (head * stride_state_head + offs_m[:, None] * stride_state_dim
                    + offs_n[None, :] * stride_state_dstate)
    load_slot = tl.where(src_ok, src_slot, 0)
    state = tl.load(state_ptr + load_slot * stride_state_slot + tile_offsets,
                    mask=tile_mask & src_ok & active, other=0.0).to(tl.float32)

    if HAS_DT_BIAS:
        if TIE_HDIM:
            dt_bias = tl.load(dt_bias_ptr + head * stride_dt_bias_head).to(tl.float32)
        else:
            dt_bias = tl.load(dt_bias_ptr + head * stride_dt_bias_head + offs_m * stride_dt_bias_dim,
                              mask=mask_m, other=0.0).to(tl.float32)
    if TIE_HDIM:
        A = tl.load(A_ptr + head * stride_A_head).to(tl.float32)
    else:
        A = tl.load(A_ptr + head * stride_A_head + offs_m[:, None] * stride_A_dim
                    + offs_n[None, :] * stride_A_dstate, mask=tile_mask, other=0.0).to(tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + head * stride_D_head + offs_m * stride_D_dim, mask=mask_m, other=0.0).to(tl.float32)

    for t in range(seqlen):
        token = bos + t
        x = tl.load(x_ptr + token * stride_x_tok + head * stride_x_head + offs_m * stride_x_dim,
                    mask=mask_m, other=0.0).to(tl.float32)
        if TIE_HDIM:
            dt = tl.load(dt_ptr + token * stride_dt_tok + head * stride_dt_head).to(tl.float32)
        else:
            dt = tl.load(dt_ptr + token * stride_dt_tok + head * stride_dt_head + offs_m * stride_dt_dim,
                         mask=mask_m, other=0.0).to(tl.float32)
        if HAS_DT_BIAS:
            dt += dt_bias
        if DT_SOFTPLUS:
            dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
        B = tl.load(B_ptr + token * stride_B_tok + group * stride_B_group + offs_n * stride_B_dstate,
                    mask=mask_n, other=0.0).to(tl.float32)
        C = tl.load(C_ptr + token * stride_C_tok + group * stride_C_group + offs_n * stride_C_dstate,
                    mask=mask_n, other=0.0).to(tl.float32)
        if TIE_HDIM:
            state = state * tl.exp(A * dt) + (dt * x)[:, None] * B[None, :]
        else:
            state = state * tl.exp(A * dt[:, None]) + (dt * x)[:, None] * B[None, :]

        token_ok = src_ok
        if IS_SPEC_DECODING:
            # Every token's state goes to its own slot (null: not kept).
            in_columns = t < index_columns
            dst_slot = tl.load(dst_idx_ptr + seq * stride_dst_seq + t * stride_dst_col,
                               mask=in_columns, other=null_block_id).to(tl.int64)
            dst_ok = (dst_slot >= 0) & (dst_slot < num_slots)
            token_ok = token_ok & in_columns & (dst_ok | (dst_slot == null_block_id))
            _store_state(state_ptr + tl.where(dst_ok, dst_slot, 0) * stride_state_slot + tile_offsets,
                         state, tile_mask & dst_ok & src_ok & in_columns & active, seed_ptr, token, head, nheads,
                         offs_m, offs_n, dstate, STOCHASTIC_ROUNDING, PHILOX_ROUNDS)
        else:
            token_ok = token_ok & final_dst_ok

        out = tl.sum(state * C[None, :], axis=1)
        if HAS_D:
            out += x * D
        if HAS_Z:
            z = tl.load(z_ptr + token * stride_z_tok + head * stride_z_head + offs_m * stride_z_dim,
                        mask=mask_m, other=0.0).to(tl.float32)
            out *= z * tl.sigmoid(z)
        out = tl.where(token_ok, out, float("nan"))
        tl.store(out_ptr + token * stride_out_tok + head * stride_out_head + offs_m * stride_out_dim,
                 out.to(out_ptr.dtype.element_ty), mask=mask_m & active)

    if not IS_SPEC_DECODING:
        keep = active & (seqlen > 0) & src_ok & final_dst_ok
        if HAS_INDICES:
            keep = keep & (final_dst_slot != null_block_id)
        _store_state(state_ptr + tl.where(keep, final_dst_slot, 0) * stride_state_slot + tile_offsets,
                     state, tile_mask & keep, seed_ptr, bos + seqlen - 1, head, nheads,
                     offs_m, offs_n, dstate, STOCHASTIC_ROUNDING, PHILOX_ROUNDS)


def _per_head_to_full(tensor, full_shape):
    """(H,) or (T, H) -> a stride-0 expansion to (H, P[, N]) / (T, H, P)."""
    while tensor.dim() < len(full_shape):
        tensor = tensor.unsqueeze(-1)
    return tensor.expand(full_shape)


def _strides(tensor, n):
    return tuple(tensor.stride()) if tensor is not None else (0,) * n


def selective_state_update(state, x, dt, A, B, C, D=None, dt_bias=None, z=None,
                           dt_softplus=False, state_batch_indices=None,
                           dst_state_batch_indices=None, null_block_id=NULL_BLOCK_ID,
                           out=None, num_accepted_tokens=None, cu_seqlens=None,
                           is_blackwell=False, enable_stochastic_rounding=False,
                           cache_philox_rounds=0, *, rounding_seed=None,
                           validate_indices=True):
    """One decode step of a Mamba-2 layer: updates ``state`` in place, writes
    and returns ``out`` (shape of ``x``; allocated as zeros when not given).

    Shapes: see ``bridge.spec.ssu_contract``. ``rounding_seed`` (int or int64
    tensor) seeds stochastic rounding; by default it is drawn from torch's RNG.
    ``validate_indices`` checks index values on the host (one device sync;
    skipped automatically during CUDA-graph capture).
    """
    args = dict(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, z=z, out=out,
                state_batch_indices=state_batch_indices,
                dst_state_batch_indices=dst_state_batch_indices,
                num_accepted_tokens=num_accepted_tokens, cu_seqlens=cu_seqlens)
    layout = check_ssu_args(
        {k: (tuple(v.shape) if v is not None else None) for k, v in args.items()},
        {k: (str(v.dtype).removeprefix("torch.") if v is not None else None) for k, v in args.items()},
        enable_stochastic_rounding=enable_stochastic_rounding,
        cache_philox_rounds=cache_philox_rounds)
    device = platform.check_kernel_device(args)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if validate_indices and not capturing:
        check_ssu_index_values(
            layout, null_block_id=null_block_id,
            **{k: args[k].cpu().numpy() for k in ("state_batch_indices", "dst_state_batch_indices",
                                                  "num_accepted_tokens", "cu_seqlens")
               if args[k] is not None})
    if out is None:
        out = torch.zeros_like(x)

    # Everything as 4-D (token, head, dim[, dstate]) views; per-head params as
    # stride-0 expansions, which the kernel recognises as tied over dim.
    T, H, P, N = layout.num_tokens, layout.nheads, layout.dim, layout.dstate
    if layout.state_ndim == 3:
        state4, x4, dt4, A4, B4, C4 = (state.unsqueeze(1), x.unsqueeze(1), dt.unsqueeze(1),
                                       A.unsqueeze(0), B.unsqueeze(1), C.unsqueeze(1))
        D4 = D.unsqueeze(0) if D is not None else None
        dt_bias4 = dt_bias.unsqueeze(0) if dt_bias is not None else None
        z4 = z.unsqueeze(1) if z is not None else None
        out4 = out.unsqueeze(1)
    else:
        state4, x4, B4, C4, z4, out4 = state, x, B, C, z, out
        dt4 = _per_head_to_full(dt, (T, H, P))
        A4 = _per_head_to_full(A, (H, P, N))
        D4 = _per_head_to_full(D, (H, P)) if D is not None else None
        dt_bias4 = _per_head_to_full(dt_bias, (H, P)) if dt_bias is not None else None
    tie_hdim = (A4.stride(-1) == 0 and A4.stride(-2) == 0 and dt4.stride(-1) == 0
                and (dt_bias4 is None or dt_bias4.stride(-1) == 0))
    src = state_batch_indices
    if src is not None and src.dim() == 1:
        src = src.unsqueeze(1)
    dst = dst_state_batch_indices if dst_state_batch_indices is not None else state_batch_indices
    if dst is not None and dst.dim() == 1:
        dst = dst.unsqueeze(1)

    seed = None
    if enable_stochastic_rounding:
        if rounding_seed is None:
            seed = torch.randint(0, 2**32, (1,), device=device, dtype=torch.int64)
        else:
            seed = torch.as_tensor(rounding_seed, dtype=torch.int64, device=device).reshape(1)

    if layout.num_seqs == 0:
        return out
    block_size_m, num_warps = try_get_optimal_ssm_config(
        P, N, layout.num_seqs, H, str(state.dtype).removeprefix("torch."), is_blackwell,
        platform.device_name(device))
    if layout.num_seqs > MAX_GRID_Z:
        raise ValueError(f"selective_state_update: {layout.num_seqs} sequences in `x`; the Triton "
                         f"kernel takes at most {MAX_GRID_Z} per call (CUDA's grid limit)")
    grid = (triton.cdiv(P, block_size_m), H, layout.num_seqs)
    with torch.device(device):
        _selective_state_update_kernel[grid](
            state4, x4, dt4, dt_bias4, A4, B4, C4, D4, z4, out4,
            src, dst, num_accepted_tokens, cu_seqlens, seed,
            null_block_id, layout.num_slots, layout.index_columns, H, P, N,
            layout.heads_per_group,
            *state4.stride(), *x4.stride(), *dt4.stride(), *_strides(dt_bias4, 2),
            *A4.stride(), *B4.stride(), *C4.stride(), *_strides(D4, 2), *_strides(z4, 3),
            *out4.stride(), *_strides(src, 2), *_strides(dst, 2),
            DT_SOFTPLUS=dt_softplus, TIE_HDIM=tie_hdim, HAS_DT_BIAS=dt_bias is not None,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_INDICES=src is not None,
            IS_SPEC_DECODING=num_accepted_tokens is not None, IS_VARLEN=cu_seqlens is not None,
            STOCHASTIC_ROUNDING=enable_stochastic_rounding,
            PHILOX_ROUNDS=philox_rounds(cache_philox_rounds),
            BLOCK_SIZE_M=block_size_m, BLOCK_SIZE_DSTATE=triton.next_power_of_2(N),
            num_warps=num_warps)
    return out
