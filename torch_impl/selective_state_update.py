"""Selective state update (one Mamba-2 decode step on a cached state) as a
Triton kernel, with its launcher and launch-config lookup.

Per (sequence q, head h, token t) with dt already biased and softplus-ed:

    state[h] = exp(A[h] * dt) * state[h] + dt * x[:, None] * B[g(h)][None, :]
    out[t, h] = state[h] @ C[g(h)] + D[h] * x, then * z * sigmoid(z) when z is given

Shapes, argument rules and the unchecked contract: ``bridge.spec.ssu_contract``.
The launch is the torch op ``mamba_twin::selective_state_update`` (CUDA-graph
and ``torch.compile`` safe). The mirror of this file is
``jax_impl/selective_state_update.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bridge.spec import checks, launch_config as lc
from bridge.spec.ssu_contract import (
    ARGS, NULL_BLOCK_ID, check_ssu_args, check_ssu_index_values, check_ssu_options, philox_rounds)
from torch_impl import autotune, platform

import triton  # noqa: E402  (after platform, which may set TRITON_INTERPRET)
import triton.language as tl  # noqa: E402

SSU_CONFIGS = lc.LaunchConfigTable(
    "triton", "selective_state_update", Path(__file__).parent / "configs",
    lambda: platform.device_name(platform.default_device()))
# vLLM's names for the lookups.
get_ssm_config_file_name = lc.config_file_name
get_ssm_configs = SSU_CONFIGS.get_configs
try_get_optimal_ssm_config = SSU_CONFIGS.lookup
override_ssm_config = SSU_CONFIGS.override
MAX_GRID_Z = 2**16 - 1  # sequences are the grid's z axis
# The checked signatures: (shape, stride, dtype, device) of every argument ->
# (SsuLayout, device, _kernel_sizes); cleared when full.
_CALLS: dict = {}
MAX_CACHED_CALLS = 256


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


@triton.heuristics(platform.given_flags(
    HAS_DT_BIAS="dt_bias_ptr", HAS_D="D_ptr", HAS_Z="z_ptr", HAS_INDICES="src_idx_ptr",
    IS_SPEC_DECODING="num_accepted_ptr", IS_VARLEN="cu_seqlens_ptr", STOCHASTIC_ROUNDING="seed_ptr"))
@triton.jit
def _selective_state_update_kernel(
    # pointers
    state_ptr, x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, out_ptr,
    src_idx_ptr, dst_idx_ptr, num_accepted_ptr, cu_seqlens_ptr, seed_ptr,
    # dimensions
    null_block_id, num_slots, num_tokens, index_columns, nheads, dim, dstate, heads_per_group,
    # strides
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
    # meta-parameters
    DT_SOFTPLUS: tl.constexpr, TIE_HDIM: tl.constexpr, PHILOX_ROUNDS: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_DSTATE: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_INDICES: tl.constexpr, IS_SPEC_DECODING: tl.constexpr, IS_VARLEN: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr,
):
    """Grid (cdiv(dim, BLOCK_SIZE_M), nheads, num_seqs): one program holds a
    (BLOCK_SIZE_M, dstate) tile of one sequence's state for one head in
    registers across that sequence's tokens. Heads vary before sequences so
    that programs running together stream through one cache slot rather
    than touching many (measured on the H100: 2370 -> 2925 GB/s at batch 256).

    Every load and store is masked against the real extents: a sequence with
    tokens outside [0, num_tokens), an accepted count outside
    [1, index_columns] or a slot outside [0, num_slots) writes no state and
    NaN outputs (only for its tokens inside [0, num_tokens))."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2).to(tl.int64)
    group = head // heads_per_group

    if IS_VARLEN:
        bos = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
        eos = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    else:
        bos = seq
        eos = seq + 1
    seq_ok = (bos >= 0) & (bos <= eos) & (eos <= num_tokens)
    first_token = tl.minimum(tl.maximum(bos, 0), num_tokens)
    end_token = tl.minimum(tl.maximum(eos, first_token), num_tokens)
    if HAS_INDICES:
        first_col = 0
        if IS_SPEC_DECODING:
            # The state after the last accepted token is the one to continue from.
            accepted = tl.load(num_accepted_ptr + seq).to(tl.int64)
            accepted_ok = (accepted >= 1) & (accepted <= index_columns)
            seq_ok = seq_ok & accepted_ok
            first_col = tl.where(accepted_ok, accepted - 1, 0)
        src_slot = tl.load(src_idx_ptr + seq * stride_src_seq + first_col * stride_src_col).to(tl.int64)
        final_dst_slot = tl.load(dst_idx_ptr + seq * stride_dst_seq).to(tl.int64)
        active = src_slot != null_block_id  # padding: state and output untouched
    else:
        src_slot = seq
        final_dst_slot = seq
        active = True
    src_ok = (src_slot >= 0) & (src_slot < num_slots)
    final_dst_ok = (final_dst_slot >= 0) & (final_dst_slot < num_slots)
    if HAS_INDICES:
        final_dst_ok = final_dst_ok | (final_dst_slot == null_block_id)
    ok = seq_ok & src_ok
    if not IS_SPEC_DECODING:
        ok = ok & final_dst_ok

    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    offs_n = tl.arange(0, BLOCK_SIZE_DSTATE)
    mask_m = offs_m < dim
    mask_n = offs_n < dstate
    tile_mask = mask_m[:, None] & mask_n[None, :]
    tile_offsets = (head * stride_state_head + offs_m[:, None] * stride_state_dim
                    + offs_n[None, :] * stride_state_dstate)
    state = tl.load(state_ptr + tl.where(src_ok, src_slot, 0) * stride_state_slot + tile_offsets,
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

    for token in range(first_token, end_token):
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

        token_ok = ok
        if IS_SPEC_DECODING:
            # Every token's state goes to its own slot (null: not kept).
            t = token - bos
            in_columns = t < index_columns
            dst_slot = tl.load(dst_idx_ptr + seq * stride_dst_seq + t * stride_dst_col,
                               mask=in_columns, other=null_block_id).to(tl.int64)
            dst_ok = (dst_slot >= 0) & (dst_slot < num_slots)
            token_ok = token_ok & in_columns & (dst_ok | (dst_slot == null_block_id))
            _store_state(state_ptr + tl.where(dst_ok, dst_slot, 0) * stride_state_slot + tile_offsets,
                         state, tile_mask & dst_ok & ok & in_columns & active, seed_ptr, token, head, nheads,
                         offs_m, offs_n, dstate, STOCHASTIC_ROUNDING, PHILOX_ROUNDS)

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
        keep = active & ok & (end_token > first_token)
        if HAS_INDICES:
            keep = keep & (final_dst_slot != null_block_id)
        _store_state(state_ptr + tl.where(keep, final_dst_slot, 0) * stride_state_slot + tile_offsets,
                     state, tile_mask & keep, seed_ptr, end_token - 1, head, nheads,
                     offs_m, offs_n, dstate, STOCHASTIC_ROUNDING, PHILOX_ROUNDS)


def _strides(tensor, ndim: int, head_axis: int, three_d: bool) -> list:
    """Strides of ``tensor`` in the 4-D (token|slot, head, dim[, dstate]) form
    of ``ndim`` axes without building views: a 3-D call's missing head axis
    and a per-head tensor's missing trailing axes get stride 0 (the kernel
    reads dt, A, dt_bias stride-0 over dim as tied per head)."""
    if tensor is None:
        return platform.strides(None, ndim)
    strides = list(tensor.stride())
    if three_d:
        strides.insert(head_axis, 0)
    return strides + [0] * (ndim - len(strides))


def _kernel_sizes(state, x, dt, A, B, C, D, dt_bias, z, out, src, dst, cu_seqlens) -> tuple:
    """What the launch derives from the arguments' shapes and strides:
    (headdim, dstate, nheads, num_seqs, the kernel's size and stride
    arguments after ``null_block_id``, TIE_HDIM)."""
    three_d = state.dim() == 3
    num_slots, P, N = state.shape[0], state.shape[-2], state.shape[-1]
    H = 1 if three_d else state.shape[1]
    num_tokens = x.shape[0]
    num_seqs = num_tokens if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dt_strides = _strides(dt, 3, 1, three_d)
    A_strides = _strides(A, 3, 0, three_d)
    dt_bias_strides = _strides(dt_bias, 2, 0, three_d)
    tie_hdim = (A_strides[1] == 0 and A_strides[2] == 0 and dt_strides[2] == 0
                and dt_bias_strides[1] == 0)
    dst = src if dst is None else dst
    index_columns = 1 if src is None or src.dim() == 1 else src.shape[1]
    ints = (num_slots, num_tokens, index_columns, H, P, N, H // (1 if three_d else B.shape[1]),
            *_strides(state, 4, 1, three_d), *_strides(x, 3, 1, three_d), *dt_strides,
            *dt_bias_strides, *A_strides, *_strides(B, 3, 1, three_d), *_strides(C, 3, 1, three_d),
            *_strides(D, 2, 0, three_d), *_strides(z, 3, 1, three_d),
            *_strides(out, 3, 1, three_d), *_strides(src, 2, 1, False), *_strides(dst, 2, 1, False))
    return P, N, H, num_seqs, ints, tie_hdim


def _launch(state, x, dt, A, B, C, D, dt_bias, z, out, state_batch_indices,
            dst_state_batch_indices, num_accepted_tokens, cu_seqlens, rounding_seed,
            dt_softplus, null_block_id, philox_rounds, is_blackwell, sizes=None):
    """The op's kernel launch on checked arguments (``rounding_seed``: an int64
    tensor of one element, or None without stochastic rounding; ``sizes``:
    ``_kernel_sizes`` of the arguments when the caller has them)."""
    src, dst = state_batch_indices, dst_state_batch_indices
    P, N, H, num_seqs, ints, tie_hdim = sizes or _kernel_sizes(
        state, x, dt, A, B, C, D, dt_bias, z, out, src, dst, cu_seqlens)
    block_size_m, num_warps = SSU_CONFIGS.lookup(
        P, N, num_seqs, H, checks.dtype_name(state), is_blackwell, platform.device_name(state.device),
        autotune.tuner(state.device))
    with platform.on_device(state.device):
        platform.launch(
            _selective_state_update_kernel, (platform.cdiv(P, block_size_m), H, num_seqs),
            state, x, dt, dt_bias, A, B, C, D, z, out,
            src, src if dst is None else dst, num_accepted_tokens, cu_seqlens, rounding_seed,
            null_block_id, *ints,
            DT_SOFTPLUS=dt_softplus, TIE_HDIM=tie_hdim, PHILOX_ROUNDS=philox_rounds,
            BLOCK_SIZE_M=block_size_m, BLOCK_SIZE_DSTATE=platform.next_power_of_2(N), num_warps=num_warps)


_OP = platform.define_op(
    "selective_state_update",
    "(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, "
    "Tensor? dt_bias, Tensor? z, Tensor(b!) out, Tensor? state_batch_indices, "
    "Tensor? dst_state_batch_indices, Tensor? num_accepted_tokens, Tensor? cu_seqlens, "
    "Tensor? rounding_seed, bool dt_softplus, int null_block_id, int philox_rounds, "
    "bool is_blackwell) -> ()", _launch)


def selective_state_update(state, x, dt, A, B, C, D=None, dt_bias=None, z=None,
                           dt_softplus=False, state_batch_indices=None,
                           dst_state_batch_indices=None, null_block_id=NULL_BLOCK_ID,
                           out=None, num_accepted_tokens=None, cu_seqlens=None,
                           is_blackwell=False, enable_stochastic_rounding=False,
                           cache_philox_rounds=0, *, rounding_seed=None,
                           validate_indices=None):
    """One decode step of a Mamba-2 layer: updates ``state`` in place, writes
    and returns ``out`` (shape of ``x``; allocated as zeros when not given).

    Shapes and the unchecked contract (bad index values: no state written,
    NaN outputs, never an access outside the tensors): see
    ``bridge.spec.ssu_contract``. ``rounding_seed`` (int in [0, 2**32) or an
    int64 tensor) seeds stochastic rounding; by default it is drawn from
    torch's RNG. ``validate_indices`` (default: ``$MAMBA_TWIN_CHECK_INDICES``,
    off) checks index values on the host, a device sync; skipped under
    CUDA-graph capture and torch.compile. Inference only: refused
    (RuntimeError) when an input requires grad with grad mode on.
    """
    if torch.is_grad_enabled() and (
            state.requires_grad or x.requires_grad or dt.requires_grad or A.requires_grad
            or B.requires_grad or C.requires_grad or (D is not None and D.requires_grad)
            or (dt_bias is not None and dt_bias.requires_grad) or (z is not None and z.requires_grad)):
        raise RuntimeError("selective_state_update is an inference-only (decode) op: it has no "
                           "gradient and writes `state` in place; call it under torch.no_grad() "
                           "or torch.inference_mode() (to train: mamba_chunk_scan_combined)")
    if out is None and isinstance(x, torch.Tensor):
        out = torch.zeros_like(x)
    arrays = (state, x, dt, A, B, C, D, dt_bias, z, out, state_batch_indices, dst_state_batch_indices,
              num_accepted_tokens, cu_seqlens)
    compiling = torch.compiler.is_compiling()
    try:  # the checks and launch sizes of a signature are computed once (a decode loop repeats it)
        key = None if compiling else tuple([None if a is None else (a.shape, a.stride(), a.dtype, a.device)
                                            for a in arrays])
    except AttributeError:  # not tensors: check_ssu_args names the argument
        key = None
    known = None if key is None else _CALLS.get(key)
    if known is None:
        layout = check_ssu_args(
            *arrays, null_block_id=null_block_id, enable_stochastic_rounding=enable_stochastic_rounding,
            cache_philox_rounds=cache_philox_rounds, rounding_seed=rounding_seed)
        device = platform.check_kernel_device(dict(zip(ARGS, arrays)))
        known = layout, device, None if compiling else _kernel_sizes(
            state, x, dt, A, B, C, D, dt_bias, z, out, state_batch_indices, dst_state_batch_indices, cu_seqlens)
        if key is not None:
            if len(_CALLS) >= MAX_CACHED_CALLS:
                _CALLS.clear()
            _CALLS[key] = known
    else:
        check_ssu_options(state, null_block_id=null_block_id, enable_stochastic_rounding=enable_stochastic_rounding,
                          cache_philox_rounds=cache_philox_rounds, rounding_seed=rounding_seed)
    layout, device, sizes = known
    host = platform.host_index_values(
        validate_indices, device, state_batch_indices=state_batch_indices,
        dst_state_batch_indices=dst_state_batch_indices,
        num_accepted_tokens=num_accepted_tokens, cu_seqlens=cu_seqlens)
    if host is not None:
        check_ssu_index_values(layout, null_block_id=null_block_id, **host)
    if layout.num_seqs > MAX_GRID_Z:
        raise ValueError(f"selective_state_update: {layout.num_seqs} sequences in `x`; the Triton "
                         f"kernel takes at most {MAX_GRID_Z} per call (CUDA's grid limit)")
    if layout.num_seqs == 0 or layout.num_tokens == 0:
        return out
    seed = None
    if enable_stochastic_rounding:
        if rounding_seed is None:
            seed = torch.randint(0, 2**32, (1,), device=device, dtype=torch.int64)
        else:
            seed = torch.as_tensor(rounding_seed, dtype=torch.int64, device=device).reshape(1)
    args = (state, x, dt, A, B, C, D, dt_bias, z, out, state_batch_indices, dst_state_batch_indices,
            num_accepted_tokens, cu_seqlens, seed, bool(dt_softplus), int(null_block_id),
            philox_rounds(cache_philox_rounds), bool(is_blackwell))
    if compiling:
        _OP(*args)  # the registered op, opaque to the compiler
    else:
        _launch(*args, sizes=sizes)  # eagerly the op's dispatch would only add cost
    return out
