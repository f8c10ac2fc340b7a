"""Selective state update (one Mamba-2 decode step on a cached state) as a
Pallas kernel (Triton backend on GPU), with its wrapper and launch-config
lookup.

Per (sequence q, head h, token t) with dt already biased and softplus-ed:

    state[h] = exp(A[h] * dt) * state[h] + dt * x[:, None] * B[g(h)][None, :]
    out[t, h] = state[h] @ C[g(h)] + D[h] * x, then * z * sigmoid(z) when z is given

Shapes and argument rules: ``bridge.spec.ssu_contract``. The mirror of this file
is ``torch_impl/selective_state_update.py``. JAX is functional: the call
returns ``(out, new_state)``; under ``jax.jit(..., donate_argnums=0)`` the new
state is written into the donated state's buffer (``input_output_aliases``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bridge.spec import launch_config as lc
from bridge.spec.ssu_contract import (
    NULL_BLOCK_ID, check_ssu_args, check_ssu_index_values, philox_rounds)
from jax_impl import autotune, platform

SSU_CONFIGS = lc.LaunchConfigTable(
    "pallas", "selective_state_update", Path(__file__).parent / "configs", platform.device_name)
# vLLM's names for the lookups.
get_ssm_config_file_name = lc.config_file_name
get_ssm_configs = SSU_CONFIGS.get_configs
try_get_optimal_ssm_config = SSU_CONFIGS.lookup
override_ssm_config = SSU_CONFIGS.override

_PHILOX_KEY_A, _PHILOX_KEY_B = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mul_hi_lo(constant: int, value):
    """(high, low) 32-bit words of constant * value, from 16-bit halves (no
    64-bit integers inside the kernel)."""
    c_lo, c_hi = np.uint32(constant & 0xFFFF), np.uint32(constant >> 16)
    v_lo, v_hi = value & np.uint32(0xFFFF), value >> np.uint32(16)
    ll, lh, hl, hh = c_lo * v_lo, c_lo * v_hi, c_hi * v_lo, c_hi * v_hi
    carry = (ll >> np.uint32(16)) + (lh & np.uint32(0xFFFF)) + (hl & np.uint32(0xFFFF))
    high = hh + (lh >> np.uint32(16)) + (hl >> np.uint32(16)) + (carry >> np.uint32(16))
    return high, value * np.uint32(constant)


def _philox_first_word(seed, c0, c1, rounds: int):
    """Philox-4x32 with Triton's constants and key layout (key = (seed, 0)),
    so a seed gives the same random bits as ``tl.philox`` in the torch kernel."""
    zero = c0 * np.uint32(0)
    c2, c3, k0, k1 = zero, zero, seed, jnp.zeros((), jnp.uint32)
    for _ in range(rounds):
        high_b, low_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        high_a, low_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = high_b ^ c1 ^ k0, low_b, high_a ^ c3 ^ k1, low_a
        k0, k1 = k0 + _PHILOX_KEY_A, k1 + _PHILOX_KEY_B
    return c0


def _to_bits(value, dtype):
    return jax.lax.bitcast_convert_type(value, dtype)


def _round_to_f16_stochastic(value, random_bits):
    """fp32 -> fp16 rounding up or down with probability proportional to the
    distance: add random bits below fp16's last mantissa bit, then truncate.
    Integer-only, so no compiler can fold a float round trip away (XLA would).
    Unbiased for |value| >= 2**-24 (fp16 subnormals included); beyond the fp16
    range the result is inf, as with round-to-nearest."""
    bits = _to_bits(value, jnp.uint32)
    magnitude = bits & np.uint32(0x7FFFFFFF)
    exponent = ((magnitude >> np.uint32(23)) & np.uint32(0xFF)).astype(jnp.int32) - 127
    # fp32 mantissa bits below fp16's spacing: 13 for normals, more for subnormals.
    dropped = 13 + jnp.minimum(jnp.maximum(-14 - exponent, 0), 10)
    below = ((jnp.int32(1) << dropped) - 1).astype(jnp.uint32)
    summed = magnitude + (random_bits & below)
    rounded = summed - (summed & below)
    rounded = jnp.where(magnitude >= np.uint32(0x7F800000), magnitude, rounded)  # inf, NaN
    return _to_bits((bits & np.uint32(0x80000000)) | rounded, jnp.float32).astype(jnp.float16)


def _selective_state_update_kernel(
        state_ref, out_in_ref, x_ref, dt_ref, A_ref, B_ref, C_ref, D_ref, dt_bias_ref, z_ref,
        src_ref, dst_ref, num_accepted_ref, cu_seqlens_ref, seed_ref, out_ref, state_out_ref, *,
        null_block_id, num_slots, num_tokens, index_columns, nheads, dim, dstate, heads_per_group,
        dt_softplus, tie_hdim, rounds, block_size_m, block_size_dstate):
    """Grid (cdiv(dim, block_size_m), nheads, num_seqs): one program holds a
    (block_size_m, dstate) tile of one sequence's state for one head across
    that sequence's tokens; heads vary before sequences so that programs
    running together stream through one cache slot. Absent operands are
    None refs; ``out_in_ref`` is ``out_ref``'s aliased input (unused), absent
    when no ``out`` was given: then a padding sequence's rows are written as
    zeros here (one token per sequence, so every row has its program),
    instead of XLA filling a zero buffer first.

    Every access is bounded by the real extents: a sequence with tokens
    outside [0, num_tokens), an accepted count outside [1, index_columns] or
    a slot outside [0, num_slots) writes no state and NaN outputs (only for
    its tokens inside [0, num_tokens)). Index values are compared in their
    own dtype (int64 under x64) before the int32 cast that indexing needs."""
    zero_padding = out_in_ref is None
    del out_in_ref
    pid_m, head, seq = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    group = head // heads_per_group
    as_index = lambda value: value.astype(jnp.int32)  # noqa: E731

    if cu_seqlens_ref is not None:
        bos, eos = cu_seqlens_ref[seq], cu_seqlens_ref[seq + 1]
    else:
        bos, eos = seq, seq + 1
    seq_ok = (bos >= 0) & (bos <= eos) & (eos <= num_tokens)
    first_token = as_index(jnp.clip(bos, 0, num_tokens))
    end_token = as_index(jnp.clip(eos, first_token, num_tokens))
    has_indices = src_ref is not None
    if has_indices:
        first_col = 0
        if num_accepted_ref is not None:
            # The state after the last accepted token is the one to continue from.
            accepted = num_accepted_ref[seq]
            accepted_ok = (accepted >= 1) & (accepted <= index_columns)
            seq_ok = seq_ok & accepted_ok
            first_col = as_index(jnp.where(accepted_ok, accepted - 1, 0))
        src_slot = src_ref[seq, first_col]
        final_dst_slot = dst_ref[seq, 0]
        active = src_slot != null_block_id  # padding: state and output untouched
    else:
        src_slot = final_dst_slot = seq
        active = True
    in_cache = lambda slot: (slot >= 0) & (slot < num_slots)  # noqa: E731
    src_ok = in_cache(src_slot)
    final_dst_ok = in_cache(final_dst_slot)
    if has_indices:
        final_dst_ok = final_dst_ok | (final_dst_slot == null_block_id)
    ok = seq_ok & src_ok
    if num_accepted_ref is None:
        ok = ok & final_dst_ok

    offs_m = pid_m * block_size_m + jnp.arange(block_size_m, dtype=jnp.int32)
    offs_n = jnp.arange(block_size_dstate, dtype=jnp.int32)
    mask_m, mask_n = offs_m < dim, offs_n < dstate
    tile_mask = mask_m[:, None] & mask_n[None, :]
    rows, cols = pl.ds(pid_m * block_size_m, block_size_m), pl.ds(jnp.int32(0), block_size_dstate)

    def store_state(slot, state, keep, token):
        if seed_ref is not None:
            # One philox stream per (token, head) and element: counters (c0, c1).
            element = (offs_m[:, None] * dstate + offs_n[None, :]).astype(jnp.uint32)
            stream = (token * nheads + head).astype(jnp.uint32)
            bits = _philox_first_word(seed_ref[0], element, element * np.uint32(0) + stream, rounds)
            state = _round_to_f16_stochastic(state, bits)
        plgpu.store(state_out_ref.at[as_index(jnp.where(keep, slot, 0)), head, rows, cols],
                    state.astype(state_out_ref.dtype), mask=tile_mask & keep)

    if zero_padding:
        @pl.when(~active)
        def _():
            plgpu.store(out_ref.at[first_token, head, rows], jnp.zeros((block_size_m,), out_ref.dtype),
                        mask=mask_m)

    @pl.when(active)
    def _():
        state = plgpu.load(state_ref.at[as_index(jnp.where(src_ok, src_slot, 0)), head, rows, cols],
                           mask=tile_mask & src_ok, other=0.0).astype(jnp.float32)
        if tie_hdim:
            A = A_ref[head].astype(jnp.float32)
        else:
            A = plgpu.load(A_ref.at[head, rows, cols], mask=tile_mask, other=0.0).astype(jnp.float32)
        if dt_bias_ref is not None:
            dt_bias = (dt_bias_ref[head] if tie_hdim else
                       plgpu.load(dt_bias_ref.at[head, rows], mask=mask_m, other=0.0)).astype(jnp.float32)
        if D_ref is not None:  # per head (H,) or per channel (H, P)
            D = (D_ref[head] if len(D_ref.shape) == 1 else
                 plgpu.load(D_ref.at[head, rows], mask=mask_m, other=0.0)).astype(jnp.float32)

        def token_step(token, state):
            x = plgpu.load(x_ref.at[token, head, rows], mask=mask_m, other=0.0).astype(jnp.float32)
            if tie_hdim:
                dt = dt_ref[token, head].astype(jnp.float32)
            else:
                dt = plgpu.load(dt_ref.at[token, head, rows], mask=mask_m, other=0.0).astype(jnp.float32)
            if dt_bias_ref is not None:
                dt = dt + dt_bias
            if dt_softplus:
                dt = jnp.where(dt <= 20.0, jnp.log(1.0 + jnp.exp(dt)), dt)
            B = plgpu.load(B_ref.at[token, group, cols], mask=mask_n, other=0.0).astype(jnp.float32)
            C = plgpu.load(C_ref.at[token, group, cols], mask=mask_n, other=0.0).astype(jnp.float32)
            decay = jnp.exp(A * dt) if tie_hdim else jnp.exp(A * dt[:, None])
            state = state * decay + (dt * x)[:, None] * B[None, :]

            token_ok = ok
            if num_accepted_ref is not None:
                # Every token's state goes to its own slot (null: not kept).
                t = as_index(jnp.minimum(token - bos, index_columns))  # position in the sequence
                in_columns = t < index_columns
                dst_slot = dst_ref[seq, jnp.minimum(t, index_columns - 1)]
                dst_ok = in_cache(dst_slot)
                token_ok = token_ok & in_columns & (dst_ok | (dst_slot == null_block_id))
                store_state(dst_slot, state, dst_ok & ok & in_columns, token)

            out = jnp.sum(state * C[None, :], axis=1)
            if D_ref is not None:
                out = out + x * D
            if z_ref is not None:
                z = plgpu.load(z_ref.at[token, head, rows], mask=mask_m, other=0.0).astype(jnp.float32)
                out = out * z * jax.nn.sigmoid(z)
            out = jnp.where(token_ok, out, jnp.nan)
            plgpu.store(out_ref.at[token, head, rows], out.astype(out_ref.dtype), mask=mask_m)
            return state

        state = jax.lax.fori_loop(first_token, end_token, token_step, state)
        if num_accepted_ref is None:
            keep = (end_token > first_token) & ok
            if has_indices:
                keep = keep & (final_dst_slot != null_block_id)
            store_state(final_dst_slot, state, keep, end_token - 1)


def selective_state_update(state, x, dt, A, B, C, D=None, dt_bias=None, z=None,
                           dt_softplus=False, state_batch_indices=None,
                           dst_state_batch_indices=None, null_block_id=NULL_BLOCK_ID,
                           out=None, num_accepted_tokens=None, cu_seqlens=None,
                           is_blackwell=False, enable_stochastic_rounding=False,
                           cache_philox_rounds=0, *, rounding_seed=None, validate_indices=None):
    """One decode step of a Mamba-2 layer. Returns ``(out, new_state)``.

    ``out`` (shape of ``x``) starts from the given ``out`` (zeros when not
    given): entries of padding sequences keep their values. ``new_state``
    equals ``state`` except in the slots written. Shapes and the unchecked
    contract: see ``bridge.spec.ssu_contract``; per-head ``dt (T, H)``,
    ``A (H,)``, ``dt_bias (H,)`` select the tied-head fast path.
    ``rounding_seed`` (int or uint32 scalar in [0, 2**32)) is required with
    ``enable_stochastic_rounding``; the same seed gives the same rounding as
    the torch kernel. Works with ``jax_enable_x64`` (int32 or int64 indices).

    Index values are checked when they are concrete (not under ``jax.jit``)
    unless ``validate_indices=False``; under jit, bad indices leave memory
    alone and yield NaN outputs. Inference only: refused (ValueError naming
    the op) under ``jax.grad`` / ``jax.vjp``.
    """
    layout = check_ssu_args(
        state, x, dt, A, B, C, D, dt_bias, z, out, state_batch_indices, dst_state_batch_indices,
        num_accepted_tokens, cu_seqlens, null_block_id=null_block_id,
        enable_stochastic_rounding=enable_stochastic_rounding,
        cache_philox_rounds=cache_philox_rounds, rounding_seed=rounding_seed)
    host = platform.host_index_values(
        validate_indices, state_batch_indices=state_batch_indices,
        dst_state_batch_indices=dst_state_batch_indices,
        num_accepted_tokens=num_accepted_tokens, cu_seqlens=cu_seqlens)
    if host is not None:
        check_ssu_index_values(layout, null_block_id=null_block_id, **host)
    if enable_stochastic_rounding and rounding_seed is None:
        raise ValueError("selective_state_update: `rounding_seed` is required with "
                         "enable_stochastic_rounding (JAX has no global RNG)")
    # Without out and with one token per sequence the kernel writes every
    # row (zeros for padding); else out starts from the given or zero buffer.
    zero_padding = out is None and cu_seqlens is None
    if out is None and not zero_padding:
        out = jnp.zeros_like(x)
    if layout.num_seqs == 0 or layout.num_tokens == 0:
        return (jnp.zeros_like(x) if out is None else out), state
    out_shape = x.shape if out is None else out.shape
    out_dtype = x.dtype if out is None else out.dtype

    # Everything as 4-D (token, head, dim[, dstate]); per-head dt, A, dt_bias
    # stay per-head only when all three are (the tied fast path).
    T, H, P, N = layout.num_tokens, layout.nheads, layout.dim, layout.dstate
    four_d = layout.state_ndim == 4
    tie_hdim = four_d and layout.per_head_params

    def as_4d(array, head_axis, full=None, tied=False):
        """The 4-D form; per-head values broadcast to ``full`` unless ``tied``."""
        if array is None:
            return None
        if not four_d:
            array = jnp.expand_dims(array, head_axis)
        if full is None or tied or array.shape == full:
            return array
        return jnp.broadcast_to(array.reshape(array.shape + (1,) * (len(full) - array.ndim)), full)

    def as_columns(indices):
        return indices[:, None] if indices is not None and indices.ndim == 1 else indices

    src = as_columns(state_batch_indices)
    dst = as_columns(dst_state_batch_indices) if dst_state_batch_indices is not None else src
    seed = (jnp.asarray(rounding_seed, dtype=jnp.uint32).reshape(1)
            if enable_stochastic_rounding else None)
    block_size_m, num_warps = SSU_CONFIGS.lookup(P, N, layout.num_seqs, H, str(state.dtype), is_blackwell,
                                                 tuner=autotune.tuner(not platform.is_concrete(state)))
    kernel = functools.partial(
        _selective_state_update_kernel, null_block_id=null_block_id, num_slots=layout.num_slots,
        num_tokens=T, index_columns=layout.index_columns, nheads=H, dim=P, dstate=N,
        heads_per_group=layout.heads_per_group, dt_softplus=bool(dt_softplus), tie_hdim=tie_hdim,
        rounds=philox_rounds(cache_philox_rounds),
        block_size_m=block_size_m, block_size_dstate=pl.next_power_of_2(N))
    state4, out4, x4 = as_4d(state, 1), as_4d(out, 1), as_4d(x, 1)
    call = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(x4.shape, out_dtype),
                   jax.ShapeDtypeStruct(state4.shape, state.dtype)),
        grid=(pl.cdiv(P, block_size_m), H, layout.num_seqs),
        # state and out are the first two operands (state never None; out,
        # when given, second in the flattened inputs).
        input_output_aliases={0: 1} if out is None else {0: 1, 1: 0},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=platform.INTERPRET,
        name="selective_state_update",
    )
    out4, state4 = platform.inference_only(  # jax.grad through it: a clear error
        "selective_state_update", call,
        state4, out4, x4, as_4d(dt, 1, (T, H, P), tie_hdim), as_4d(A, 0, (H, P, N), tie_hdim),
        as_4d(B, 1), as_4d(C, 1), as_4d(D, 0, (H, P), four_d and D is not None and D.ndim == 1),
        as_4d(dt_bias, 0, (H, P), tie_hdim), as_4d(z, 1),
        src, dst, num_accepted_tokens, cu_seqlens, seed)
    return out4.reshape(out_shape), state4.reshape(state.shape)
