"""Chunked scan, stage 4 (bmm_chunk), in Pallas (Triton backend on GPU):
the chunk-local products C B^T, once per group; only tiles on or below the
diagonal. Mirror: ``torch_impl/ssd_bmm.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jax_impl.ssd_common import chunk_bounds, tile_call, tile_dot, tile_origin


def _bmm_chunk_kernel(C_ref, B_ref, cu_chunk_ref, CB_ref, *, num_tokens, dstate, chunk_size,
                      block_size_m, block_size_n, block_size_k):
    """Grid (K, G, cdiv(L, BM) * cdiv(L, BN)): one (BM, BN) tile of one
    chunk's C B^T, summed over dstate in ``block_size_k`` steps."""
    chunk, group = pl.program_id(0), pl.program_id(1)
    m0, n0 = tile_origin(pl.program_id(2), chunk_size, block_size_m, block_size_n)

    # The scan reads only j <= i: tiles wholly above the diagonal stay unwritten.
    @pl.when(n0 < m0 + block_size_m)
    def _():
        start, length, _ = chunk_bounds(cu_chunk_ref, chunk, num_tokens, chunk_size)
        mask_m = m0 + jnp.arange(block_size_m) < length
        mask_n = n0 + jnp.arange(block_size_n) < length

        def dstate_block(k, acc):
            k0 = k * block_size_k
            mask_k = k0 + jnp.arange(block_size_k) < dstate
            cols = pl.ds(k0, block_size_k)
            C = plgpu.load(C_ref.at[pl.ds(start + m0, block_size_m), group, cols],
                           mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BM, BK)
            B = plgpu.load(B_ref.at[pl.ds(start + n0, block_size_n), group, cols],
                           mask=mask_n[:, None] & mask_k[None, :], other=0.0)  # (BN, BK)
            return acc + tile_dot(C, B.T)

        acc = jax.lax.fori_loop(0, pl.cdiv(dstate, block_size_k), dstate_block,
                                jnp.zeros((block_size_m, block_size_n), jnp.float32))
        # Tiles divide chunk_size, so the whole tile is in bounds.
        CB_ref[chunk, group, pl.ds(m0, block_size_m), pl.ds(n0, block_size_n)] = acc


def bmm_chunk(C, B, cu_chunk_seqlens, chunk_size: int):
    """C, B (T, G, N) -> CB (K, G, L, L) float32 (0 past len_c; tiles wholly
    above the diagonal unset)."""
    num_tokens, ngroups, dstate = C.shape
    num_chunks = cu_chunk_seqlens.shape[0] - 1
    return tile_call(
        "bmm_chunk", _bmm_chunk_kernel, chunk_size, chunk_size, dstate,
        lambda tiles: (num_chunks, ngroups, tiles),
        dict(num_tokens=num_tokens, dstate=dstate, chunk_size=chunk_size),
        out_shape=jax.ShapeDtypeStruct((num_chunks, ngroups, chunk_size, chunk_size), jnp.float32),
    )(C, B, cu_chunk_seqlens)
