"""The ops' math in plain torch ops (no kernels), in a chosen compute dtype.

``selective_state_update_torch_ops`` writes in place like the kernel and
backs the ``reference`` dispatch backend; ``ssd_chunked_torch_ops`` is the
chunked scan's plain-ops baseline in the benchmarks and, in float64, the
float64 reference the gradient tests differentiate (torch autograd). The
tests' forward references are numpy (``tests/reference.py``). Mirror:
``jax_impl/reference.py``.
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


def _skip_and_gate(y, x, D, z):
    """y + D x, then times silu(z) (either may be None)."""
    if D is not None:
        y = y + D * x
    if z is not None:
        y = y * z * torch.sigmoid(z)
    return y


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
    x4, dt4 = (c(_as_4d(t, layout, (T, H, P), 1)) for t in (x, dt))
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
        y = _skip_and_gate((h * C4[token][:, :, None, :]).sum(-1), x4[token], D4,
                           None if z4 is None else z4[token])
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


# --- Chunked scan (SSD prefill) -------------------------------------------------

def _ssd_prepare(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_limit, dtype):
    """Inputs in ``dtype`` with dt processed (bias, softplus, clamp):
    x, z (T, H, P), dt (T, H), A (H,), B, C (T, G, N), D (H, P), init (Q, H, P, N)."""
    cast = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
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
    return _skip_and_gate(out, x, D, z), states
