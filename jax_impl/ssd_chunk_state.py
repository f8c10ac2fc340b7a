"""Chunked scan (SSD prefill), stage 1: per-chunk dt and decay cumsum, and
the state each chunk builds on its own, as Pallas kernels (Triton backend on
GPU). Also the tile helpers that every SSD stage shares.

Chunk c owns tokens s_c = cu_chunk_seqlens[c] .. e_c = cu_chunk_seqlens[c+1]
(len_c = e_c - s_c <= L = chunk_size); head h reads group h // (H // G).
Mirror: ``torch_impl/ssd_chunk_state.py``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bridge.spec.launch_config import SsdLaunchConfigs, clip_block
from jax_impl import platform


SSD_CONFIGS = SsdLaunchConfigs("pallas", Path(__file__).parent / "configs")


def launch_config(stage: str) -> dict:
    """The launch parameters of one chunked-scan stage on the default device:
    tuned for this GPU when a file exists (``bridge.spec.launch_config.SsdLaunchConfigs``)."""
    return SSD_CONFIGS.get(stage, platform.device_name())


def tile_dot(a, b):
    """(M, K) @ (K, N) on the tensor cores with float32 accumulation; float32
    inputs take the exact (IEEE) path rather than TF32."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)


def compiler_params(config: dict) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=config["num_warps"], num_stages=config["num_stages"])


def _chunk_cumsum_kernel(*refs, has_dt_bias, dt_softplus, dt_limit, nheads, chunk_size,
                         block_size_h):
    """Grid (K, cdiv(H, block_size_h)): one chunk's tokens (one tile of
    ``chunk_size``) for a block of heads."""
    if has_dt_bias:
        dt_ref, A_ref, dt_bias_ref, cu_chunk_ref, dA_cumsum_ref, dt_out_ref = refs
    else:
        dt_ref, A_ref, cu_chunk_ref, dA_cumsum_ref, dt_out_ref = refs
    chunk, pid_h = pl.program_id(0), pl.program_id(1)
    start = cu_chunk_ref[chunk]
    length = cu_chunk_ref[chunk + 1] - start
    head0 = pid_h * block_size_h
    heads = pl.ds(head0, block_size_h)
    mask_h = head0 + jnp.arange(block_size_h) < nheads
    mask_t = jnp.arange(chunk_size) < length
    tile_mask = mask_t[:, None] & mask_h[None, :]

    dt = plgpu.load(dt_ref.at[pl.ds(start, chunk_size), heads], mask=tile_mask,
                    other=0.0).astype(jnp.float32)  # (L, BH)
    if has_dt_bias:
        dt_bias = plgpu.load(dt_bias_ref.at[heads], mask=mask_h, other=0.0)
        dt = dt + dt_bias.astype(jnp.float32)[None, :]
    if dt_softplus:
        dt = jnp.where(dt > 20.0, dt, jnp.log1p(jnp.exp(dt)))
    if dt_limit != (0.0, float("inf")):
        dt = jnp.clip(dt, dt_limit[0], dt_limit[1])
    dt = jnp.where(tile_mask, dt, 0.0)  # after the clamp, which could lift padding above 0
    A = plgpu.load(A_ref.at[heads], mask=mask_h, other=0.0).astype(jnp.float32)
    dA_cumsum = jnp.cumsum(dt * A[None, :], axis=0)

    out_mask = jnp.broadcast_to(mask_h[:, None], (block_size_h, chunk_size))
    plgpu.store(dt_out_ref.at[heads, chunk, pl.ds(0, chunk_size)], dt.T, mask=out_mask)
    plgpu.store(dA_cumsum_ref.at[heads, chunk, pl.ds(0, chunk_size)], dA_cumsum.T, mask=out_mask)


def chunk_cumsum(dt, A, chunk_size: int, cu_chunk_seqlens, dt_bias=None, dt_softplus=False,
                 dt_limit=(0.0, float("inf"))):
    """dt (T, H), A (H,), dt_bias (H,) -> ``(dA_cumsum, dt_out)``, both
    (H, K, L) float32.

    ``dt_out[h, c, i]`` = clamp(softplus?(dt[s_c + i, h] + dt_bias[h]), dt_limit)
    for i < len_c and 0 past it; ``dA_cumsum`` is the inclusive cumsum over i
    of ``dt_out * A[h]`` (positions past len_c repeat the chunk total).
    """
    H = dt.shape[1]
    K = cu_chunk_seqlens.shape[0] - 1
    config = launch_config("chunk_cumsum")
    block_size_h = clip_block(H, config["BLOCK_SIZE_H"])
    operands = [dt, A] + ([dt_bias] if dt_bias is not None else []) + [cu_chunk_seqlens]
    kernel = functools.partial(
        _chunk_cumsum_kernel, has_dt_bias=dt_bias is not None, dt_softplus=bool(dt_softplus),
        dt_limit=tuple(float(v) for v in dt_limit), nheads=H, chunk_size=chunk_size,
        block_size_h=block_size_h)
    out_shape = jax.ShapeDtypeStruct((H, K, chunk_size), jnp.float32)
    return pl.pallas_call(
        kernel,
        out_shape=(out_shape, out_shape),
        grid=(K, pl.cdiv(H, block_size_h)),
        compiler_params=compiler_params(config),
        interpret=platform.INTERPRET,
        name="ssd_chunk_cumsum",
    )(*operands)


def _chunk_state_kernel(x_ref, B_ref, dt_out_ref, dA_cumsum_ref, cu_chunk_ref, states_ref, *,
                        heads_per_group, headdim, dstate, chunk_size, block_size_m,
                        block_size_n, block_size_k):
    """Grid (K, H, cdiv(P, BM) * cdiv(N, BN)): one (BM, BN) tile of one
    chunk's state, summed over the chunk's tokens in ``block_size_k`` steps."""
    chunk, head, pid = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_blocks_n = pl.cdiv(dstate, block_size_n)
    m0, n0 = (pid // num_blocks_n) * block_size_m, (pid % num_blocks_n) * block_size_n
    group = head // heads_per_group
    start = cu_chunk_ref[chunk]
    length = cu_chunk_ref[chunk + 1] - start
    mask_m = m0 + jnp.arange(block_size_m) < headdim
    mask_n = n0 + jnp.arange(block_size_n) < dstate
    dA_last = dA_cumsum_ref[head, chunk, chunk_size - 1]

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
        scale = jnp.exp(dA_last - dA) * dt  # dt is 0 past the chunk's end
        B_scaled = (B.astype(jnp.float32) * scale[:, None]).astype(x.dtype)
        return acc + tile_dot(x.T, B_scaled)

    acc = jax.lax.fori_loop(0, pl.cdiv(length, block_size_k), token_block,
                            jnp.zeros((block_size_m, block_size_n), jnp.float32))
    plgpu.store(states_ref.at[chunk, head, pl.ds(m0, block_size_m), pl.ds(n0, block_size_n)],
                acc, mask=mask_m[:, None] & mask_n[None, :])


def chunk_state(B, x, dt_out, dA_cumsum, cu_chunk_seqlens):
    """B (T, G, N), x (T, H, P), dt_out and dA_cumsum (H, K, L) -> the state
    each chunk builds from zero, (K, H, P, N) float32:

        states[c, h] = sum_{i < len_c} x[s_c+i, h]^T (outer) B[s_c+i, g(h)]
                       * dt_out[h, c, i] * exp(dA_cumsum[h, c, L-1] - dA_cumsum[h, c, i])
    """
    H, P = x.shape[1:]
    G, N = B.shape[1:]
    _, K, L = dA_cumsum.shape
    config = launch_config("chunk_state")
    block_size_m = clip_block(P, config["BLOCK_SIZE_M"])
    block_size_n = clip_block(N, config["BLOCK_SIZE_N"])
    block_size_k = clip_block(L, config["BLOCK_SIZE_K"])
    kernel = functools.partial(
        _chunk_state_kernel, heads_per_group=H // G, headdim=P, dstate=N, chunk_size=L,
        block_size_m=block_size_m, block_size_n=block_size_n, block_size_k=block_size_k)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((K, H, P, N), jnp.float32),
        grid=(K, H, pl.cdiv(P, block_size_m) * pl.cdiv(N, block_size_n)),
        compiler_params=compiler_params(config),
        interpret=platform.INTERPRET,
        name="ssd_chunk_state",
    )(x, B, dt_out, dA_cumsum, cu_chunk_seqlens)
