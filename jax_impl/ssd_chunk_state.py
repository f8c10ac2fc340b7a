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
