"""The ops' math in plain jnp ops (no kernels), in a chosen compute dtype.

``selective_state_update_jnp`` backs the ``xla`` dispatch backend and can be
jitted; ``ssd_chunked_jnp`` is the chunked scan's plain-ops baseline in the
benchmarks and, in float64, the float64 reference the gradient tests
differentiate (``jax.vjp``). The tests' forward references are numpy
(``tests/reference.py``). Mirror: ``torch_impl/reference.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bridge.spec.ssu_contract import NULL_BLOCK_ID, REFERENCE_FLOAT_DTYPES, check_ssu_args


def _as_4d(array, layout, full_shape, head_axis):
    """Spec shapes -> (token|slot, head, dim[, dstate]) with per-head values
    broadcast over dim (and dstate)."""
    if array is None:
        return None
    if layout.state_ndim == 3:
        return jnp.expand_dims(array, head_axis)
    if full_shape is None:
        return array
    return jnp.broadcast_to(array.reshape(array.shape + (1,) * (len(full_shape) - array.ndim)),
                            full_shape)


def _skip_and_gate(y, x, D, z):
    """y (..., H, P) + D x (D (H,) or (H, P)), then times silu(z) (either may be None)."""
    if D is not None:
        y = y + (D[:, None] if D.ndim == 1 else D) * x
    if z is not None:
        y = y * z * jax.nn.sigmoid(z)
    return y


def _max_seqlen(layout, cu_seqlens, spec):
    """Static trip count of the token loop."""
    if cu_seqlens is None:
        return 1
    if not isinstance(cu_seqlens, jax.core.Tracer):
        return int(np.diff(np.asarray(cu_seqlens)).max(initial=0))
    return layout.index_columns if spec else layout.num_tokens


def selective_state_update_jnp(state, x, dt, A, B, C, D=None, dt_bias=None, z=None,
                               dt_softplus=False, state_batch_indices=None,
                               dst_state_batch_indices=None, null_block_id=NULL_BLOCK_ID,
                               out=None, num_accepted_tokens=None, cu_seqlens=None,
                               compute_dtype=jnp.float32):
    """The decode step in jnp ops: returns ``(out, new_state)`` with the
    kernel's rules (padding entries untouched)."""
    layout = check_ssu_args(state, x, dt, A, B, C, D, dt_bias, z, out, state_batch_indices,
                            dst_state_batch_indices, num_accepted_tokens, cu_seqlens,
                            null_block_id=null_block_id, float_dtypes=REFERENCE_FLOAT_DTYPES)
    T, H, P, N = layout.num_tokens, layout.nheads, layout.dim, layout.dstate
    S = layout.num_slots
    if out is None:
        out = jnp.zeros_like(x)
    state4 = state[:, None] if layout.state_ndim == 3 else state
    out4 = out[:, None] if layout.state_ndim == 3 else out
    c = lambda a: jnp.asarray(a, compute_dtype)  # noqa: E731
    x4 = c(_as_4d(x, layout, (T, H, P), 1))
    dt4 = c(_as_4d(dt, layout, (T, H, P), 1))
    A4 = c(_as_4d(A, layout, (H, P, N), 0))
    if dt_bias is not None:
        dt4 = dt4 + c(_as_4d(dt_bias, layout, (H, P), 0))
    if dt_softplus:
        dt4 = jax.nn.softplus(dt4)
    # Groups -> heads: head h reads group h // (H / G).
    B4 = jnp.repeat(c(_as_4d(B, layout, None, 1)), layout.heads_per_group, axis=1)
    C4 = jnp.repeat(c(_as_4d(C, layout, None, 1)), layout.heads_per_group, axis=1)
    D4 = c(_as_4d(D, layout, (H, P), 0)) if D is not None else None
    z4 = c(_as_4d(z, layout, (T, H, P), 1)) if z is not None else None

    if cu_seqlens is None:
        starts, lengths = jnp.arange(T), jnp.ones(T, jnp.int32)
    else:
        starts, lengths = cu_seqlens[:-1], cu_seqlens[1:] - cu_seqlens[:-1]
    Q = layout.num_seqs
    seqs = jnp.arange(Q)
    spec = num_accepted_tokens is not None
    if state_batch_indices is None:
        src_slot = final_dst = seqs
        dst = None
        active = jnp.ones(Q, bool)
    else:
        src = state_batch_indices.reshape(state_batch_indices.shape[0], -1)[:Q]
        dst = dst_state_batch_indices if dst_state_batch_indices is not None else state_batch_indices
        dst = dst.reshape(dst.shape[0], -1)[:Q]
        first_col = jnp.maximum(num_accepted_tokens - 1, 0) if spec else jnp.zeros(Q, jnp.int32)
        src_slot = src[seqs, first_col]
        final_dst = dst[:, 0]
        active = src_slot != null_block_id

    h = c(state4[jnp.where(active, src_slot, 0)])  # (Q, H, P, N): all reads before any write

    def token_step(t, carry):
        h, out4, state4 = carry
        live = active & (t < lengths)
        token = jnp.minimum(starts + t, T - 1)
        decay = jnp.exp(A4[None] * dt4[token][..., None])
        h = jnp.where(live[:, None, None, None],
                      h * decay + (dt4[token] * x4[token])[..., None] * B4[token][:, :, None, :], h)
        y = _skip_and_gate((h * C4[token][:, :, None, :]).sum(-1), x4[token], D4,
                           None if z4 is None else z4[token])
        out4 = out4.at[jnp.where(live, token, T)].set(y.astype(out4.dtype), mode="drop")
        if spec:
            column = dst[:, jnp.minimum(t, dst.shape[1] - 1)]
            keep = live & (column != null_block_id)
            state4 = state4.at[jnp.where(keep, column, S)].set(h.astype(state4.dtype), mode="drop")
        return h, out4, state4

    h, out4, state4 = jax.lax.fori_loop(0, _max_seqlen(layout, cu_seqlens, spec), token_step,
                                        (h, out4, state4))
    if not spec:
        keep = active & (lengths > 0)
        if state_batch_indices is not None:
            keep = keep & (final_dst != null_block_id)
        state4 = state4.at[jnp.where(keep, final_dst, S)].set(h.astype(state4.dtype), mode="drop")
    return out4.reshape(out.shape), state4.reshape(state.shape)


# --- Chunked scan (SSD prefill) -------------------------------------------------
# Shapes: bridge.spec.ssd_contract (x (T, H, P), dt (T, H), B and C (T, G, N), ...).


def _ssd_dt(dt, dt_bias, dt_softplus, dt_limit):
    """dt as the recurrence uses it: biased, softplus-ed (x past 20), clamped."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = jnp.where(dt > 20.0, dt, jnp.log1p(jnp.exp(dt)))
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = jnp.clip(dt, dt_limit[0], dt_limit[1])
    return dt


def ssd_chunked_jnp(x, dt, A, B, C, chunk_size, cu_chunk_seqlens, seq_idx, last_chunk_indices,
                    D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False,
                    dt_limit=(0.0, float("inf")), return_intermediate_states=False,
                    compute_dtype=jnp.float32, chunks_per_step=16):
    """The recurrence in its chunked-quadratic form, in plain jnp ops and
    ``compute_dtype``: within chunk c (cumulative decay a_i = sum_{k<=i} A dt_k
    over the chunk's tokens)

        out_i = sum_{j<=i} (C_i . B_j) exp(a_i - a_j) dt_j x_j + exp(a_i) C_i @ start_c^T
        end_c = exp(a_last) start_c + sum_j exp(a_last - a_j) dt_j x_j^T (outer) B_j

    where ``start_c`` is ``end_{c-1}`` within a sequence, else the sequence's
    initial state (or 0); then the D skip and z gate. Returns ``(out (T, H, P),
    states)`` as the varlen call returns them. The chunk metadata must be
    concrete (numpy): jit this with the metadata closed over. The (L, L)
    products run ``chunks_per_step`` chunks at a time to bound memory.
    """
    cast = lambda a: None if a is None else jnp.asarray(a, compute_dtype)  # noqa: E731
    x, dt, A, B, C, D, z, dt_bias, initial_states = map(
        cast, (x, dt, A, B, C, D, z, dt_bias, initial_states))
    T, H, P = x.shape
    G, N = B.shape[1:]
    R = H // G  # heads per group
    bounds = np.asarray(cu_chunk_seqlens, np.int64)
    seqs = np.asarray(seq_idx, np.int64)
    num_chunks = len(bounds) - 1
    # Chunks padded to L tokens: (K, L, ...), padding tokens zeroed.
    position = np.arange(chunk_size)
    valid = position[None, :] < np.diff(bounds)[:, None]  # (K, L)
    token = np.where(valid, bounds[:-1, None] + position[None, :], 0)
    pad = lambda a: a[token] * valid.reshape(valid.shape + (1,) * (a.ndim - 1))  # noqa: E731
    dt = pad(_ssd_dt(dt, dt_bias, dt_softplus, dt_limit)).reshape(num_chunks, chunk_size, G, R)
    x_c = pad(x).reshape(num_chunks, chunk_size, G, R, P)
    B_c, C_c = pad(B), pad(C)  # (K, L, G, N)
    a = jnp.cumsum(dt * A.reshape(G, R), axis=1)  # (K, L, G, R)

    # Each chunk's state from a zero start, then carried across chunks.
    to_end = jnp.exp(a[:, -1:] - a) * dt
    chunk_own = jnp.einsum("klgr,klgrp,klgn->kgrpn", to_end, x_c, B_c)
    starts_seq = np.concatenate([[True], seqs[1:] != seqs[:-1]])
    initial = (jnp.zeros((len(np.asarray(last_chunk_indices)), G, R, P, N), compute_dtype)
               if initial_states is None else initial_states.reshape(-1, G, R, P, N))

    def chunk_step(prev_end, chunk):
        starts, seq, total_decay, own = chunk
        start = jnp.where(starts, initial[seq], prev_end)
        end = jnp.exp(total_decay)[..., None, None] * start + own
        return end, (start, end)

    _, (start_states, end_states) = jax.lax.scan(
        chunk_step, jnp.zeros((G, R, P, N), compute_dtype),
        (jnp.asarray(starts_seq), jnp.asarray(seqs), a[:, -1], chunk_own))

    y = jnp.einsum("klgn,kgrpn->klgrp", C_c, start_states) * jnp.exp(a)[..., None]
    causal = (position[:, None] >= position[None, :])[None, :, :, None, None]
    within = []
    for first in range(0, num_chunks, chunks_per_step):
        part = slice(first, first + chunks_per_step)
        CB = jnp.einsum("kign,kjgn->kgij", C_c[part], B_c[part])
        exponent = a[part][:, :, None] - a[part][:, None, :]  # (k, i, j, G, R)
        decay = jnp.exp(jnp.where(causal, exponent, -jnp.inf))
        weight = CB.transpose(0, 2, 3, 1)[..., None] * decay * dt[part][:, None]  # (k, i, j, G, R)
        within.append(jnp.einsum("kijgr,kjgrp->kigrp", weight, x_c[part]))
    y = y + jnp.concatenate(within)

    out = jnp.zeros((T, H, P), compute_dtype).at[token[valid]].set(
        y.reshape(num_chunks, chunk_size, H, P)[valid])
    end_states = end_states.reshape(num_chunks, H, P, N)
    states = end_states if return_intermediate_states else end_states[np.asarray(last_chunk_indices)]
    return _skip_and_gate(out, x, D, z), states
