"""Chunked scan (SSD prefill), stage 4: the outputs, from the chunk-local
products and the state each chunk starts from, as a Pallas kernel (Triton
backend on GPU).

Mirror: ``torch_impl/ssd_chunk_scan.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bridge.spec.launch_config import clip_block
from jax_impl import platform
from jax_impl.ssd_chunk_state import compiler_params, launch_config, tile_dot


def _chunk_scan_kernel(*refs, names, heads_per_group, headdim, dstate, D_per_head,
                       block_size_m, block_size_n, block_size_k, block_size_dstate):
    """Grid (cdiv(L, BM) * cdiv(P, BN), K, H): one (BM, BN) tile of one
    chunk's outputs for one head (the tiles of a chunk run next to each
    other, sharing its C B^T and states in L2). ``names`` lists the input
    refs given."""
    ref = dict(zip(names, refs))
    out_ref = refs[len(names)]
    pid, chunk, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_blocks_n = pl.cdiv(headdim, block_size_n)
    m0, n0 = (pid // num_blocks_n) * block_size_m, (pid % num_blocks_n) * block_size_n
    group = head // heads_per_group
    start = ref["cu_chunk_seqlens"][chunk]
    length = ref["cu_chunk_seqlens"][chunk + 1] - start

    @pl.when(m0 < length)  # rows past the chunk's end are not written
    def _():
        offs_m = m0 + jnp.arange(block_size_m)
        mask_m = offs_m < length
        mask_n = n0 + jnp.arange(block_size_n) < headdim
        tile_mask = mask_m[:, None] & mask_n[None, :]
        rows, cols = pl.ds(start + m0, block_size_m), pl.ds(n0, block_size_n)
        dA_m = ref["dA_cumsum"][head, chunk, pl.ds(m0, block_size_m)]

        # The state this chunk starts from: the previous chunk's end state within
        # a sequence, else the sequence's initial state (or 0). Loads that are
        # masked off move no memory.
        seq = ref["seq_idx"][chunk]
        starts_seq = (chunk == 0) | (ref["seq_idx"][jnp.maximum(chunk - 1, 0)] != seq)
        mask_d = jnp.arange(block_size_dstate) < dstate
        state_mask = mask_n[:, None] & mask_d[None, :]
        state_cols = pl.ds(0, block_size_dstate)
        prev = plgpu.load(
            ref["end_states"].at[jnp.maximum(chunk - 1, 0), head, cols, state_cols],
            mask=state_mask & ~starts_seq, other=0.0).astype(jnp.float32)  # (BN, N)
        if "initial_states" in ref:
            initial = plgpu.load(ref["initial_states"].at[seq, head, cols, state_cols],
                                 mask=state_mask & starts_seq, other=0.0)
            prev = jnp.where(starts_seq, initial.astype(jnp.float32), prev)
        C = plgpu.load(ref["C"].at[rows, group, state_cols],
                       mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (BM, N)
        acc = tile_dot(C, prev.astype(C.dtype).T) * jnp.exp(dA_m)[:, None]

        # Within the chunk: sum over j <= i, so only up to the row tile's end.
        def causal_block(k, acc):
            k0 = k * block_size_k
            offs_k = k0 + jnp.arange(block_size_k)
            CB = ref["CB"][chunk, group, pl.ds(m0, block_size_m), pl.ds(k0, block_size_k)]
            dA_k = ref["dA_cumsum"][head, chunk, pl.ds(k0, block_size_k)]
            dt_k = ref["dt_out"][head, chunk, pl.ds(k0, block_size_k)]
            # where, not a product with a 0/1 mask: above the diagonal the
            # exponent may overflow and CB may be unwritten.
            weight = jnp.where(offs_k[None, :] <= offs_m[:, None],
                               CB * jnp.exp(dA_m[:, None] - dA_k[None, :]) * dt_k[None, :], 0.0)
            x = plgpu.load(ref["x"].at[pl.ds(start + k0, block_size_k), head, cols],
                           mask=(offs_k < length)[:, None] & mask_n[None, :], other=0.0)
            return acc + tile_dot(weight.astype(x.dtype), x)

        causal_end = jnp.minimum(m0 + block_size_m, length)
        acc = jax.lax.fori_loop(0, pl.cdiv(causal_end, block_size_k), causal_block, acc)

        if "D" in ref:
            x = plgpu.load(ref["x"].at[rows, head, cols], mask=tile_mask, other=0.0)
            if D_per_head:
                D = ref["D"][head].astype(jnp.float32)
            else:
                D = plgpu.load(ref["D"].at[head, cols], mask=mask_n, other=0.0)
                D = D.astype(jnp.float32)[None, :]
            acc = acc + x.astype(jnp.float32) * D
        if "z" in ref:
            z = plgpu.load(ref["z"].at[rows, head, cols], mask=tile_mask, other=0.0)
            z = z.astype(jnp.float32)
            acc = acc * z * jax.nn.sigmoid(z)
        plgpu.store(out_ref.at[rows, head, cols], acc.astype(out_ref.dtype), mask=tile_mask)


def chunk_scan(CB, x, dt_out, dA_cumsum, C, end_states, cu_chunk_seqlens, seq_idx, D=None,
               z=None, initial_states=None, out=None):
    """The outputs (T, H, P), in ``out``'s dtype (x's when not given). For
    i < len_c, with g = g(h) and ``prev`` the state chunk c starts from
    (``end_states[c-1]`` within a sequence, else ``initial_states[seq_idx[c]]``
    or 0):

        out[s_c+i, h] = exp(dA_cumsum[h,c,i]) * C[s_c+i, g] @ prev^T
                        + sum_{j<=i} CB[c,g,i,j] exp(dA_cumsum[h,c,i] - dA_cumsum[h,c,j])
                                     dt_out[h,c,j] x[s_c+j, h]
                        + D[h] * x[s_c+i, h],   then * z * sigmoid(z)

    Shapes: CB (K, G, L, L), x and z (T, H, P), dt_out and dA_cumsum
    (H, K, L), C (T, G, N), end_states (K, H, P, N), D (H,) or (H, P),
    initial_states (Q, H, P, N). A given ``out`` is written in place when
    donated under jit (``input_output_aliases``).
    """
    T, H, P = x.shape
    G, N = C.shape[1:]
    K, L = dA_cumsum.shape[1:]
    config = launch_config("chunk_scan")
    block_size_m = clip_block(L, config["BLOCK_SIZE_M"])
    block_size_n = clip_block(P, config["BLOCK_SIZE_N"])
    block_size_k = clip_block(L, config["BLOCK_SIZE_K"])
    operands = dict(CB=CB, x=x, dt_out=dt_out, dA_cumsum=dA_cumsum, C=C, end_states=end_states,
                    cu_chunk_seqlens=cu_chunk_seqlens, seq_idx=seq_idx)
    for name, value in dict(D=D, z=z, initial_states=initial_states, out=out).items():
        if value is not None:
            operands[name] = value
    names = tuple(operands)
    kernel = functools.partial(
        _chunk_scan_kernel, names=names, heads_per_group=H // G, headdim=P, dstate=N,
        D_per_head=D is not None and D.ndim == 1, block_size_m=block_size_m,
        block_size_n=block_size_n, block_size_k=block_size_k,
        block_size_dstate=clip_block(N))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((T, H, P), x.dtype if out is None else out.dtype),
        grid=(pl.cdiv(L, block_size_m) * pl.cdiv(P, block_size_n), K, H),
        input_output_aliases={} if out is None else {names.index("out"): 0},
        compiler_params=compiler_params(config),
        interpret=platform.INTERPRET,
        name="ssd_chunk_scan",
    )(*operands.values())
