"""Chunked scan, stages 1 (chunk_cumsum) and 2 (chunk_state), in Pallas
(Triton backend on GPU): the per-chunk cumulative decay and each chunk's
own state contribution. The formulas, the poisoning of malformed chunks
and the local names: as in the mirror, ``torch_impl/ssd_chunk_state.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bridge.spec.launch_config import clip_block
from bridge.spec.ssd_launch_config import tile_sizes
from jax_impl.ssd_common import (
    chunk_bounds, launch_config, pallas_call, softplus, tile_dot, tile_origin)


def _chunk_cumsum_kernel(dt_ref, A_ref, dt_bias_ref, cu_chunk_ref, dA_cumsum_ref, dt_out_ref, *,
                         dt_softplus, dt_limit, num_tokens, nheads, chunk_size, block_size_h):
    """Grid (K, cdiv(H, block_size_h)): one chunk's tokens (one tile of
    ``chunk_size``) for a block of heads."""
    chunk, pid_h = pl.program_id(0), pl.program_id(1)
    start, length, valid = chunk_bounds(cu_chunk_ref, chunk, num_tokens, chunk_size)
    heads = pl.ds(pid_h * block_size_h, block_size_h)
    mask_h = pid_h * block_size_h + jnp.arange(block_size_h) < nheads
    in_chunk = (jnp.arange(chunk_size) < length)[:, None] & mask_h[None, :]

    dt = plgpu.load(dt_ref.at[pl.ds(start, chunk_size), heads], mask=in_chunk,
                    other=0.0).astype(jnp.float32)  # (L, BH)
    if dt_bias_ref is not None:
        dt_bias = plgpu.load(dt_bias_ref.at[heads], mask=mask_h, other=0.0)
        dt = dt + dt_bias.astype(jnp.float32)[None, :]
    if dt_softplus:
        dt = softplus(dt)
    if dt_limit != (0.0, float("inf")):
        dt = jnp.clip(dt, dt_limit[0], dt_limit[1])
    dt = jnp.where(in_chunk, dt, 0.0)  # padding positions add no decay
    A = plgpu.load(A_ref.at[heads], mask=mask_h, other=0.0).astype(jnp.float32)
    dA_cumsum = jnp.cumsum(dt * A[None, :], axis=0)
    dA_cumsum = jnp.where(valid, dA_cumsum, jnp.nan)  # poisons the chunk's state and outputs

    out_mask = jnp.broadcast_to(mask_h[:, None], (block_size_h, chunk_size))
    positions = pl.ds(jnp.int32(0), chunk_size)
    plgpu.store(dt_out_ref.at[heads, chunk, positions], dt.T, mask=out_mask)
    plgpu.store(dA_cumsum_ref.at[heads, chunk, positions], dA_cumsum.T, mask=out_mask)


def chunk_cumsum(dt, A, chunk_size: int, cu_chunk_seqlens, dt_bias=None, dt_softplus=False,
                 dt_limit=(0.0, float("inf"))):
    """dt (T, H), A (H,), dt_bias (H,) -> ``(dA_cumsum, dt_out)``, both
    (H, K, L) float32 (positions past len_c: dt_out 0, dA_cumsum the chunk total)."""
    num_tokens, nheads = dt.shape
    num_chunks = cu_chunk_seqlens.shape[0] - 1
    config = launch_config("chunk_cumsum")
    block_size_h = clip_block(nheads, config.BLOCK_SIZE_H)
    kernel = functools.partial(
        _chunk_cumsum_kernel, dt_softplus=bool(dt_softplus),
        dt_limit=tuple(float(v) for v in dt_limit), num_tokens=num_tokens, nheads=nheads,
        chunk_size=chunk_size, block_size_h=block_size_h)
    out_shape = jax.ShapeDtypeStruct((nheads, num_chunks, chunk_size), jnp.float32)
    return pallas_call(
        kernel, config,
        out_shape=(out_shape, out_shape),
        grid=(num_chunks, pl.cdiv(nheads, block_size_h)),
        name="ssd_chunk_cumsum",
    )(dt, A, dt_bias, cu_chunk_seqlens)


def _chunk_state_kernel(x_ref, B_ref, dt_out_ref, dA_cumsum_ref, cu_chunk_ref, states_ref, *,
                        num_tokens, heads_per_group, headdim, dstate, chunk_size, block_size_m,
                        block_size_n, block_size_k):
    """Grid (K, H, cdiv(P, BM) * cdiv(N, BN)): one (BM, BN) tile of one
    chunk's state, summed over the chunk's tokens in ``block_size_k`` steps."""
    chunk, head = pl.program_id(0), pl.program_id(1)
    m0, n0 = tile_origin(pl.program_id(2), dstate, block_size_m, block_size_n)
    group = head // heads_per_group
    start, length, _ = chunk_bounds(cu_chunk_ref, chunk, num_tokens, chunk_size)
    mask_m = m0 + jnp.arange(block_size_m) < headdim
    mask_n = n0 + jnp.arange(block_size_n) < dstate
    dA_last = dA_cumsum_ref[head, chunk, jnp.int32(chunk_size - 1)]

    def token_block(k, acc):
        k0 = k * block_size_k
        mask_k = k0 + jnp.arange(block_size_k) < length
        tokens = pl.ds(start + k0, block_size_k)
        x = plgpu.load(x_ref.at[tokens, head, pl.ds(m0, block_size_m)],
                       mask=mask_k[:, None] & mask_m[None, :], other=0.0)  # (BK, BM)
        B = plgpu.load(B_ref.at[tokens, group, pl.ds(n0, block_size_n)],
                       mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # (BK, BN)
        # block_size_k divides chunk_size, so these stay inside the chunk's row.
        dA = dA_cumsum_ref[head, chunk, pl.ds(k0, block_size_k)]
        dt = dt_out_ref[head, chunk, pl.ds(k0, block_size_k)]
        scale = jnp.where(mask_k, jnp.exp(dA_last - dA) * dt, 0.0)
        B_scaled = (B.astype(jnp.float32) * scale[:, None]).astype(x.dtype)
        return acc + tile_dot(x.T, B_scaled)

    acc = jax.lax.fori_loop(0, pl.cdiv(length, block_size_k), token_block,
                            jnp.zeros((block_size_m, block_size_n), jnp.float32))
    plgpu.store(states_ref.at[chunk, head, pl.ds(m0, block_size_m), pl.ds(n0, block_size_n)],
                acc, mask=mask_m[:, None] & mask_n[None, :])


def chunk_state(B, x, dt_out, dA_cumsum, cu_chunk_seqlens):
    """B (T, G, N), x (T, H, P), dt_out and dA_cumsum (H, K, L) -> the state
    each chunk builds from zero, (K, H, P, N) float32."""
    num_tokens, nheads, headdim = x.shape
    ngroups, dstate = B.shape[1:]
    _, num_chunks, chunk_size = dA_cumsum.shape
    config = launch_config("chunk_state")
    block_size_m, block_size_n, num_tiles = tile_sizes(config, headdim, dstate)
    kernel = functools.partial(
        _chunk_state_kernel, num_tokens=num_tokens, heads_per_group=nheads // ngroups,
        headdim=headdim, dstate=dstate, chunk_size=chunk_size, block_size_m=block_size_m,
        block_size_n=block_size_n, block_size_k=clip_block(chunk_size, config.BLOCK_SIZE_K))
    return pallas_call(
        kernel, config,
        out_shape=jax.ShapeDtypeStruct((num_chunks, nheads, headdim, dstate), jnp.float32),
        grid=(num_chunks, nheads, num_tiles),
        name="ssd_chunk_state",
    )(x, B, dt_out, dA_cumsum, cu_chunk_seqlens)


# The backward (issue 12): mirror ``torch_impl/ssd_chunk_state.py``.

def _chunk_cumsum_bwd_kernel(dt_ref, A_ref, dt_bias_ref, cu_chunk_ref, dt_out_ref, ddt_out_ref,
                             da_ref, da_last_ref, ddt_ref, dA_ref, ddt_bias_ref, *, dt_softplus,
                             dt_limit, num_tokens, nheads, chunk_size, block_size_h):
    """Grid (K, cdiv(H, block_size_h)): the decay gradient of one chunk
    (r_k = sum_{i>=k} d a_i, the last position taking the chunk's d a_last)
    into dt_out (+ A r) and A (+ dt r), then back through the clamp, the
    softplus and the bias."""
    chunk, pid_h = pl.program_id(0), pl.program_id(1)
    start, length, _ = chunk_bounds(cu_chunk_ref, chunk, num_tokens, chunk_size)
    heads = pl.ds(pid_h * block_size_h, block_size_h)
    mask_h = pid_h * block_size_h + jnp.arange(block_size_h) < nheads
    in_chunk = (jnp.arange(chunk_size) < length)[:, None] & mask_h[None, :]
    positions = pl.ds(jnp.int32(0), chunk_size)
    per_position_mask = jnp.broadcast_to(mask_h[:, None], (block_size_h, chunk_size))

    def per_position(ref):  # (H, K, L) -> (L, BH), 0 past the chunk's end
        values = plgpu.load(ref.at[heads, chunk, positions], mask=per_position_mask, other=0.0).T
        return jnp.where(in_chunk, values, 0.0)

    da = per_position(da_ref)
    da_last = jnp.sum(per_position(da_last_ref), axis=0)  # (BH,)
    reverse_cumsum = jnp.sum(da, axis=0)[None, :] - jnp.cumsum(da, axis=0) + da
    r = reverse_cumsum + da_last[None, :]
    A = plgpu.load(A_ref.at[heads], mask=mask_h, other=0.0).astype(jnp.float32)
    dt_out = per_position(dt_out_ref)
    ddt = jnp.where(in_chunk, per_position(ddt_out_ref) + A[None, :] * r, 0.0)
    plgpu.store(dA_ref.at[chunk, heads], jnp.sum(dt_out * r, axis=0), mask=mask_h)

    # Back through dt_out = clamp(softplus(dt + dt_bias)): as the forward computes it.
    dt = plgpu.load(dt_ref.at[pl.ds(start, chunk_size), heads], mask=in_chunk,
                    other=0.0).astype(jnp.float32)
    if dt_bias_ref is not None:
        dt = dt + plgpu.load(dt_bias_ref.at[heads], mask=mask_h, other=0.0).astype(jnp.float32)[None, :]
    processed = softplus(dt) if dt_softplus else dt
    if dt_limit != (0.0, float("inf")):  # inclusive bounds, as torch.clamp's gradient
        ddt = jnp.where((processed >= dt_limit[0]) & (processed <= dt_limit[1]), ddt, 0.0)
    if dt_softplus:
        ddt = jnp.where(dt <= 20.0, ddt * jax.nn.sigmoid(dt), ddt)
    ddt = jnp.where(in_chunk, ddt, 0.0)
    plgpu.store(ddt_ref.at[pl.ds(start, chunk_size), heads], ddt.astype(ddt_ref.dtype), mask=in_chunk)
    plgpu.store(ddt_bias_ref.at[chunk, heads], jnp.sum(ddt, axis=0), mask=mask_h)


def chunk_cumsum_bwd(dt, A, cu_chunk_seqlens, dt_out, ddt_out, da, da_last, dt_bias=None,
                     dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """dt (T, H) raw, A (H,), dt_out (H, K, L) (the forward's), ddt_out, da
    and da_last (H, K, L) float32 (chunk_scan_bwd's: the gradient of dt_out,
    of dA_cumsum per position, and the per-token parts of the gradient of
    each chunk's last dA_cumsum) -> ``(ddt (T, H) in dt's dtype, dA (H,)
    float32, ddt_bias (H,) float32 or None)``."""
    num_tokens, nheads = dt.shape
    num_chunks, chunk_size = dt_out.shape[1:]
    config = launch_config("chunk_cumsum_bwd")
    block_size_h = clip_block(nheads, config.BLOCK_SIZE_H)
    kernel = functools.partial(
        _chunk_cumsum_bwd_kernel, dt_softplus=bool(dt_softplus),
        dt_limit=tuple(float(v) for v in dt_limit), num_tokens=num_tokens, nheads=nheads,
        chunk_size=chunk_size, block_size_h=block_size_h)
    per_chunk = jax.ShapeDtypeStruct((num_chunks, nheads), jnp.float32)
    ddt, dA, ddt_bias = pallas_call(
        kernel, config,
        out_shape=(jax.ShapeDtypeStruct(dt.shape, dt.dtype), per_chunk, per_chunk),
        grid=(num_chunks, pl.cdiv(nheads, block_size_h)),
        name="ssd_chunk_cumsum_bwd",
    )(dt, A, dt_bias, cu_chunk_seqlens, dt_out, ddt_out, da, da_last)
    return ddt, dA.sum(axis=0), None if dt_bias is None else ddt_bias.sum(axis=0)
