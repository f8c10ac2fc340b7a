"""References written from the math, in plain jnp ops (no kernels).

``selective_state_update_ref`` computes in float64 and is what the kernels
are tested against. ``selective_state_update_jnp`` is the same math in a
chosen compute dtype: it backs the ``xla`` dispatch backend and can be
jitted. Mirror: ``torch_impl/reference.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bridge.ssu_contract import NULL_BLOCK_ID, check_ssu_args


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
    layout = check_ssu_args(
        {k: (tuple(v.shape) if v is not None else None) for k, v in dict(
            state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, z=z, out=out,
            state_batch_indices=state_batch_indices,
            dst_state_batch_indices=dst_state_batch_indices,
            num_accepted_tokens=num_accepted_tokens, cu_seqlens=cu_seqlens).items()},
        {})
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
        y = (h * C4[token][:, :, None, :]).sum(-1)
        if D4 is not None:
            y = y + D4 * x4[token]
        if z4 is not None:
            y = y * z4[token] * jax.nn.sigmoid(z4[token])
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


def selective_state_update_ref(state, x, dt, A, B, C, D=None, dt_bias=None, z=None,
                               dt_softplus=False, state_batch_indices=None,
                               dst_state_batch_indices=None, null_block_id=NULL_BLOCK_ID,
                               out=None, num_accepted_tokens=None, cu_seqlens=None):
    """Float64 reference: returns ``(out, new_state)`` as float64 arrays."""
    with jax.enable_x64(True):
        f64 = lambda a: None if a is None else jnp.asarray(np.asarray(a, np.float64))  # noqa: E731
        i64 = lambda a: None if a is None else jnp.asarray(np.asarray(a), jnp.int64)  # noqa: E731
        out64 = f64(out) if out is not None else jnp.zeros(x.shape, jnp.float64)
        return selective_state_update_jnp(
            f64(state), f64(x), f64(dt), f64(A), f64(B), f64(C), f64(D), f64(dt_bias), f64(z),
            dt_softplus, i64(state_batch_indices), i64(dst_state_batch_indices), null_block_id,
            out64, i64(num_accepted_tokens), i64(cu_seqlens), compute_dtype=jnp.float64)
