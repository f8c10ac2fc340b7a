"""The float64 references of the tests, one per op, in numpy, written from the
math of the contracts (``bridge.spec.*_contract``), never from a kernel.

Each takes numpy arrays (float64 values, int64 indices: ``frameworks``
converts a side's native arrays, rounded as the kernel sees them) with the
op's argument names, and returns new float64 arrays; the inputs are left
unchanged. Sequences and tokens run in plain Python loops: clear, and small
enough for the test cases. The differentiable float64 forms of the gradient
tests are the packages' plain-ops functions (``*_torch_ops``, ``*_jnp``)."""

from __future__ import annotations

import math

import numpy as np

from bridge.spec.ssu_contract import NULL_BLOCK_ID


def _silu(v):
    return v / (1 + np.exp(-v))


def _broadcast(array, shape):
    """A per-head (or per-row) ``array`` repeated over the trailing axes of ``shape``."""
    return np.broadcast_to(array.reshape(array.shape + (1,) * (len(shape) - array.ndim)), shape)


def selective_state_update(state, x, dt, A, B, C, D=None, dt_bias=None, z=None, dt_softplus=False,
                           state_batch_indices=None, dst_state_batch_indices=None,
                           null_block_id=NULL_BLOCK_ID, out=None, num_accepted_tokens=None,
                           cu_seqlens=None):
    """One decode step (or a few speculative tokens) per sequence q:

        h = state[src slot]; per token t of q:
        h = exp(A dt_t) h + dt_t x_t (outer) B_t[g(h)],  out_t = h @ C_t + D x_t, * silu(z_t)

    with ``dt_t = softplus(dt + dt_bias)``; ``h`` goes to the destination
    slot (every token's column with ``num_accepted_tokens``, which also picks
    the source column). A sequence whose source slot is ``null_block_id``
    is skipped. Every read happens before any write. Returns ``(out,
    new_state)``; ``out`` starts as a copy of the given ``out`` (or zeros)."""
    three_d = state.ndim == 3
    head = (lambda a, axis: None if a is None else np.expand_dims(a, axis)) if three_d else \
        (lambda a, axis: a)
    new_state = np.array(head(state, 1), np.float64)
    x, dt, B, C, z = (head(a, 1) for a in (x, dt, B, C, z))
    A, D, dt_bias = (head(a, 0) for a in (A, D, dt_bias))
    T, H, P = x.shape
    N = new_state.shape[-1]
    out = np.zeros((T, H, P)) if out is None else np.array(head(out, 1), np.float64)
    dt = _broadcast(dt, (T, H, P)) + (0 if dt_bias is None else _broadcast(dt_bias, (H, P)))
    if dt_softplus:
        dt = np.logaddexp(0, dt)
    A = _broadcast(A, (H, P, N))
    group = np.arange(H) // (H // B.shape[1])  # head h reads group h // (H / G)

    bounds = np.arange(T + 1) if cu_seqlens is None else np.asarray(cu_seqlens)
    spec = num_accepted_tokens is not None
    steps = []  # (tokens, destination slot per token or None, h): all reads first
    for q in range(len(bounds) - 1):
        if state_batch_indices is None:
            src, dst = [q], [q]
        else:
            src = np.asarray(state_batch_indices).reshape(len(state_batch_indices), -1)[q]
            dst = state_batch_indices if dst_state_batch_indices is None else dst_state_batch_indices
            dst = np.asarray(dst).reshape(len(dst), -1)[q]
        slot = src[max(int(num_accepted_tokens[q]) - 1, 0) if spec else 0]
        if state_batch_indices is not None and slot == null_block_id:
            continue
        steps.append((range(bounds[q], bounds[q + 1]), dst, new_state[slot].copy()))
    for tokens, dst, h in steps:
        for column, t in enumerate(tokens):
            h = np.exp(A * dt[t][..., None]) * h + (dt[t] * x[t])[..., None] * B[t][group][:, None, :]
            y = (h * C[t][group][:, None, :]).sum(-1)
            if D is not None:
                y = y + _broadcast(D, (H, P)) * x[t]
            out[t] = y if z is None else y * _silu(z[t])
            if spec and dst[column] != null_block_id:
                new_state[dst[column]] = h
        if not spec and len(tokens) and (state_batch_indices is None or dst[0] != null_block_id):
            new_state[dst[0]] = h
    if three_d:
        return out[:, 0], new_state[:, 0]
    return out, new_state


def mamba_chunk_scan_combined_varlen(x, dt, A, B, C, cu_seqlens, cu_chunk_seqlens=None, D=None,
                                     z=None, dt_bias=None, initial_states=None, dt_softplus=False,
                                     dt_limit=(0.0, math.inf), return_intermediate_states=False):
    """The chunked scan's recurrence token by token (no chunks in the math):
    per sequence q, head h (group g(h)), from ``initial_states[q]`` (or 0),

        state = exp(A[h] dt[t,h]) state + dt[t,h] x[t,h] (outer) B[t,g]
        out[t,h] = state @ C[t,g] + D[h] x[t,h], then * silu(z[t,h])

    with ``dt`` biased, softplus-ed and clamped to ``dt_limit``. Returns
    ``(out (T, H, P), states)``: each sequence's final state (Q, H, P, N),
    or with ``return_intermediate_states`` the state after the last token of
    every chunk of ``cu_chunk_seqlens`` (K, H, P, N)."""
    T, H, P = x.shape
    N = B.shape[2]
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = np.logaddexp(0, dt)
    dt = np.clip(dt, *dt_limit)
    group = np.arange(H) // (H // B.shape[1])
    chunk_ends = set() if cu_chunk_seqlens is None else set(np.asarray(cu_chunk_seqlens)[1:].tolist())
    out, finals, ends = np.empty((T, H, P)), [], []
    bounds = np.asarray(cu_seqlens)
    for q in range(len(bounds) - 1):
        state = np.zeros((H, P, N)) if initial_states is None else initial_states[q].copy()
        for t in range(bounds[q], bounds[q + 1]):
            state = (np.exp(A * dt[t])[:, None, None] * state
                     + (dt[t][:, None] * x[t])[:, :, None] * B[t][group][:, None, :])
            out[t] = (state * C[t][group][:, None, :]).sum(-1)
            if t + 1 in chunk_ends:
                ends.append(state)
        finals.append(state)
    if D is not None:
        out = out + (D[:, None] if D.ndim == 1 else D) * x
    if z is not None:
        out = out * _silu(z)
    return out, np.stack(ends if return_intermediate_states else finals)


def _conv_sequence(x_seq, history, weight, bias, silu, write_len, old, shift):
    """One sequence: ``x_seq (n, D)``, ``history (W-1, D)``; returns ``(out
    (n, D), new_state (write_len, D))``: the last ``write_len`` of
    ``old[shift : shift + write_len - n] ++ x_seq`` (``bridge.spec.conv_contract``)."""
    width = weight.shape[1]
    window = np.concatenate([history, x_seq])
    out = np.stack([(window[t:t + width] * weight.T).sum(0) for t in range(len(x_seq))]) \
        if len(x_seq) else np.zeros((0, weight.shape[0]))
    if bias is not None:
        out = out + bias
    if silu:
        out = _silu(out)
    keep = max(write_len - len(x_seq), 0)
    return out, np.concatenate([old[shift:shift + keep], x_seq])[-write_len:]


def _column(array, seq):
    return int(array[seq]) if array is not None else 0


def causal_conv1d_fn(x, weight, bias=None, conv_states=None, query_start_loc=None,
                     cache_indices=None, has_initial_state=None, activation="silu",
                     pad_slot_id=NULL_BLOCK_ID, block_idx_first_scheduled_token=None,
                     block_idx_last_scheduled_token=None, initial_state_idx=None,
                     num_computed_tokens=None, block_size_to_align=0):
    """The depthwise causal conv over packed sequences, ``x (D, T)``: each
    output is the dot of the last W inputs (the sequence's history from its
    slot, or zeros, before its first token) with ``weight (D, W)``, plus
    bias, through silu. Returns ``(out (D, T), new_conv_states (S, D, L))``;
    a padding sequence's output columns are NaN and its slot untouched."""
    width = weight.shape[1]
    states = np.array(conv_states, np.float64)
    out = np.full(x.shape, np.nan)
    bounds = np.asarray(query_start_loc).tolist()
    for seq, (begin, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        row = np.asarray(cache_indices[seq]).reshape(-1).tolist() if cache_indices is not None else [seq]
        slot = row[_column(initial_state_idx, seq)]
        if cache_indices is not None and slot == pad_slot_id:
            continue
        init = has_initial_state is not None and bool(has_initial_state[seq])
        old = states[slot, :, :width - 1].T.copy() if init else np.zeros((width - 1, x.shape[0]))
        x_seq = x[:, begin:end].T
        y, new = _conv_sequence(x_seq, old, weight, bias, activation is not None, width - 1, old,
                                end - begin)
        out[:, begin:end] = y.T
        if block_idx_first_scheduled_token is not None:
            # The W-1 inputs before each block boundary crossed (prefix caching).
            window = np.concatenate([old, x_seq])
            for block in range(_column(block_idx_first_scheduled_token, seq),
                               _column(block_idx_last_scheduled_token, seq)):
                cut = (block + 1) * block_size_to_align - _column(num_computed_tokens, seq)
                if row[block] != pad_slot_id:
                    states[row[block], :, :width - 1] = window[cut:cut + width - 1].T
        states[row[_column(block_idx_last_scheduled_token, seq)], :, :width - 1] = new.T
    return out, states


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, conv_state_indices=None,
                         num_accepted_tokens=None, query_start_loc=None, pad_slot_id=NULL_BLOCK_ID,
                         block_idx_last_scheduled_token=None, initial_state_idx=None):
    """The conv's decode form, ``x (T, D)`` (one token per sequence, or
    packed by ``query_start_loc``): the history is the slot's state (from
    column ``num_accepted_tokens - 1`` in speculative decoding), which then
    shifts by the tokens consumed. Returns ``(out, new_conv_state)``; a
    padding sequence's rows of ``out`` are NaN."""
    width, state_len = weight.shape[1], conv_state.shape[2]
    states = np.array(conv_state, np.float64)
    out = np.full(x.shape, np.nan)
    num_seqs = x.shape[0] if query_start_loc is None else len(query_start_loc) - 1
    bounds = range(num_seqs + 1) if query_start_loc is None else np.asarray(query_start_loc).tolist()
    reads = []  # every read before any write, as the kernel does per slot
    for seq in range(num_seqs):
        if conv_state_indices is None:
            read_slot = write_slot = seq
        else:
            indices = np.asarray(conv_state_indices).reshape(num_seqs, -1)
            read_slot = int(indices[seq, _column(initial_state_idx, seq)])
            write_slot = int(indices[seq, _column(block_idx_last_scheduled_token, seq)])
            if read_slot == pad_slot_id:
                continue
        reads.append((seq, write_slot, states[read_slot].T.copy()))
    for seq, write_slot, old in reads:
        begin, end = bounds[seq], bounds[seq + 1]
        if num_accepted_tokens is not None:
            offset = int(num_accepted_tokens[seq]) - 1
            shift = offset + 1
        else:
            offset, shift = 0, end - begin
        y, new = _conv_sequence(x[begin:end], old[offset:offset + width - 1], weight, bias,
                                activation is not None, state_len, old, shift)
        out[begin:end] = y
        if end > begin:
            states[write_slot] = new.T
    return out, states


def rms_norm_gated(x, weight, z=None, eps=1e-6, group_size=None, norm_before_gate=False,
                   residual=None):
    """``x (..., hidden)`` gated by ``silu(z)`` before (or after) an RMS norm
    over groups of ``group_size`` channels, times ``weight``
    (``bridge.spec.norm_contract``). With ``residual`` (no gate): ``(the
    norm of s, s)`` for ``s = x + residual``."""
    if residual is not None:
        s = x + residual
        return rms_norm_gated(s, weight, eps=eps, group_size=group_size), s
    group_size = group_size or x.shape[-1]
    if z is not None and not norm_before_gate:
        x = x * _silu(z)
    groups = x.reshape(*x.shape[:-1], -1, group_size)
    y = (groups / np.sqrt(np.mean(groups ** 2, -1, keepdims=True) + eps)).reshape(x.shape)
    if weight is not None:
        y = y * weight
    if z is not None and norm_before_gate:
        y = y * _silu(z)
    return y
