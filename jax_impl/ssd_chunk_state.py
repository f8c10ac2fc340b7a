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
from jax_impl.ssd_common import (
    chunk_bounds, launch_config, load_rows, pallas_call, softplus, tile_call, tile_dot,
    tile_origin, token_tile)


def _chunk_dt(dt_ref, dt_bias_ref, cu_chunk_ref, num_tokens, nheads, chunk_size, block_size_h):
    """The chunk of a program of grid (K, cdiv(H, block_size_h)), the whole
    chunk one tile: ``(chunk, start, valid, heads, mask_h, in_chunk, dt)``,
    dt the chunk's dt + dt_bias, (L, BH) float32 (0 past the chunk's end)."""
    chunk, pid_h = pl.program_id(0), pl.program_id(1)
    start, length, valid = chunk_bounds(cu_chunk_ref, chunk, num_tokens, chunk_size)
    heads = pl.ds(pid_h * block_size_h, block_size_h)
    mask_h = pid_h * block_size_h + jnp.arange(block_size_h) < nheads
    in_chunk = (jnp.arange(chunk_size) < length)[:, None] & mask_h[None, :]
    dt = plgpu.load(dt_ref.at[pl.ds(start, chunk_size), heads], mask=in_chunk,
                    other=0.0).astype(jnp.float32)
    if dt_bias_ref is not None:
        dt = dt + plgpu.load(dt_bias_ref.at[heads], mask=mask_h, other=0.0).astype(jnp.float32)[None, :]
    return chunk, start, valid, heads, mask_h, in_chunk, dt


def _cumsum_call(stage, kernel, dt, num_chunks: int, chunk_size: int, dt_softplus, dt_limit,
                 **options):
    """``pallas_call`` of a stage over (K, cdiv(H, block_size_h)) programs,
    the whole chunk one tile (chunk_cumsum and its backward)."""
    num_tokens, nheads = dt.shape
    config = launch_config(stage)
    block_size_h = clip_block(nheads, config.BLOCK_SIZE_H)
    kernel = functools.partial(
        kernel, dt_softplus=bool(dt_softplus), dt_limit=tuple(float(v) for v in dt_limit),
        num_tokens=num_tokens, nheads=nheads, chunk_size=chunk_size, block_size_h=block_size_h)
    return pallas_call(kernel, config, grid=(num_chunks, pl.cdiv(nheads, block_size_h)),
                       name=f"ssd_{stage}", **options)


def _chunk_cumsum_kernel(dt_ref, A_ref, dt_bias_ref, cu_chunk_ref, dA_cumsum_ref, dt_out_ref, *,
                         dt_softplus, dt_limit, num_tokens, nheads, chunk_size, block_size_h):
    """Grid (K, cdiv(H, block_size_h)): one chunk's tokens (one tile of
    ``chunk_size``) for a block of heads."""
    chunk, start, valid, heads, mask_h, in_chunk, dt = _chunk_dt(
        dt_ref, dt_bias_ref, cu_chunk_ref, num_tokens, nheads, chunk_size, block_size_h)
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
    num_chunks = cu_chunk_seqlens.shape[0] - 1
    out_shape = jax.ShapeDtypeStruct((dt.shape[1], num_chunks, chunk_size), jnp.float32)
    call = _cumsum_call("chunk_cumsum", _chunk_cumsum_kernel, dt, num_chunks, chunk_size,
                        dt_softplus, dt_limit, out_shape=(out_shape, out_shape))
    return call(dt, A, dt_bias, cu_chunk_seqlens)


def _chunk_state_kernel(u_ref, v_ref, dt_out_ref, dA_cumsum_ref, cu_chunk_ref, out_ref, *,
                        num_tokens, heads_per_group, size_m, size_n, chunk_size, dot_dtype,
                        block_size_m, block_size_n, block_size_k):
    """Grid (K, H, cdiv(M, BM) * cdiv(N, BN)): one (BM, BN) tile of
    sum_k u_k^T (v_k scale_k) over a chunk's tokens in ``block_size_k``
    steps, u (T, H, M), v (T, G, N), the products in ``dot_dtype``. With
    dt_out (stage 2, the chunk's own state): u = x, v = B, scale_k =
    exp(a_last - a_k) dt_k; without (chunk_scan_bwd_dstates): u = dy, v = C,
    scale_k = exp(a_k)."""
    chunk, head = pl.program_id(0), pl.program_id(1)
    m0, n0 = tile_origin(pl.program_id(2), size_n, block_size_m, block_size_n)
    group = head // heads_per_group
    start, length, _ = chunk_bounds(cu_chunk_ref, chunk, num_tokens, chunk_size)
    mask_m = m0 + jnp.arange(block_size_m) < size_m
    mask_n = n0 + jnp.arange(block_size_n) < size_n
    dA_last = dA_cumsum_ref[head, chunk, jnp.int32(chunk_size - 1)]

    def token_block(k, acc):
        k0, _, mask_k, tokens = token_tile(k, start, length, block_size_k)
        u = load_rows(u_ref, tokens, head, pl.ds(m0, block_size_m), mask_k, mask_m)  # (BK, BM)
        v = load_rows(v_ref, tokens, group, pl.ds(n0, block_size_n), mask_k, mask_n)  # (BK, BN)
        # block_size_k divides chunk_size, so these stay inside the chunk's row.
        dA = dA_cumsum_ref[head, chunk, pl.ds(k0, block_size_k)]
        if dt_out_ref is not None:
            decay = jnp.exp(dA_last - dA) * dt_out_ref[head, chunk, pl.ds(k0, block_size_k)]
        else:
            decay = jnp.exp(dA)
        scale = jnp.where(mask_k, decay, 0.0)
        v_scaled = (v.astype(jnp.float32) * scale[:, None]).astype(dot_dtype)
        return acc + tile_dot(u.astype(dot_dtype).T, v_scaled)

    acc = jax.lax.fori_loop(0, pl.cdiv(length, block_size_k), token_block,
                            jnp.zeros((block_size_m, block_size_n), jnp.float32))
    plgpu.store(out_ref.at[chunk, head, pl.ds(m0, block_size_m), pl.ds(n0, block_size_n)],
                acc, mask=mask_m[:, None] & mask_n[None, :])


def chunk_state_sum(stage, u, v, dt_out, dA_cumsum, cu_chunk_seqlens, dot_dtype):
    """``_chunk_state_kernel`` with ``stage``'s config: u (T, H, M), v
    (T, G, N), dt_out (H, K, L) or None, dA_cumsum (H, K, L) -> (K, H, M, N)
    float32."""
    num_tokens, nheads, size_m = u.shape
    ngroups, size_n = v.shape[1:]
    _, num_chunks, chunk_size = dA_cumsum.shape
    return tile_call(
        stage, _chunk_state_kernel, size_m, size_n, chunk_size,
        lambda tiles: (num_chunks, nheads, tiles),
        dict(num_tokens=num_tokens, heads_per_group=nheads // ngroups, size_m=size_m,
             size_n=size_n, chunk_size=chunk_size, dot_dtype=jnp.dtype(dot_dtype)),
        out_shape=jax.ShapeDtypeStruct((num_chunks, nheads, size_m, size_n), jnp.float32),
    )(u, v, dt_out, dA_cumsum, cu_chunk_seqlens)


def chunk_state(B, x, dt_out, dA_cumsum, cu_chunk_seqlens):
    """B (T, G, N), x (T, H, P), dt_out and dA_cumsum (H, K, L) -> the state
    each chunk builds from zero, (K, H, P, N) float32."""
    return chunk_state_sum("chunk_state", x, B, dt_out, dA_cumsum, cu_chunk_seqlens, x.dtype)


# The backward (issue 12): mirror ``torch_impl/ssd_chunk_state.py``.

def _chunk_cumsum_bwd_kernel(dt_ref, A_ref, dt_bias_ref, cu_chunk_ref, dt_out_ref, ddt_out_ref,
                             da_ref, da_last_ref, ddt_ref, dA_ref, ddt_bias_ref, *, dt_softplus,
                             dt_limit, num_tokens, nheads, chunk_size, block_size_h):
    """Grid (K, cdiv(H, block_size_h)): the decay gradient of one chunk
    (r_k = sum_{i>=k} d a_i, the last position taking the chunk's d a_last)
    into dt_out (+ A r) and A (+ dt r), then back through the clamp, the
    softplus and the bias."""
    chunk, start, _, heads, mask_h, in_chunk, dt = _chunk_dt(
        dt_ref, dt_bias_ref, cu_chunk_ref, num_tokens, nheads, chunk_size, block_size_h)
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
    num_chunks, chunk_size = dt_out.shape[1:]
    per_chunk = jax.ShapeDtypeStruct((num_chunks, dt.shape[1]), jnp.float32)
    ddt, dA, ddt_bias = _cumsum_call(
        "chunk_cumsum_bwd", _chunk_cumsum_bwd_kernel, dt, num_chunks, chunk_size, dt_softplus,
        dt_limit, out_shape=(jax.ShapeDtypeStruct(dt.shape, dt.dtype), per_chunk, per_chunk),
    )(dt, A, dt_bias, cu_chunk_seqlens, dt_out, ddt_out, da, da_last)
    return ddt, dA.sum(axis=0), None if dt_bias is None else ddt_bias.sum(axis=0)
