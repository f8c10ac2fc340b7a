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
from jax_impl import platform

SSU_CONFIGS = lc.LaunchConfigTable(
    "pallas", "selective_state_update", Path(__file__).parent / "configs",
    lc.default_ssu_launch_config)


def get_ssm_config_file_name(headdim: int, dstate: int, cache_dtype: str, device_name: str) -> str:
    return lc.config_file_name(headdim, dstate, cache_dtype, device_name)


def get_ssm_configs(headdim: int, dstate: int, cache_dtype: str, device_name: str | None = None):
    """Tuned {effective_batch: {"BLOCK_SIZE_M", "num_warps"}} for this GPU, or None."""
    return SSU_CONFIGS.get_configs(headdim, dstate, cache_dtype, device_name or platform.device_name())


def try_get_optimal_ssm_config(headdim: int, dstate: int, batch: int, nheads: int,
                               cache_dtype: str, is_blackwell: bool = False,
                               device_name: str | None = None) -> tuple[int, int]:
    """(BLOCK_SIZE_M, num_warps) keyed by effective batch = batch * nheads."""
    return SSU_CONFIGS.lookup(headdim, dstate, batch, nheads, cache_dtype,
                              device_name or platform.device_name(), is_blackwell)


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
        *refs, names, null_block_id, num_slots, index_columns, nheads, dim, dstate,
        heads_per_group, dt_softplus, tie_hdim, is_spec_decoding, stochastic_rounding,
        rounds, block_size_m, block_size_dstate):
    """Grid (cdiv(dim, block_size_m), nheads, num_seqs): one program holds a
    (block_size_m, dstate) tile of one sequence's state for one head across
    that sequence's tokens; heads vary before sequences so that programs
    running together stream through one cache slot. ``names`` lists the
    input refs given."""
    ref = dict(zip(names, refs))
    out_ref, state_out_ref = refs[len(names):]
    state_ref = ref["state"]
    pid_m, head, seq = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    group = head // heads_per_group

    if "cu_seqlens" in ref:
        bos = ref["cu_seqlens"][seq]
        seqlen = ref["cu_seqlens"][seq + 1] - bos
    else:
        bos, seqlen = seq, 1
    has_indices = "state_batch_indices" in ref
    if has_indices:
        first_col = 0
        if is_spec_decoding:
            # The state after the last accepted token is the one to continue from.
            first_col = jnp.maximum(ref["num_accepted_tokens"][seq] - 1, 0)
        src_slot = ref["state_batch_indices"][seq, first_col]
        final_dst_slot = ref["dst_state_batch_indices"][seq, 0]
        active = src_slot != null_block_id  # padding: state and output untouched
    else:
        src_slot = final_dst_slot = seq
        active = True
    # Bad indices never touch memory; their outputs become NaN (the wrapper
    # raises before this when it can see the indices).
    in_cache = lambda slot: (slot >= 0) & (slot < num_slots)  # noqa: E731
    src_ok = in_cache(src_slot)
    final_dst_ok = in_cache(final_dst_slot)
    if has_indices:
        final_dst_ok = final_dst_ok | (final_dst_slot == null_block_id)

    offs_m = pid_m * block_size_m + jnp.arange(block_size_m)
    offs_n = jnp.arange(block_size_dstate)
    mask_m, mask_n = offs_m < dim, offs_n < dstate
    tile_mask = mask_m[:, None] & mask_n[None, :]
    rows, cols = pl.ds(pid_m * block_size_m, block_size_m), pl.ds(0, block_size_dstate)

    def store_state(slot, state, keep, token):
        if stochastic_rounding:
            # One philox stream per (token, head) and element: counters (c0, c1).
            element = (offs_m[:, None] * dstate + offs_n[None, :]).astype(jnp.uint32)
            stream = (token * nheads + head).astype(jnp.uint32)
            bits = _philox_first_word(ref["seed"][0], element, element * np.uint32(0) + stream, rounds)
            state = _round_to_f16_stochastic(state, bits)
        plgpu.store(state_out_ref.at[jnp.where(keep, slot, 0), head, rows, cols],
                    state.astype(state_out_ref.dtype), mask=tile_mask & keep)

    @pl.when(active)
    def _():
        state = plgpu.load(state_ref.at[jnp.where(src_ok, src_slot, 0), head, rows, cols],
                           mask=tile_mask & src_ok, other=0.0).astype(jnp.float32)
        if tie_hdim:
            A = ref["A"][head].astype(jnp.float32)
        else:
            A = plgpu.load(ref["A"].at[head, rows, cols], mask=tile_mask, other=0.0).astype(jnp.float32)
        if "dt_bias" in ref:
            dt_bias = (ref["dt_bias"][head] if tie_hdim else
                       plgpu.load(ref["dt_bias"].at[head, rows], mask=mask_m, other=0.0)).astype(jnp.float32)
        if "D" in ref:
            D = plgpu.load(ref["D"].at[head, rows], mask=mask_m, other=0.0).astype(jnp.float32)

        def token_step(t, state):
            token = bos + t
            x = plgpu.load(ref["x"].at[token, head, rows], mask=mask_m, other=0.0).astype(jnp.float32)
            if tie_hdim:
                dt = ref["dt"][token, head].astype(jnp.float32)
            else:
                dt = plgpu.load(ref["dt"].at[token, head, rows], mask=mask_m, other=0.0).astype(jnp.float32)
            if "dt_bias" in ref:
                dt = dt + dt_bias
            if dt_softplus:
                dt = jnp.where(dt <= 20.0, jnp.log(1.0 + jnp.exp(dt)), dt)
            B = plgpu.load(ref["B"].at[token, group, cols], mask=mask_n, other=0.0).astype(jnp.float32)
            C = plgpu.load(ref["C"].at[token, group, cols], mask=mask_n, other=0.0).astype(jnp.float32)
            decay = jnp.exp(A * dt) if tie_hdim else jnp.exp(A * dt[:, None])
            state = state * decay + (dt * x)[:, None] * B[None, :]

            token_ok = src_ok
            if is_spec_decoding:
                # Every token's state goes to its own slot (null: not kept).
                in_columns = t < index_columns
                dst_slot = ref["dst_state_batch_indices"][seq, jnp.minimum(t, index_columns - 1)]
                dst_ok = in_cache(dst_slot)
                token_ok = token_ok & in_columns & (dst_ok | (dst_slot == null_block_id))
                store_state(dst_slot, state, dst_ok & src_ok & in_columns, token)
            else:
                token_ok = token_ok & final_dst_ok

            out = jnp.sum(state * C[None, :], axis=1)
            if "D" in ref:
                out = out + x * D
            if "z" in ref:
                z = plgpu.load(ref["z"].at[token, head, rows], mask=mask_m, other=0.0).astype(jnp.float32)
                out = out * z * jax.nn.sigmoid(z)
            out = jnp.where(token_ok, out, jnp.nan)
            plgpu.store(out_ref.at[token, head, rows], out.astype(out_ref.dtype), mask=mask_m)
            return state

        state = jax.lax.fori_loop(0, seqlen, token_step, state)
        if not is_spec_decoding:
            keep = (seqlen > 0) & src_ok & final_dst_ok
            if has_indices:
                keep = keep & (final_dst_slot != null_block_id)
            store_state(final_dst_slot, state, keep, bos + seqlen - 1)


def selective_state_update(state, x, dt, A, B, C, D=None, dt_bias=None, z=None,
                           dt_softplus=False, state_batch_indices=None,
                           dst_state_batch_indices=None, null_block_id=NULL_BLOCK_ID,
                           out=None, num_accepted_tokens=None, cu_seqlens=None,
                           is_blackwell=False, enable_stochastic_rounding=False,
                           cache_philox_rounds=0, *, rounding_seed=None):
    """One decode step of a Mamba-2 layer. Returns ``(out, new_state)``.

    ``out`` (shape of ``x``) starts from the given ``out`` (zeros when not
    given): entries of padding sequences keep their values. ``new_state``
    equals ``state`` except in the slots written. Shapes: see
    ``bridge.spec.ssu_contract``; per-head ``dt (T, H)``, ``A (H,)``, ``dt_bias (H,)``
    select the tied-head fast path. ``rounding_seed`` (int or uint32 scalar in
    [0, 2**32)) is required with ``enable_stochastic_rounding``; the same seed
    gives the same rounding as the torch kernel.

    Index values are checked when they are concrete (not under ``jax.jit``);
    under jit, bad indices leave memory alone and yield NaN outputs.
    """
    args = dict(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, z=z, out=out,
                state_batch_indices=state_batch_indices,
                dst_state_batch_indices=dst_state_batch_indices,
                num_accepted_tokens=num_accepted_tokens, cu_seqlens=cu_seqlens)
    layout = check_ssu_args(
        {k: (tuple(v.shape) if v is not None else None) for k, v in args.items()},
        {k: (str(v.dtype) if v is not None else None) for k, v in args.items()},
        enable_stochastic_rounding=enable_stochastic_rounding,
        cache_philox_rounds=cache_philox_rounds)
    index_args = {k: args[k] for k in ("state_batch_indices", "dst_state_batch_indices",
                                      "num_accepted_tokens", "cu_seqlens") if args[k] is not None}
    if all(platform.is_concrete(v) for v in index_args.values()):
        check_ssu_index_values(layout, null_block_id=null_block_id,
                               **{k: np.asarray(v) for k, v in index_args.items()})
    if enable_stochastic_rounding and rounding_seed is None:
        raise ValueError("selective_state_update: `rounding_seed` is required with "
                         "enable_stochastic_rounding (JAX has no global RNG)")
    if out is None:
        out = jnp.zeros_like(x)

    # Everything as 4-D (token, head, dim[, dstate]); per-head dt, A, dt_bias
    # stay per-head only when all three are (the tied fast path).
    T, H, P, N = layout.num_tokens, layout.nheads, layout.dim, layout.dstate
    four_d = layout.state_ndim == 4
    tie_hdim = four_d and layout.per_head_params
    expand = lambda a, full: a if a.shape == full else jnp.broadcast_to(  # noqa: E731
        a.reshape(a.shape + (1,) * (len(full) - a.ndim)), full)
    operands = {
        "state": state if four_d else state[:, None],
        "x": x if four_d else x[:, None],
        "dt": dt if tie_hdim else expand(dt if four_d else dt[:, None], (T, H, P)),
        "A": A if tie_hdim else expand(A if four_d else A[None], (H, P, N)),
        "B": B if four_d else B[:, None],
        "C": C if four_d else C[:, None],
        "out": out if four_d else out[:, None],
    }
    if dt_bias is not None:
        operands["dt_bias"] = dt_bias if tie_hdim else expand(dt_bias if four_d else dt_bias[None], (H, P))
    if D is not None:
        operands["D"] = expand(D if four_d else D[None], (H, P))
    if z is not None:
        operands["z"] = z if four_d else z[:, None]
    if state_batch_indices is not None:
        src = state_batch_indices.reshape(state_batch_indices.shape[0], -1)
        dst = dst_state_batch_indices if dst_state_batch_indices is not None else state_batch_indices
        operands["state_batch_indices"] = src
        operands["dst_state_batch_indices"] = dst.reshape(dst.shape[0], -1)
    if num_accepted_tokens is not None:
        operands["num_accepted_tokens"] = num_accepted_tokens
    if cu_seqlens is not None:
        operands["cu_seqlens"] = cu_seqlens
    if enable_stochastic_rounding:
        operands["seed"] = jnp.asarray(rounding_seed, dtype=jnp.uint32).reshape(1)

    if layout.num_seqs == 0:
        return out, state
    block_size_m, num_warps = try_get_optimal_ssm_config(
        P, N, layout.num_seqs, H, str(state.dtype), is_blackwell, platform.device_name())
    names = tuple(operands)
    kernel = functools.partial(
        _selective_state_update_kernel, names=names, null_block_id=null_block_id,
        num_slots=layout.num_slots, index_columns=layout.index_columns, nheads=H, dim=P,
        dstate=N, heads_per_group=layout.heads_per_group, dt_softplus=bool(dt_softplus),
        tie_hdim=tie_hdim, is_spec_decoding=num_accepted_tokens is not None,
        stochastic_rounding=enable_stochastic_rounding,
        rounds=philox_rounds(cache_philox_rounds),
        block_size_m=block_size_m, block_size_dstate=pl.next_power_of_2(N))
    out4, state4 = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(operands["out"].shape, out.dtype),
                   jax.ShapeDtypeStruct(operands["state"].shape, state.dtype)),
        grid=(pl.cdiv(P, block_size_m), H, layout.num_seqs),
        input_output_aliases={names.index("out"): 0, names.index("state"): 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=platform.INTERPRET,
        name="selective_state_update",
    )(*operands.values())
    return out4.reshape(out.shape), state4.reshape(state.shape)
