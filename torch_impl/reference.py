"""References written from the math, in plain torch ops (no kernels).

The ``*_ref`` functions compute in float64 and are what the kernels are
tested against. The ``*_torch_ops`` functions are the same math in a chosen
compute dtype: ``selective_state_update_torch_ops`` writes in place like the
kernel and backs the ``reference`` dispatch backend;
``ssd_chunked_torch_ops`` is the chunked scan's plain-ops baseline in the
benchmarks. Mirror: ``jax_impl/reference.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bridge.spec.ssu_contract import NULL_BLOCK_ID, REFERENCE_FLOAT_DTYPES, check_ssu_args


def _as_4d(tensor, layout, full_shape, head_axis):
    """Spec shapes -> (token|slot, head, dim[, dstate]) with per-head values
    broadcast over dim (and dstate)."""
    if tensor is None:
        return None
    if layout.state_ndim == 3:
        return tensor.unsqueeze(head_axis)
    if full_shape is None:
        return tensor
    while tensor.dim() < len(full_shape):
        tensor = tensor.unsqueeze(-1)
    return tensor.expand(full_shape)


def selective_state_update_torch_ops(state, x, dt, A, B, C, D=None, dt_bias=None, z=None,
                                     dt_softplus=False, state_batch_indices=None,
                                     dst_state_batch_indices=None, null_block_id=NULL_BLOCK_ID,
                                     out=None, num_accepted_tokens=None, cu_seqlens=None,
                                     compute_dtype=torch.float32):
    """The decode step in torch ops: updates ``state`` and ``out`` in place
    (same rules as the kernel: padding entries untouched) and returns ``out``."""
    layout = check_ssu_args(state, x, dt, A, B, C, D, dt_bias, z, out, state_batch_indices,
                            dst_state_batch_indices, num_accepted_tokens, cu_seqlens,
                            null_block_id=null_block_id, float_dtypes=REFERENCE_FLOAT_DTYPES)
    T, H, P, N = layout.num_tokens, layout.nheads, layout.dim, layout.dstate
    if out is None:
        out = torch.zeros_like(x)
    state4 = state.unsqueeze(1) if layout.state_ndim == 3 else state
    out4 = out.unsqueeze(1) if layout.state_ndim == 3 else out
    c = lambda t: t.to(compute_dtype)  # noqa: E731
    x4 = c(_as_4d(x, layout, (T, H, P), 1))
    dt4 = c(_as_4d(dt, layout, (T, H, P), 1))
    A4 = c(_as_4d(A, layout, (H, P, N), 0))
    if dt_bias is not None:
        dt4 = dt4 + c(_as_4d(dt_bias, layout, (H, P), 0))
    if dt_softplus:
        dt4 = F.softplus(dt4)
    # Groups -> heads: head h reads group h // (H / G).
    B4 = c(_as_4d(B, layout, None, 1)).repeat_interleave(layout.heads_per_group, dim=1)
    C4 = c(_as_4d(C, layout, None, 1)).repeat_interleave(layout.heads_per_group, dim=1)
    D4 = c(_as_4d(D, layout, (H, P), 0)) if D is not None else None
    z4 = c(_as_4d(z, layout, (T, H, P), 1)) if z is not None else None

    device = x.device
    if cu_seqlens is None:
        starts = torch.arange(T, device=device)
        lengths = torch.ones(T, dtype=torch.long, device=device)
    else:
        starts = cu_seqlens[:-1].long()
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    Q = layout.num_seqs
    seqs = torch.arange(Q, device=device)
    spec = num_accepted_tokens is not None
    if state_batch_indices is None:
        src_slot = final_dst = seqs
        dst = None
        active = torch.ones(Q, dtype=torch.bool, device=device)
    else:
        src = state_batch_indices.reshape(state_batch_indices.shape[0], -1)[:Q].long()
        dst = dst_state_batch_indices if dst_state_batch_indices is not None else state_batch_indices
        dst = dst.reshape(dst.shape[0], -1)[:Q].long()
        first_col = (num_accepted_tokens.long() - 1).clamp(min=0) if spec else torch.zeros_like(seqs)
        src_slot = src[seqs, first_col]
        final_dst = dst[:, 0]
        active = src_slot != null_block_id

    h = c(state4[torch.where(active, src_slot, 0)])  # (Q, H, P, N): all reads before any write
    max_len = 1 if cu_seqlens is None else (int(lengths.max()) if Q else 0)  # no sync in decode
    for t in range(max_len):
        live = active & (t < lengths)
        token = (starts + t).clamp(max=T - 1)
        decay = torch.exp(A4[None] * dt4[token][..., None])
        h = torch.where(live[:, None, None, None],
                        h * decay + (dt4[token] * x4[token])[..., None] * B4[token][:, :, None, :], h)
        y = (h * C4[token][:, :, None, :]).sum(-1)
        if D4 is not None:
            y = y + D4 * x4[token]
        if z4 is not None:
            y = y * z4[token] * torch.sigmoid(z4[token])
        out4[token[live]] = y[live].to(out.dtype)
        if spec:
            keep = live & (dst[:, t] != null_block_id)
            state4[dst[keep, t]] = h[keep].to(state.dtype)
    if not spec:
        keep = active & (lengths > 0)
        if state_batch_indices is not None:
            keep = keep & (final_dst != null_block_id)
        state4[final_dst[keep]] = h[keep].to(state.dtype)
    return out


def selective_state_update_ref(state, x, dt, A, B, C, D=None, dt_bias=None, z=None,
                               dt_softplus=False, state_batch_indices=None,
                               dst_state_batch_indices=None, null_block_id=NULL_BLOCK_ID,
                               out=None, num_accepted_tokens=None, cu_seqlens=None):
    """Float64 reference: returns ``(out, new_state)`` as new float64 tensors;
    the inputs are left unchanged."""
    state64 = state.to(torch.float64, copy=True)
    out64 = (out.to(torch.float64, copy=True) if out is not None
             else torch.zeros(x.shape, dtype=torch.float64, device=x.device))
    selective_state_update_torch_ops(
        state64, x, dt, A, B, C, D, dt_bias, z, dt_softplus, state_batch_indices,
        dst_state_batch_indices, null_block_id, out64, num_accepted_tokens, cu_seqlens,
        compute_dtype=torch.float64)
    return out64, state64


# --- Chunked scan (SSD prefill) -------------------------------------------------

def _ssd_prepare(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_limit, dtype):
    """Inputs in ``dtype`` with dt processed (bias, softplus, clamp):
    x, z (T, H, P), dt (T, H), A (H,), B, C (T, G, N), D (H, P), init (Q, H, P, N)."""
    cast = lambda t: t.detach().to(dtype) if t is not None else None  # noqa: E731
    dt = cast(dt)
    if dt_bias is not None:
        dt = dt + cast(dt_bias)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, math.inf):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    D = cast(D)
    if D is not None and D.dim() == 1:
        D = D[:, None].expand(x.shape[1], x.shape[2])
    return cast(x), dt, cast(A), cast(B), cast(C), D, cast(z), cast(initial_states)


def _ssd_skip_and_gate(y, x, D, z):
    if D is not None:
        y = y + D * x
    if z is not None:
        y = y * z * torch.sigmoid(z)
    return y


def ssd_sequential_ref(x, dt, A, B, C, cu_seqlens, D=None, z=None, dt_bias=None,
                       initial_states=None, dt_softplus=False, dt_limit=(0.0, math.inf)):
    """The SSM recurrence token by token, in float64:

        state = exp(A * dt_t) * state + dt_t * x_t^T B_t,   y_t = state @ C_t + D * x_t

    Returns ``(out (T, H, P), final_states (Q, H, P, N))``, float64."""
    x, dt, A, B, C, D, z, init = _ssd_prepare(x, dt, A, B, C, D, z, dt_bias, initial_states,
                                              dt_softplus, dt_limit, torch.float64)
    heads_per_group = x.shape[1] // B.shape[1]
    B, C = B.repeat_interleave(heads_per_group, 1), C.repeat_interleave(heads_per_group, 1)
    y = torch.zeros_like(x)
    finals = []
    bounds = cu_seqlens.tolist()
    for seq, (begin, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        state = init[seq].clone() if init is not None else x.new_zeros(*x.shape[1:], B.shape[-1])
        for t in range(begin, end):
            state = (torch.exp(A * dt[t])[:, None, None] * state
                     + (dt[t][:, None] * x[t])[:, :, None] * B[t][:, None, :])
            y[t] = (state * C[t][:, None, :]).sum(-1)
        finals.append(state)
    return _ssd_skip_and_gate(y, x, D, z), torch.stack(finals)


def ssd_chunked_torch_ops(x, dt, A, B, C, chunk_size, cu_chunk_seqlens, seq_idx,
                          last_chunk_indices, D=None, z=None, dt_bias=None, initial_states=None,
                          dt_softplus=False, dt_limit=(0.0, math.inf),
                          return_intermediate_states=False, compute_dtype=torch.float32,
                          chunks_per_step=16):
    """The chunked-quadratic (SSD) form in plain torch ops: inside a chunk
    the outputs are a decay-masked (C B^T) x product plus the start state's
    part; the state jumps from chunk to chunk. Returns ``(out (T, H, P),
    states)`` as ``mamba_chunk_scan_combined_varlen`` returns them, in
    ``compute_dtype``. The (L, L) products run ``chunks_per_step`` chunks at
    a time to bound memory."""
    x, dt, A, B, C, D, z, init = _ssd_prepare(x, dt, A, B, C, D, z, dt_bias, initial_states,
                                              dt_softplus, dt_limit, compute_dtype)
    T, H, P = x.shape
    G, N = B.shape[1:]
    R = H // G  # heads per group
    bounds = cu_chunk_seqlens.long()
    num_chunks = len(bounds) - 1
    # Chunks padded to L tokens: (K, L, ...), padding tokens zeroed.
    position = torch.arange(chunk_size, device=x.device)
    valid = position[None, :] < (bounds[1:] - bounds[:-1])[:, None]                  # (K, L)
    token = torch.where(valid, bounds[:-1, None] + position[None, :], 0)
    pad = lambda t: t[token] * valid.reshape(valid.shape + (1,) * (t.dim() - 1))  # noqa: E731
    xc = pad(x).reshape(num_chunks, chunk_size, G, R, P)
    dtc = pad(dt).reshape(num_chunks, chunk_size, G, R)
    Bc, Cc = pad(B), pad(C)                                                         # (K, L, G, N)
    dA_cumsum = torch.cumsum(dtc * A.reshape(G, R), dim=1)                          # (K, L, G, R)

    # Each chunk's state from a zero start, then carried across chunks.
    to_end = torch.exp(dA_cumsum[:, -1:] - dA_cumsum) * dtc
    chunk_states = torch.einsum("klgr,klgrp,klgn->kgrpn", to_end, xc, Bc)
    chunk_decay = torch.exp(dA_cumsum[:, -1])                                       # (K, G, R)
    seqs = seq_idx.tolist()
    start_states, end_states = [], []
    for chunk in range(num_chunks):
        if chunk == 0 or seqs[chunk] != seqs[chunk - 1]:
            state = (init[seqs[chunk]].reshape(G, R, P, N) if init is not None
                     else x.new_zeros(G, R, P, N))
        start_states.append(state)
        state = chunk_decay[chunk][..., None, None] * state + chunk_states[chunk]
        end_states.append(state)
    start_states = torch.stack(start_states)

    y = torch.einsum("klgn,kgrpn->klgrp", Cc, start_states) * torch.exp(dA_cumsum)[..., None]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    for first in range(0, num_chunks, chunks_per_step):
        part = slice(first, first + chunks_per_step)
        CB = torch.einsum("kign,kjgn->kgij", Cc[part], Bc[part])
        exponent = dA_cumsum[part][:, :, None] - dA_cumsum[part][:, None, :]       # (k, i, j, G, R)
        decay = torch.exp(torch.where(causal[None, :, :, None, None], exponent, -math.inf))
        weight = CB.permute(0, 2, 3, 1)[..., None] * decay * dtc[part][:, None]    # (k, i, j, G, R)
        y[part] += torch.einsum("kijgr,kjgrp->kigrp", weight, xc[part])

    out = torch.empty_like(x)
    out[token[valid]] = y.reshape(num_chunks, chunk_size, H, P)[valid]
    end_states = torch.stack(end_states).reshape(num_chunks, H, P, N)
    states = end_states if return_intermediate_states else end_states[last_chunk_indices.long()]
    return _ssd_skip_and_gate(out, x, D, z), states


def ssd_chunked_ref(x, dt, A, B, C, chunk_size, cu_chunk_seqlens, seq_idx, last_chunk_indices,
                    D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False,
                    dt_limit=(0.0, math.inf), return_intermediate_states=False):
    """``ssd_chunked_torch_ops`` in float64: ``(out, states)``."""
    return ssd_chunked_torch_ops(x, dt, A, B, C, chunk_size, cu_chunk_seqlens, seq_idx,
                                 last_chunk_indices, D, z, dt_bias, initial_states, dt_softplus,
                                 dt_limit, return_intermediate_states, compute_dtype=torch.float64)


# --- Causal depthwise conv1d ----------------------------------------------------

def _conv_sequence_ref(x_seq, history, weight, bias, silu, write_len, old, shift):
    """One sequence in float64: ``x_seq (n, D)``, ``history (W-1, D)``;
    returns ``(out (n, D), new_state (write_len, D))``: the last ``write_len``
    of ``old[shift : shift + write_len - n] ++ x_seq`` (``bridge.spec.conv_contract``)."""
    width = weight.shape[1]
    window = torch.cat([history, x_seq])
    out = torch.stack([(window[t:t + width] * weight.T).sum(0) for t in range(len(x_seq))]) \
        if len(x_seq) else x_seq.new_zeros(0, weight.shape[0])
    if bias is not None:
        out = out + bias
    if silu:
        out = out * torch.sigmoid(out)
    keep = max(write_len - len(x_seq), 0)
    return out, torch.cat([old[shift:shift + keep], x_seq])[-write_len:]


def causal_conv1d_fn_ref(x, weight, bias=None, conv_states=None, query_start_loc=None,
                         cache_indices=None, has_initial_state=None, activation="silu",
                         pad_slot_id=NULL_BLOCK_ID, block_idx_first_scheduled_token=None,
                         block_idx_last_scheduled_token=None, initial_state_idx=None,
                         num_computed_tokens=None, block_size_to_align=0):
    """Float64 reference of ``causal_conv1d_fn``: returns ``(out (D, T),
    new_conv_states (S, D, L))`` as new float64 tensors (padding sequences'
    output columns are NaN); the inputs are left unchanged."""
    f64 = lambda t: t.detach().to(torch.float64) if t is not None else None  # noqa: E731
    x, weight, bias = f64(x), f64(weight), f64(bias)
    states = conv_states.detach().to(torch.float64, copy=True)
    width = weight.shape[1]
    out = torch.full_like(x, math.nan)
    bounds = query_start_loc.tolist()
    column = lambda t, seq: int(t[seq]) if t is not None else 0  # noqa: E731
    for seq, (begin, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        row = cache_indices[seq].reshape(-1).tolist() if cache_indices is not None else [seq]
        slot = row[column(initial_state_idx, seq)]
        if cache_indices is not None and slot == pad_slot_id:
            continue
        init = has_initial_state is not None and bool(has_initial_state[seq])
        old = states[slot, :, :width - 1].T.clone() if init else x.new_zeros(width - 1, x.shape[0])
        x_seq = x[:, begin:end].T
        y, new = _conv_sequence_ref(x_seq, old, weight, bias, activation is not None,
                                    width - 1, old, end - begin)
        out[:, begin:end] = y.T
        if block_idx_first_scheduled_token is not None:
            # The W-1 inputs before each block boundary crossed (prefix caching).
            window = torch.cat([old, x_seq])
            for block in range(column(block_idx_first_scheduled_token, seq),
                               column(block_idx_last_scheduled_token, seq)):
                cut = (block + 1) * block_size_to_align - column(num_computed_tokens, seq)
                if row[block] != pad_slot_id:
                    states[row[block], :, :width - 1] = window[cut:cut + width - 1].T
        states[row[column(block_idx_last_scheduled_token, seq)], :, :width - 1] = new.T
    return out, states


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None,
                             conv_state_indices=None, num_accepted_tokens=None,
                             query_start_loc=None, pad_slot_id=NULL_BLOCK_ID,
                             block_idx_last_scheduled_token=None, initial_state_idx=None):
    """Float64 reference of ``causal_conv1d_update``: returns ``(out,
    new_conv_state)`` as new float64 tensors (padding rows of ``out`` NaN)."""
    f64 = lambda t: t.detach().to(torch.float64) if t is not None else None  # noqa: E731
    x, weight, bias = f64(x), f64(weight), f64(bias)
    states = conv_state.detach().to(torch.float64, copy=True)
    width, state_len = weight.shape[1], states.shape[2]
    out = torch.full_like(x, math.nan)
    num_seqs = x.shape[0] if query_start_loc is None else len(query_start_loc) - 1
    bounds = list(range(num_seqs + 1)) if query_start_loc is None else query_start_loc.tolist()
    column = lambda t, seq: int(t[seq]) if t is not None else 0  # noqa: E731
    reads = []  # every read before any write, as the kernel does per slot
    for seq in range(num_seqs):
        if conv_state_indices is None:
            read_slot = write_slot = seq
        else:
            indices = conv_state_indices.reshape(num_seqs, -1)
            read_slot = int(indices[seq, column(initial_state_idx, seq)])
            write_slot = int(indices[seq, column(block_idx_last_scheduled_token, seq)])
            if read_slot == pad_slot_id:
                continue
        reads.append((seq, write_slot, states[read_slot].T.clone()))
    for seq, write_slot, old in reads:
        begin, end = bounds[seq], bounds[seq + 1]
        if num_accepted_tokens is not None:
            offset = int(num_accepted_tokens[seq]) - 1
            shift = offset + 1
        else:
            offset, shift = 0, end - begin
        y, new = _conv_sequence_ref(x[begin:end], old[offset:offset + width - 1], weight, bias,
                                    activation is not None, state_len, old, shift)
        out[begin:end] = y
        if end > begin:
            states[write_slot] = new.T
    return out, states


# --- Gated RMSNorm ---------------------------------------------------------------

def rms_norm_gated_ref(x, weight, z=None, eps=1e-6, group_size=None, norm_before_gate=False):
    """Float64 reference of ``rms_norm_gated`` (``bridge.spec.norm_contract``)."""
    f64 = lambda t: t.detach().to(torch.float64) if t is not None else None  # noqa: E731
    x, weight, z = f64(x), f64(weight), f64(z)
    group_size = group_size or x.shape[-1]
    if z is not None and not norm_before_gate:
        x = x * F.silu(z)
    groups = x.reshape(*x.shape[:-1], -1, group_size)
    y = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + eps)).reshape(x.shape)
    if weight is not None:
        y = y * weight
    if z is not None and norm_before_gate:
        y = y * F.silu(z)
    return y
