"""References written from the math, in plain jnp ops (no kernels).

``selective_state_update_ref`` computes in float64 and is what the kernels
are tested against. ``selective_state_update_jnp`` is the same math in a
chosen compute dtype: it backs the ``xla`` dispatch backend and can be
jitted. ``ssd_sequential_ref`` and ``ssd_chunked_ref`` are the chunked
scan's two float64 references (token by token, and chunked-quadratic).
Mirror: ``torch_impl/reference.py``.
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


# ---------------------------------------------------------------------------
# Chunked scan (SSD prefill): two float64 references written from the math.
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


def _ssd_output(y, x, D, z):
    """Adds the D skip and applies the z gate to y (..., H, P)."""
    if D is not None:
        y = y + (D[:, None] if D.ndim == 1 else D) * x
    if z is not None:
        y = y * z * jax.nn.sigmoid(z)
    return y


def _f64(*arrays):
    return [None if a is None else jnp.asarray(np.asarray(a, np.float64)) for a in arrays]


def ssd_sequential_ref(x, dt, A, B, C, cu_seqlens, D=None, z=None, dt_bias=None,
                       initial_states=None, dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """The SSD recurrence token by token, in float64. Per sequence q, head h
    (group g(h)), token t, from ``initial_states[q]`` (or 0):

        state = exp(A[h] dt[t,h]) state + dt[t,h] x[t,h]^T (outer) B[t,g]
        out[t,h] = state @ C[t,g] + D[h] x[t,h], then * z sigmoid(z)

    Returns numpy float64 ``(out (T, H, P), final_states (Q, H, P, N))``.
    """
    with jax.enable_x64(True):
        x, dt, A, B, C, D, z, dt_bias, initial_states = _f64(
            x, dt, A, B, C, D, z, dt_bias, initial_states)
        T, H, P = x.shape
        N = B.shape[2]
        heads_per_group = H // B.shape[1]
        cu = np.asarray(cu_seqlens, np.int64)
        Q = len(cu) - 1
        dt = _ssd_dt(dt, dt_bias, dt_softplus, dt_limit)
        B = jnp.repeat(B, heads_per_group, axis=1)  # (T, H, N)
        C = jnp.repeat(C, heads_per_group, axis=1)
        seq_of_token = jnp.asarray(np.repeat(np.arange(Q), np.diff(cu)))
        starts_seq = jnp.zeros(T, bool).at[cu[:-1]].set(True)
        ends_seq = jnp.zeros(T, bool).at[cu[1:] - 1].set(True)
        initial = jnp.zeros((Q, H, P, N)) if initial_states is None else initial_states

        def token_step(carry, token):
            state, final_states = carry
            x_t, dt_t, B_t, C_t, seq, is_start, is_end = token
            state = jnp.where(is_start, initial[seq], state)
            state = (jnp.exp(A * dt_t)[:, None, None] * state
                     + (dt_t[:, None] * x_t)[:, :, None] * B_t[:, None, :])
            final_states = final_states.at[seq].set(jnp.where(is_end, state, final_states[seq]))
            return (state, final_states), jnp.einsum("hpn,hn->hp", state, C_t)

        (_, final_states), y = jax.lax.scan(
            token_step, (jnp.zeros((H, P, N)), jnp.zeros((Q, H, P, N))),
            (x, dt, B, C, seq_of_token, starts_seq, ends_seq))
        return np.asarray(_ssd_output(y, x, D, z)), np.asarray(final_states)


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
    return _ssd_output(out, x, D, z), states


def ssd_chunked_ref(x, dt, A, B, C, chunk_size, cu_chunk_seqlens, seq_idx, last_chunk_indices,
                    D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False,
                    dt_limit=(0.0, float("inf")), return_intermediate_states=False):
    """``ssd_chunked_jnp`` in float64: numpy ``(out, states)``."""
    with jax.enable_x64(True):
        f64 = lambda a: None if a is None else np.asarray(a, np.float64)  # noqa: E731
        out, states = ssd_chunked_jnp(
            *map(f64, (x, dt, A, B, C)), chunk_size, cu_chunk_seqlens, seq_idx, last_chunk_indices,
            *map(f64, (D, z, dt_bias, initial_states)), dt_softplus, dt_limit,
            return_intermediate_states, compute_dtype=jnp.float64)
        return np.asarray(out), np.asarray(states)


# Causal depthwise conv1d: float64 references written from the math.

def _conv_sequence_ref(x_seq, history, weight, bias, silu, write_len, old, shift):
    """One sequence in float64: ``x_seq (n, D)``, ``history (W-1, D)``;
    returns ``(out (n, D), new_state (write_len, D))``: the last ``write_len``
    of ``old[shift : shift + write_len - n] ++ x_seq`` (``bridge.spec.conv_contract``)."""
    width = weight.shape[1]
    window = jnp.concatenate([history, x_seq])
    out = jnp.stack([(window[t:t + width] * weight.T).sum(0) for t in range(len(x_seq))]) \
        if len(x_seq) else jnp.zeros((0, weight.shape[0]), jnp.float64)
    if bias is not None:
        out = out + bias
    if silu:
        out = out * jax.nn.sigmoid(out)
    keep = max(write_len - len(x_seq), 0)
    return out, jnp.concatenate([old[shift:shift + keep], x_seq])[-write_len:]


def causal_conv1d_fn_ref(x, weight, bias=None, conv_states=None, query_start_loc=None,
                         cache_indices=None, has_initial_state=None, activation="silu",
                         pad_slot_id=NULL_BLOCK_ID, block_idx_first_scheduled_token=None,
                         block_idx_last_scheduled_token=None, initial_state_idx=None,
                         num_computed_tokens=None, block_size_to_align=0):
    """Float64 reference of ``causal_conv1d_fn``: numpy ``(out (D, T),
    new_conv_states (S, D, L))``, padding sequences' output columns NaN."""
    with jax.enable_x64(True):
        x, weight, bias, states = _f64(x, weight, bias, conv_states)
        width = weight.shape[1]
        out = np.full(x.shape, np.nan)
        states = np.array(states)
        bounds = np.asarray(query_start_loc).tolist()
        column = lambda a, seq: int(a[seq]) if a is not None else 0  # noqa: E731
        for seq, (begin, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            row = (np.asarray(cache_indices[seq]).reshape(-1).tolist() if cache_indices is not None
                   else [seq])
            slot = row[column(initial_state_idx, seq)]
            if cache_indices is not None and slot == pad_slot_id:
                continue
            init = has_initial_state is not None and bool(has_initial_state[seq])
            old = (jnp.asarray(states[slot, :, :width - 1].T) if init
                   else jnp.zeros((width - 1, x.shape[0]), jnp.float64))
            x_seq = x[:, begin:end].T
            y, new = _conv_sequence_ref(x_seq, old, weight, bias, activation is not None,
                                        width - 1, old, end - begin)
            out[:, begin:end] = np.asarray(y).T
            if block_idx_first_scheduled_token is not None:
                # The W-1 inputs before each block boundary crossed (prefix caching).
                window = np.asarray(jnp.concatenate([old, x_seq]))
                for block in range(column(block_idx_first_scheduled_token, seq),
                                   column(block_idx_last_scheduled_token, seq)):
                    cut = (block + 1) * block_size_to_align - column(num_computed_tokens, seq)
                    if row[block] != pad_slot_id:
                        states[row[block], :, :width - 1] = window[cut:cut + width - 1].T
            states[row[column(block_idx_last_scheduled_token, seq)], :, :width - 1] = np.asarray(new).T
        return out, states


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None,
                             conv_state_indices=None, num_accepted_tokens=None,
                             query_start_loc=None, pad_slot_id=NULL_BLOCK_ID,
                             block_idx_last_scheduled_token=None, initial_state_idx=None):
    """Float64 reference of ``causal_conv1d_update``: numpy ``(out,
    new_conv_state)``, padding rows of ``out`` NaN."""
    with jax.enable_x64(True):
        x, weight, bias = _f64(x, weight, bias)
        states = np.array(conv_state, np.float64)
        width, state_len = weight.shape[1], states.shape[2]
        out = np.full(x.shape, np.nan)
        num_seqs = x.shape[0] if query_start_loc is None else len(query_start_loc) - 1
        bounds = (list(range(num_seqs + 1)) if query_start_loc is None
                  else np.asarray(query_start_loc).tolist())
        column = lambda a, seq: int(a[seq]) if a is not None else 0  # noqa: E731
        reads = []  # every read before any write, as the kernel does per slot
        for seq in range(num_seqs):
            if conv_state_indices is None:
                read_slot = write_slot = seq
            else:
                indices = np.asarray(conv_state_indices).reshape(num_seqs, -1)
                read_slot = int(indices[seq, column(initial_state_idx, seq)])
                write_slot = int(indices[seq, column(block_idx_last_scheduled_token, seq)])
                if read_slot == pad_slot_id:
                    continue
            reads.append((seq, write_slot, jnp.asarray(states[read_slot].T)))
        for seq, write_slot, old in reads:
            begin, end = bounds[seq], bounds[seq + 1]
            if num_accepted_tokens is not None:
                offset = int(num_accepted_tokens[seq]) - 1
                shift = offset + 1
            else:
                offset, shift = 0, end - begin
            y, new = _conv_sequence_ref(x[begin:end], old[offset:offset + width - 1], weight, bias,
                                        activation is not None, state_len, old, shift)
            out[begin:end] = np.asarray(y)
            if end > begin:
                states[write_slot] = np.asarray(new).T
        return out, states


# Gated RMSNorm: the float64 reference.

def rms_norm_gated_ref(x, weight, z=None, eps=1e-6, group_size=None, norm_before_gate=False):
    """Float64 reference of ``rms_norm_gated`` (``bridge.spec.norm_contract``): numpy."""
    with jax.enable_x64(True):
        x, weight, z = _f64(x, weight, z)
        group_size = group_size or x.shape[-1]
        if z is not None and not norm_before_gate:
            x = x * jax.nn.silu(z)
        groups = x.reshape(*x.shape[:-1], -1, group_size)
        y = (groups * jax.lax.rsqrt(jnp.mean(groups ** 2, -1, keepdims=True) + eps)).reshape(x.shape)
        if weight is not None:
            y = y * weight
        if z is not None and norm_before_gate:
            y = y * jax.nn.silu(z)
        return np.asarray(y)
