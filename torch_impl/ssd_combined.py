"""The chunked scan (SSD prefill of a Mamba-2 layer) as vLLM calls it,
``mamba_chunk_scan_combined_varlen``, and the batched form of the original
Mamba-2 API, ``mamba_chunk_scan_combined``: five Triton kernel stages
(listed in ``bridge.spec.ssd_launch_config``), run inside one torch custom
op (``mamba_twin::mamba_chunk_scan_combined_varlen``) so that
``torch.compile(fullgraph=True)`` and CUDA-graph capture see one opaque call.

Shapes and argument rules: ``bridge.spec.ssd_contract``. Mirror:
``jax_impl/ssd_combined.py``.
"""

from __future__ import annotations

import math

import torch

from bridge.spec import checks, ssd_contract
from torch_impl import platform
from torch_impl.ssd_bmm import bmm_chunk
from torch_impl.ssd_chunk_scan import chunk_scan
from torch_impl.ssd_chunk_state import chunk_cumsum, chunk_state
from torch_impl.ssd_common import on_device
from torch_impl.ssd_state_passing import state_passing


def _states_shape(x, B, num_rows):
    return (num_rows, x.shape[1], x.shape[2], B.shape[2])


# Registered with torch.library's schema API rather than ``custom_op``: the
# same op for torch.compile and CUDA graphs, at a fraction of its eager
# dispatch cost (no Python autograd wrapper; the op is inference-only).
_OP = f"mamba_twin::{ssd_contract.OP}"
torch.library.define(
    _OP, "(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, int chunk_size, "
    "Tensor cu_chunk_seqlens, Tensor seq_idx, int num_seqs, Tensor(a!) out, Tensor? D, Tensor? z, "
    "Tensor? dt_bias, Tensor? initial_states, bool dt_softplus, float dt_min, float dt_max, "
    "bool return_intermediate_states, ScalarType state_dtype) -> Tensor")


@torch.library.impl(_OP, "CompositeExplicitAutograd")
def _chunk_scan_op(x, dt, A, B, C, chunk_size, cu_chunk_seqlens, seq_idx, num_seqs, out, D, z,
                   dt_bias, initial_states, dt_softplus, dt_min, dt_max,
                   return_intermediate_states, state_dtype):
    """The five stages on checked shapes: writes ``out``, returns the states."""
    num_chunks = cu_chunk_seqlens.shape[0] - 1
    if 0 in (x.shape[0], num_chunks, num_seqs):  # nothing to launch (see the unchecked contract)
        out.fill_(math.nan)
        rows = num_chunks if return_intermediate_states else num_seqs
        return torch.full(_states_shape(x, B, rows), math.nan, dtype=state_dtype, device=x.device)
    with on_device(x.device):
        dA_cumsum, dt_out = chunk_cumsum(dt, A, chunk_size, cu_chunk_seqlens, dt_bias=dt_bias,
                                         dt_softplus=dt_softplus, dt_limit=(dt_min, dt_max))
        chunk_states = chunk_state(B, x, dt_out, dA_cumsum, cu_chunk_seqlens)
        end_states, states = state_passing(
            chunk_states, dA_cumsum, seq_idx, num_seqs, initial_states=initial_states,
            return_intermediate_states=return_intermediate_states, state_dtype=state_dtype,
            end_states_dtype=C.dtype)
        CB = bmm_chunk(C, B, cu_chunk_seqlens, chunk_size)
        chunk_scan(CB, x, dt_out, dA_cumsum, C, end_states, cu_chunk_seqlens, seq_idx, num_seqs,
                   D=D, z=z, initial_states=initial_states, out=out)
    return states


@torch.library.register_fake(_OP)
def _(x, dt, A, B, C, chunk_size, cu_chunk_seqlens, seq_idx, num_seqs, out, D, z, dt_bias,
      initial_states, dt_softplus, dt_min, dt_max, return_intermediate_states, state_dtype):
    rows = cu_chunk_seqlens.shape[0] - 1 if return_intermediate_states else num_seqs
    return x.new_empty(_states_shape(x, B, rows), dtype=state_dtype)


def mamba_chunk_scan_combined_varlen(
        x, dt, A, B, C, chunk_size, cu_seqlens, cu_chunk_seqlens, last_chunk_indices, seq_idx,
        out, D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False,
        dt_limit=(0.0, math.inf), return_intermediate_states=False, state_dtype=None, *,
        validate_metadata=None):
    """Prefill over packed sequences. Writes ``out (T, H, P)`` in place and
    returns the states: ``(Q, H, P, N)`` final states, or ``(K, H, P, N)``
    end-of-chunk states with ``return_intermediate_states``, in
    ``state_dtype`` (default: C's dtype). Shapes: ``bridge.spec.ssd_contract``.

    Shapes and dtypes are always checked. The metadata's values are checked
    on the host (one device sync, clear errors) only in the debug mode:
    ``validate_metadata=True`` or ``$MAMBA_TWIN_CHECK_INDICES=1``; never
    under CUDA-graph capture or torch.compile.

    Unchecked contract (any metadata values): nothing is read or written
    outside the tensors given. A chunk's token range is clipped to [0, T)
    and to ``chunk_size`` tokens; a chunk whose range needed clipping gets
    NaN outputs and a NaN end state (which its sequence's later chunks and
    final state inherit); a ``seq_idx`` outside [0, Q) starts its chunk
    from NaN and writes no final state; final-state rows that no chunk
    ends are NaN. With no tokens, chunks or sequences no kernel runs and
    ``out`` and the states are NaN.
    """
    if out is None:
        checks.fail(ssd_contract.OP, "out", "is required (the output is written into it in place)")
    tensors = dict(x=x, dt=dt, A=A, B=B, C=C, out=out, D=D, z=z, dt_bias=dt_bias,
                   initial_states=initial_states, cu_seqlens=cu_seqlens,
                   cu_chunk_seqlens=cu_chunk_seqlens, last_chunk_indices=last_chunk_indices,
                   seq_idx=seq_idx)
    layout = ssd_contract.check_ssd_args(
        **tensors, chunk_size=chunk_size, dt_limit=dt_limit,
        state_dtype=None if state_dtype is None else str(state_dtype).removeprefix("torch."))
    device = platform.check_kernel_device(tensors)
    host = platform.host_index_values(
        validate_metadata, device, cu_seqlens=cu_seqlens, cu_chunk_seqlens=cu_chunk_seqlens,
        seq_idx=seq_idx, last_chunk_indices=last_chunk_indices)
    if host is not None:
        ssd_contract.check_chunk_metadata_values(layout, **host)
    return torch.ops.mamba_twin.mamba_chunk_scan_combined_varlen(
        x=x, dt=dt, A=A, B=B, C=C, chunk_size=layout.chunk_size, cu_chunk_seqlens=cu_chunk_seqlens,
        seq_idx=seq_idx, num_seqs=layout.num_seqs, out=out, D=D, z=z, dt_bias=dt_bias,
        initial_states=initial_states, dt_softplus=bool(dt_softplus), dt_min=float(dt_limit[0]),
        dt_max=float(dt_limit[1]), return_intermediate_states=bool(return_intermediate_states),
        state_dtype=state_dtype or C.dtype)


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                              initial_states=None, seq_idx=None, dt_softplus=False,
                              dt_limit=(0.0, math.inf), return_final_states=False,
                              state_dtype=None):
    """The batched form: ``x, z (b, l, H, P)``, ``dt (b, l, H)``, ``B, C (b, l,
    G, N)``, ``initial_states (b, H, P, N)``, ``seq_idx (b, l)`` (a row splits
    into sequences where it changes; initial states go to each row's first
    sequence). Returns ``out (b, l, H, P)``, and with ``return_final_states``
    also the state at the end of each row ``(b, H, P, N)``."""
    if x.dim() != 4:
        raise ValueError(f"mamba_chunk_scan_combined: `x` must be (batch, seqlen, nheads, headdim), "
                         f"got shape {tuple(x.shape)}")
    batch, seqlen, nheads, headdim = x.shape
    flat = lambda t: t.reshape(batch * seqlen, *t.shape[2:]) if t is not None else None  # noqa: E731
    for name, tensor in (("dt", dt), ("B", B), ("C", C), ("z", z)):
        if tensor is not None and tuple(tensor.shape[:2]) != (batch, seqlen):
            raise ValueError(f"mamba_chunk_scan_combined: `{name}` has shape {tuple(tensor.shape)}, "
                             f"expected ({batch}, {seqlen}, ...)")
    cu_seqlens, first_seq, last_seq = ssd_contract.batched_sequences(
        batch, seqlen, seq_idx.cpu().numpy() if seq_idx is not None else None)
    metadata = ssd_contract.chunk_metadata(cu_seqlens, chunk_size)
    index = lambda a: torch.from_numpy(a).to(x.device)  # noqa: E731
    varlen_initial_states = None
    if initial_states is not None:
        if tuple(initial_states.shape) != (batch, nheads, headdim, B.shape[-1]):
            raise ValueError(f"mamba_chunk_scan_combined: `initial_states` has shape "
                             f"{tuple(initial_states.shape)}, expected {(batch, nheads, headdim, B.shape[-1])}")
        varlen_initial_states = initial_states.new_zeros((len(cu_seqlens) - 1, *initial_states.shape[1:]))
        varlen_initial_states[index(first_seq).long()] = initial_states
    out = torch.empty_like(x)
    final_states = mamba_chunk_scan_combined_varlen(
        flat(x), flat(dt), A, flat(B), flat(C), chunk_size, index(cu_seqlens),
        index(metadata.cu_chunk_seqlens), index(metadata.last_chunk_indices),
        index(metadata.seq_idx), flat(out), D=D, z=flat(z), dt_bias=dt_bias,
        initial_states=varlen_initial_states, dt_softplus=dt_softplus, dt_limit=dt_limit,
        state_dtype=state_dtype, validate_metadata=False)
    if return_final_states:
        return out, final_states[index(last_seq).long()]
    return out
