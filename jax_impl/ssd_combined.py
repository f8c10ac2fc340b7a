"""The chunked scan (SSD prefill of a Mamba-2 layer) as vLLM calls it,
``mamba_chunk_scan_combined_varlen``, and the batched form of the original
Mamba-2 API, ``mamba_chunk_scan_combined``: five Pallas kernel stages
(listed in ``bridge.spec.ssd_launch_config``).

Shapes and argument rules: ``bridge.spec.ssd_contract``. Mirror:
``torch_impl/ssd_combined.py``. JAX is functional: ``out`` is returned; a
given ``out`` donated under ``jax.jit`` is written in place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bridge.spec import ssd_contract
from jax_impl import platform
from jax_impl.ssd_bmm import bmm_chunk
from jax_impl.ssd_chunk_scan import chunk_scan, chunk_scan_bwd, chunk_scan_bwd_dstates
from jax_impl.ssd_chunk_state import chunk_cumsum, chunk_cumsum_bwd, chunk_state
from jax_impl.ssd_common import int32_metadata
from jax_impl.ssd_state_passing import state_passing, state_passing_bwd


def _forward(statics, x, dt, A, B, C, D, z, dt_bias, initial_states, cu_chunk_seqlens, seq_idx,
             out, *, save_y=False):
    """The five forward stages -> ``((out, states), y)``: y the output
    before the z gate when ``save_y`` and z is given (else None)."""
    chunk_size, num_seqs, dt_softplus, dt_limit, intermediate, state_dtype = statics
    dA_cumsum, dt_out = chunk_cumsum(dt, A, chunk_size, cu_chunk_seqlens, dt_bias=dt_bias,
                                     dt_softplus=dt_softplus, dt_limit=dt_limit)
    chunk_states = chunk_state(B, x, dt_out, dA_cumsum, cu_chunk_seqlens)
    end_states, states = state_passing(
        chunk_states, dA_cumsum, seq_idx, num_seqs, initial_states=initial_states,
        return_intermediate_states=intermediate, state_dtype=state_dtype, end_states_dtype=C.dtype)
    CB = bmm_chunk(C, B, cu_chunk_seqlens, chunk_size)
    save_y = save_y and z is not None
    result = chunk_scan(CB, x, dt_out, dA_cumsum, C, end_states, cu_chunk_seqlens, seq_idx,
                        num_seqs, D=D, z=z, initial_states=initial_states, out=out,
                        return_y=save_y)
    out, y = result if save_y else (result, None)
    return (out, states), (dA_cumsum, dt_out, end_states, y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(statics, x, dt, A, B, C, D, z, dt_bias, initial_states, cu_chunk_seqlens, seq_idx, out):
    """The differentiable chunked scan: ``(out, states)``; a custom VJP
    whose backward runs the four Pallas backward stages. ``statics``:
    (chunk_size, num_seqs, dt_softplus, dt_limit, return_intermediate_states,
    state_dtype). A given ``out`` is overwritten: no gradient flows into it."""
    return _forward(statics, x, dt, A, B, C, D, z, dt_bias, initial_states, cu_chunk_seqlens,
                    seq_idx, out)[0]


def _scan_fwd(statics, x, dt, A, B, C, D, z, dt_bias, initial_states, cu_chunk_seqlens, seq_idx,
              out):
    result, saved = _forward(statics, x, dt, A, B, C, D, z, dt_bias, initial_states,
                             cu_chunk_seqlens, seq_idx, out, save_y=True)
    # Saved: the inputs, dt and the cumulative decay per chunk position (small),
    # the chunks' end states (the start states of the next) and y before the gate.
    return result, (x, dt, A, B, C, D, z, dt_bias, initial_states, cu_chunk_seqlens, seq_idx) + saved


def _scan_bwd(statics, saved, cotangents):
    _, num_seqs, dt_softplus, dt_limit, intermediate, _ = statics
    (x, dt, A, B, C, D, z, dt_bias, initial_states, cu_chunk_seqlens, seq_idx,
     dA_cumsum, dt_out, end_states, y) = saved
    dout, dstates = cotangents
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    # 1. The gate (elementwise) and the D skip's parameter (a reduction).
    dy = f32(dout)
    dz = None
    if z is not None:
        gate = jax.nn.sigmoid(f32(z))
        dz = (dy * f32(y) * gate * (1.0 + f32(z) * (1.0 - gate))).astype(z.dtype)
        dy = dy * f32(z) * gate
    dD = None
    if D is not None:
        dD = jnp.einsum("thp,thp->h" if D.ndim == 1 else "thp,thp->hp", dy, f32(x)).astype(D.dtype)
    dy = dy.astype(x.dtype)  # a tensor-core operand, as x
    # 2-5. The Pallas stages.
    dstart = chunk_scan_bwd_dstates(dy, C, dA_cumsum, cu_chunk_seqlens)
    dend, dinit = state_passing_bwd(dstart, dA_cumsum, seq_idx, num_seqs, dstates=dstates,
                                    return_intermediate_states=intermediate,
                                    has_initial_states=initial_states is not None)
    dx, ddt_out, da, da_last, dB, dC = chunk_scan_bwd(
        x, dy, dt_out, dA_cumsum, B, C, dend, end_states, cu_chunk_seqlens, seq_idx, num_seqs,
        D=D, initial_states=initial_states)
    ddt, dA, ddt_bias = chunk_cumsum_bwd(dt, A, cu_chunk_seqlens, dt_out, ddt_out, da, da_last,
                                         dt_bias=dt_bias, dt_softplus=dt_softplus,
                                         dt_limit=dt_limit)
    cast = lambda d, like: None if like is None else d.astype(like.dtype)  # noqa: E731
    return (dx, ddt, cast(dA, A), cast(dB, B), cast(dC, C), dD, dz, cast(ddt_bias, dt_bias),
            cast(dinit, initial_states), None, None, None)


_scan.defvjp(_scan_fwd, _scan_bwd)


def mamba_chunk_scan_combined_varlen(x, dt, A, B, C, chunk_size: int, cu_seqlens,
                                     cu_chunk_seqlens, last_chunk_indices, seq_idx, out=None,
                                     D=None, z=None, dt_bias=None, initial_states=None,
                                     dt_softplus=False, dt_limit=(0.0, float("inf")),
                                     return_intermediate_states=False, state_dtype=None, *,
                                     validate_metadata=None):
    """The chunked scan over packed sequences. Returns ``(out, states)``.

    ``out (T, H, P)`` in ``out``'s dtype (x's when not given); ``states`` in
    ``state_dtype`` (default: C's dtype): the final state of every sequence
    ``(Q, H, P, N)``, or with ``return_intermediate_states`` the state at the
    end of every chunk ``(K, H, P, N)``. Shapes: ``bridge.spec.ssd_contract``.

    Jittable with ``chunk_size``, ``dt_softplus``, ``dt_limit``,
    ``return_intermediate_states`` and ``state_dtype`` static. The metadata
    values are checked on the host when they are concrete (not under jit)
    unless ``validate_metadata=False``. Works with ``jax_enable_x64`` (int32
    or int64 metadata).

    Unchecked contract (traced or unchecked metadata, any values): nothing
    is read or written outside the arrays given. A chunk's token range is
    clipped to [0, T) and to ``chunk_size`` tokens; a chunk whose range
    needed clipping gets NaN outputs and a NaN end state (which its
    sequence's later chunks and final state inherit); a ``seq_idx`` outside
    [0, Q) starts its chunk from NaN and writes no final state; final-state
    rows that no chunk ends are NaN. With no tokens, chunks or sequences no
    kernel runs and ``out`` and the states are NaN.

    Differentiable (``jax.custom_vjp``; the backward's four Pallas stages,
    ``bridge.spec.ssd_launch_config``) in x, dt, A, B, C, D, z, dt_bias and
    initial_states, from ``out`` and from the returned states (final or
    intermediate), with or without a given ``out`` (which gets no gradient).
    The backward assumes well-formed metadata (every token in one chunk).
    """
    layout = ssd_contract.check_ssd_args(
        x=x, dt=dt, A=A, B=B, C=C, out=out, D=D, z=z, dt_bias=dt_bias,
        initial_states=initial_states, cu_seqlens=cu_seqlens, cu_chunk_seqlens=cu_chunk_seqlens,
        seq_idx=seq_idx, last_chunk_indices=last_chunk_indices, chunk_size=chunk_size,
        dt_limit=dt_limit, state_dtype=None if state_dtype is None else str(jnp.dtype(state_dtype)))
    host = platform.host_index_values(
        validate_metadata, cu_seqlens=cu_seqlens, cu_chunk_seqlens=cu_chunk_seqlens,
        seq_idx=seq_idx, last_chunk_indices=last_chunk_indices)
    if host is not None:
        ssd_contract.check_chunk_metadata_values(layout, **host)
    state_dtype = C.dtype if state_dtype is None else jnp.dtype(state_dtype)
    chunk_size = layout.chunk_size
    states_rows = layout.num_chunks if return_intermediate_states else layout.num_seqs
    if 0 in (layout.num_tokens, layout.num_chunks, layout.num_seqs):  # nothing to launch
        return (jnp.full(x.shape, jnp.nan, x.dtype if out is None else out.dtype),
                jnp.full((states_rows, layout.nheads, layout.headdim, layout.dstate), jnp.nan,
                         state_dtype))

    cu_chunk_seqlens = int32_metadata(cu_chunk_seqlens, -1, layout.num_tokens + 1)
    seq_idx = int32_metadata(seq_idx, -1, layout.num_seqs)
    statics = (chunk_size, layout.num_seqs, bool(dt_softplus), tuple(float(v) for v in dt_limit),
               bool(return_intermediate_states), jnp.dtype(state_dtype))
    return _scan(statics, x, dt, A, B, C, D, z, dt_bias, initial_states, cu_chunk_seqlens,
                 seq_idx, out)


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size: int, D=None, z=None, dt_bias=None,
                              initial_states=None, seq_idx=None, dt_softplus=False,
                              dt_limit=(0.0, float("inf")), return_final_states=False,
                              state_dtype=None):
    """The batched form of the original Mamba-2 API, as a varlen call.

    x and z (b, l, H, P), dt (b, l, H), A (H,), B and C (b, l, G, N),
    initial_states (b, H, P, N), seq_idx (b, l) (concrete; non-decreasing
    along a row: a row holds several sequences where it changes). Each row's
    initial state starts its first sequence, the row's other sequences start
    from 0. Returns out (b, l, H, P), or ``(out, final_states (b, H, P, N))``
    with ``return_final_states`` (the state after each row's last sequence).
    Differentiable as the varlen call.
    """
    if x.ndim != 4:
        raise ValueError(f"mamba_chunk_scan_combined: `x` must be 4-D (batch, seqlen, nheads, "
                         f"headdim), got shape {tuple(x.shape)}")
    if seq_idx is not None and not platform.is_concrete(seq_idx):
        raise ValueError("mamba_chunk_scan_combined: `seq_idx` must be concrete (not traced): "
                         "the chunk layout depends on its values")
    batch, seqlen, H, P = x.shape
    cu_seqlens, first_seq_of_row, last_seq_of_row = ssd_contract.batched_sequences(
        batch, seqlen, None if seq_idx is None else np.asarray(seq_idx))
    metadata = ssd_contract.chunk_metadata(cu_seqlens, chunk_size)
    flat = lambda a: None if a is None else a.reshape((batch * seqlen,) + a.shape[2:])  # noqa: E731
    if initial_states is not None:
        initial_states = jnp.zeros((len(cu_seqlens) - 1,) + initial_states.shape[1:],
                                   initial_states.dtype).at[first_seq_of_row].set(initial_states)
    out, states = mamba_chunk_scan_combined_varlen(
        flat(x), flat(dt), A, flat(B), flat(C), chunk_size, jnp.asarray(cu_seqlens),
        jnp.asarray(metadata.cu_chunk_seqlens), jnp.asarray(metadata.last_chunk_indices),
        jnp.asarray(metadata.seq_idx), D=D, z=flat(z), dt_bias=dt_bias,
        initial_states=initial_states, dt_softplus=dt_softplus, dt_limit=dt_limit,
        state_dtype=state_dtype)
    out = out.reshape(x.shape)
    return (out, states[last_seq_of_row]) if return_final_states else out
