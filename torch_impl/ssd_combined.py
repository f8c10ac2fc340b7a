"""The chunked scan (SSD prefill of a Mamba-2 layer) as vLLM calls it,
``mamba_chunk_scan_combined_varlen``, and the batched form of the original
Mamba-2 API, ``mamba_chunk_scan_combined``: five Triton kernel stages.

    1. chunk_cumsum   dt -> processed dt and the cumulative decay per chunk
    2. chunk_state    each chunk's state from a zero start (tensor cores)
    3. state_passing  carry states across chunks and sequences
    4. bmm_chunk      C B^T per chunk and group (tensor cores)
    5. chunk_scan     outputs from the start state and the chunk (tensor cores)

Shapes and argument rules: ``bridge.spec.ssd_contract``. Mirror:
``jax_impl/ssd_combined.py``.
"""

from __future__ import annotations

import math

import torch

from bridge.spec import ssd_contract
from torch_impl import platform
from torch_impl.ssd_bmm import bmm_chunk
from torch_impl.ssd_chunk_scan import chunk_scan
from torch_impl.ssd_chunk_state import chunk_cumsum, chunk_state
from torch_impl.ssd_state_passing import state_passing


def _dtype_name(tensor):
    return str(tensor.dtype).removeprefix("torch.") if tensor is not None else None


def mamba_chunk_scan_combined_varlen(
        x, dt, A, B, C, chunk_size, cu_seqlens, cu_chunk_seqlens, last_chunk_indices, seq_idx,
        out, D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False,
        dt_limit=(0.0, math.inf), return_intermediate_states=False, state_dtype=None, *,
        validate_metadata=True):
    """Prefill over packed sequences. Writes ``out (T, H, P)`` in place and
    returns the states: ``(Q, H, P, N)`` final states, or ``(K, H, P, N)``
    end-of-chunk states with ``return_intermediate_states``, in
    ``state_dtype`` (default: C's dtype).

    ``validate_metadata`` checks the chunk metadata's values on the host (one
    device sync; skipped automatically during CUDA-graph capture).
    """
    args = dict(x=x, dt=dt, A=A, B=B, C=C, out=out, D=D, z=z, dt_bias=dt_bias,
                initial_states=initial_states, cu_seqlens=cu_seqlens,
                cu_chunk_seqlens=cu_chunk_seqlens, last_chunk_indices=last_chunk_indices,
                seq_idx=seq_idx)
    if out is None:
        raise ValueError("mamba_chunk_scan_combined_varlen: `out` is required "
                         "(the output is written into it in place)")
    layout = ssd_contract.check_ssd_args(
        {k: (tuple(v.shape) if v is not None else None) for k, v in args.items()},
        {k: _dtype_name(v) for k, v in args.items()},
        chunk_size=chunk_size, dt_limit=dt_limit,
        state_dtype=str(state_dtype).removeprefix("torch.") if state_dtype is not None else None)
    device = platform.check_kernel_device(args)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if validate_metadata and not capturing:
        ssd_contract.check_chunk_metadata_values(
            layout, **{k: args[k].cpu().numpy() for k in (
                "cu_seqlens", "cu_chunk_seqlens", "seq_idx", "last_chunk_indices")})
    state_dtype = state_dtype or C.dtype

    dA_cumsum, dt_out = chunk_cumsum(dt, A, chunk_size, cu_chunk_seqlens, dt_bias, dt_softplus, dt_limit)
    chunk_states = chunk_state(B, x, dt_out, dA_cumsum, cu_chunk_seqlens)
    end_states, states = state_passing(chunk_states, dA_cumsum, seq_idx, layout.num_seqs,
                                       initial_states, return_intermediate_states, state_dtype,
                                       end_states_dtype=C.dtype)
    CB = bmm_chunk(C, B, cu_chunk_seqlens, chunk_size)
    chunk_scan(CB, x, dt_out, dA_cumsum, C, end_states, cu_chunk_seqlens, seq_idx, D, z,
               initial_states, out)
    return states


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
