"""The chunked scan (SSD prefill of a Mamba-2 layer) as vLLM calls it,
``mamba_chunk_scan_combined_varlen``, and the batched form of the original
Mamba-2 API, ``mamba_chunk_scan_combined``: five Triton kernel stages
(listed in ``bridge.spec.ssd_launch_config``), run inside one torch custom
op (``mamba_twin::mamba_chunk_scan_combined_varlen``) so that
``torch.compile(fullgraph=True)`` and CUDA-graph capture see one opaque call.

Training (``out=None`` with inputs that require grad): a functional forward
op (``..._fwd``: the same stages, returning what the backward needs) and a
backward op (``..._bwd``: five Triton backward stages, see the comment
on the training form), tied with ``torch.library.register_autograd``
(``platform.define_op``, as the conv and the gated norm: the ops stay
opaque to torch.compile and AOT autograd). The inference path is
untouched: nothing saved, no extra kernel.

Shapes and argument rules: ``bridge.spec.ssd_contract``. Mirror:
``jax_impl/ssd_combined.py``.
"""

from __future__ import annotations

import math

import torch

from bridge.spec import checks, ssd_contract
from torch_impl import platform
from torch_impl.ssd_bmm import bmm_chunk
from torch_impl.ssd_chunk_scan import (
    chunk_scan, chunk_scan_bwd, chunk_scan_bwd_dC, chunk_scan_bwd_dstates)
from torch_impl.ssd_chunk_state import chunk_cumsum, chunk_cumsum_bwd, chunk_state
from torch_impl.ssd_state_passing import state_passing, state_passing_bwd


def _states_shape(x, B, num_rows):
    return (num_rows, x.shape[1], x.shape[2], B.shape[2])


def _forward_stages(x, dt, A, B, C, chunk_size, cu_chunk_seqlens, seq_idx, num_seqs, out, D, z,
                    dt_bias, initial_states, dt_softplus, dt_min, dt_max,
                    return_intermediate_states, state_dtype, y=None):
    """The five stages on checked shapes (at least one token, chunk and
    sequence): writes ``out`` (and ``y``, the pre-gate output, when given);
    returns ``(states, dt_out, dA_cumsum, end_states)``."""
    with platform.on_device(x.device):
        dA_cumsum, dt_out = chunk_cumsum(dt, A, chunk_size, cu_chunk_seqlens, dt_bias=dt_bias,
                                         dt_softplus=dt_softplus, dt_limit=(dt_min, dt_max))
        chunk_states = chunk_state(B, x, dt_out, dA_cumsum, cu_chunk_seqlens)
        end_states, states = state_passing(
            chunk_states, dA_cumsum, seq_idx, num_seqs, initial_states=initial_states,
            return_intermediate_states=return_intermediate_states, state_dtype=state_dtype,
            end_states_dtype=C.dtype)
        del chunk_states
        CB = bmm_chunk(C, B, cu_chunk_seqlens, chunk_size)
        chunk_scan(CB, x, dt_out, dA_cumsum, C, end_states, cu_chunk_seqlens, seq_idx, num_seqs,
                   D=D, z=z, initial_states=initial_states, out=out, y=y)
    return states, dt_out, dA_cumsum, end_states


def _nothing_to_launch(x, cu_chunk_seqlens, num_seqs) -> bool:
    return 0 in (x.shape[0], cu_chunk_seqlens.shape[0] - 1, num_seqs)


def _chunk_scan_op(x, dt, A, B, C, chunk_size, cu_chunk_seqlens, seq_idx, num_seqs, out, D, z,
                   dt_bias, initial_states, dt_softplus, dt_min, dt_max,
                   return_intermediate_states, state_dtype):
    """The five stages on checked shapes: writes ``out``, returns the states."""
    if _nothing_to_launch(x, cu_chunk_seqlens, num_seqs):  # see the unchecked contract
        out.fill_(math.nan)
        rows = cu_chunk_seqlens.shape[0] - 1 if return_intermediate_states else num_seqs
        return torch.full(_states_shape(x, B, rows), math.nan, dtype=state_dtype, device=x.device)
    return _forward_stages(x, dt, A, B, C, chunk_size, cu_chunk_seqlens, seq_idx, num_seqs, out, D,
                           z, dt_bias, initial_states, dt_softplus, dt_min, dt_max,
                           return_intermediate_states, state_dtype)[0]


def _chunk_scan_fake(x, dt, A, B, C, chunk_size, cu_chunk_seqlens, seq_idx, num_seqs, out, D, z,
                     dt_bias, initial_states, dt_softplus, dt_min, dt_max,
                     return_intermediate_states, state_dtype):
    rows = cu_chunk_seqlens.shape[0] - 1 if return_intermediate_states else num_seqs
    return x.new_empty(_states_shape(x, B, rows), dtype=state_dtype)


_OP = platform.define_op(
    ssd_contract.OP, "(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, int chunk_size, "
    "Tensor cu_chunk_seqlens, Tensor seq_idx, int num_seqs, Tensor(a!) out, Tensor? D, Tensor? z, "
    "Tensor? dt_bias, Tensor? initial_states, bool dt_softplus, float dt_min, float dt_max, "
    "bool return_intermediate_states, ScalarType state_dtype) -> Tensor",
    _chunk_scan_op, _chunk_scan_fake)


# --- The training form: a functional forward that returns what the backward
# needs, a backward op, and their autograd registration. --------------------------
#
# The backward (five Triton stages; every product on the tensor cores, C B^T
# recomputed tile by tile, no (L, L) tensor in memory). Per chunk c of l
# tokens, head h, with a_i = dA_cumsum, dt_j the processed dt, S_prev the
# state the chunk starts from and M_ij = exp(a_i - a_j) [j <= i < l]:
#
#   gate                    dy = dout * silu(z), dz = dout * y * silu'(z) (y: the saved pre-gate
#                           output), dD = sum dy x, dx += D dy          (fused into chunk_scan_bwd)
#   chunk_scan_bwd_dstates  dS_prev(c) = sum_i exp(a_i) dy_i (x) C_i
#   state_passing_bwd       G_c = dL/dS_c, back over the chunks of each sequence:
#                           G_c = d states + exp(a_last(c+1)) G_{c+1} + dS_prev(c+1);
#                           d a_last(c) += exp(a_last(c)) <G_c, S_prev(c)>;
#                           d initial[seq] = exp(a_last(c)) G_c + dS_prev(c), c its first chunk
#   chunk_scan_bwd          U_j = sum_{i>=j} CB_ij M_ij dy_i + exp(a_last - a_j) G_c B_j:
#                           dx_j = dt_j U_j + D dy_j, ddt_j = x_j . U_j,
#                           dB_j = sum_{i>=j} M_ij dt_j (dy_i . x_j) C_i + dt_j exp(a_last - a_j) G_c^T x_j,
#                           d a_j -= B_j . dB_j (per head), d a_last += dt_j exp(a_last - a_j) x_j . G_c B_j
#   chunk_scan_bwd_dC       dC_i = sum_{j<=i} M_ij dt_j (dy_i . x_j) B_j + exp(a_i) S_prev^T dy_i,
#                           d a_i += C_i . dC_i (per head)
#   chunk_cumsum_bwd        r_k = sum_{i>=k} d a_i + d a_last: ddt_k += A r_k, dA += sum dt_k r_k,
#                           then through the clamp (inclusive) and softplus (identity past 20)
#
# (d a_i = sum_j w_ij - sum_k w_ki + ... with w_ij = CB_ij M_ij dt_j (dy_i . x_j)
# is exactly C_i . dC_i - B_i . dB_i per head, so stage 4 needs no extra
# product for it.) dB and dC sum over a group's heads: each stage-4 program
# loops over HEADS_PER_PROGRAM heads of one group and sums in registers,
# one float32 partial per head split (deterministic, no atomics), reduced
# after. Saved: the inputs, dt_out and dA_cumsum (H, K, L), the forward's
# end_states (K, H, P, N, C's dtype: the start states), y when z is given.



def _saved_shapes(x, B, cu_chunk_seqlens, chunk_size):
    num_chunks = cu_chunk_seqlens.shape[0] - 1
    return (x.shape[1], num_chunks, chunk_size), (num_chunks, *x.shape[1:], B.shape[2])


def _chunk_scan_fwd_op(x, dt, A, B, C, chunk_size, cu_chunk_seqlens, seq_idx, num_seqs, D, z,
                       dt_bias, initial_states, dt_softplus, dt_min, dt_max,
                       return_intermediate_states, state_dtype):
    """(out, states, dt_out, dA_cumsum, end_states, y): y is the pre-gate
    output with z, else an empty tensor."""
    out = torch.empty_like(x)
    y = torch.empty_like(x) if z is not None else x.new_empty(0)
    if _nothing_to_launch(x, cu_chunk_seqlens, num_seqs):
        out.fill_(math.nan)  # as the in-place op (see the unchecked contract)
        rows = cu_chunk_seqlens.shape[0] - 1 if return_intermediate_states else num_seqs
        states = torch.full(_states_shape(x, B, rows), math.nan, dtype=state_dtype, device=x.device)
        small, big = _saved_shapes(x, B, cu_chunk_seqlens, chunk_size)
        zeros = lambda shape, dtype: torch.zeros(shape, dtype=dtype, device=x.device)  # noqa: E731
        return (out, states, zeros(small, torch.float32), zeros(small, torch.float32),
                zeros(big, C.dtype), y.fill_(math.nan))
    states, dt_out, dA_cumsum, end_states = _forward_stages(
        x, dt, A, B, C, chunk_size, cu_chunk_seqlens, seq_idx, num_seqs, out, D, z, dt_bias,
        initial_states, dt_softplus, dt_min, dt_max, return_intermediate_states, state_dtype,
        y=y if z is not None else None)
    return out, states, dt_out, dA_cumsum, end_states, y


def _chunk_scan_fwd_fake(x, dt, A, B, C, chunk_size, cu_chunk_seqlens, seq_idx, num_seqs, D, z,
                         dt_bias, initial_states, dt_softplus, dt_min, dt_max,
                         return_intermediate_states, state_dtype):
    rows = cu_chunk_seqlens.shape[0] - 1 if return_intermediate_states else num_seqs
    small, big = _saved_shapes(x, B, cu_chunk_seqlens, chunk_size)
    return (torch.empty_like(x), x.new_empty(_states_shape(x, B, rows), dtype=state_dtype),
            x.new_empty(small, dtype=torch.float32), x.new_empty(small, dtype=torch.float32),
            x.new_empty(big, dtype=C.dtype), torch.empty_like(x) if z is not None else x.new_empty(0))


def _absent(tensor, like):
    return tensor if tensor is not None else like.new_empty(0)


def _chunk_scan_bwd_op(dout, dstates, x, dt, A, B, C, cu_chunk_seqlens, seq_idx, num_seqs, D, z,
                       dt_bias, initial_states, dt_out, dA_cumsum, end_states, y, dt_softplus,
                       dt_min, dt_max, return_intermediate_states):
    """(dx, ddt, dA, dB, dC, dD, dz, d dt_bias, d initial_states), each like
    its input (empty for an absent input)."""
    if _nothing_to_launch(x, cu_chunk_seqlens, num_seqs):
        zero = lambda t: torch.zeros_like(t) if t is not None else x.new_empty(0)  # noqa: E731
        return tuple(zero(t) for t in (x, dt, A, B, C, D, z, dt_bias, initial_states))
    num_tokens, nheads, headdim = x.shape
    with platform.on_device(x.device):
        dS = chunk_scan_bwd_dstates(dout, z, C, dA_cumsum, cu_chunk_seqlens, nheads, headdim)
        G, dinit, dlast_state = state_passing_bwd(
            dS, dstates, dA_cumsum, end_states, seq_idx, num_seqs, initial_states=initial_states,
            return_intermediate_states=return_intermediate_states)
        dx, dz, ddt_x, ddA_j, dlast, dB, dD = chunk_scan_bwd(
            x, B, C, dout, z, y, D, dt_out, dA_cumsum, G, cu_chunk_seqlens)
        del G, dS
        dC, ddA_i = chunk_scan_bwd_dC(x, B, C, dout, z, dt_out, dA_cumsum, end_states,
                                      initial_states, cu_chunk_seqlens, seq_idx, num_seqs)
        ddt, dA, ddt_bias = chunk_cumsum_bwd(dt, A, dt_bias, cu_chunk_seqlens, dt_out, ddt_x, ddA_j,
                                             ddA_i, dlast, dlast_state, dt_softplus, (dt_min, dt_max))
    cast = lambda g, t: g.to(t.dtype) if t is not None else x.new_empty(0)  # noqa: E731
    return (dx, ddt, cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), _absent(dz, x),
            cast(ddt_bias, dt_bias), cast(dinit, initial_states))


def _chunk_scan_bwd_fake(dout, dstates, x, dt, A, B, C, cu_chunk_seqlens, seq_idx, num_seqs, D,
                         z, dt_bias, initial_states, *args):
    like = lambda t: torch.empty_like(t) if t is not None else x.new_empty(0)  # noqa: E731
    return tuple(like(t) for t in (x, dt, A, B, C, D, z, dt_bias, initial_states))


_BWD = platform.define_op(
    f"{ssd_contract.OP}_bwd",
    "(Tensor dout, Tensor dstates, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
    "Tensor cu_chunk_seqlens, Tensor seq_idx, int num_seqs, Tensor? D, Tensor? z, "
    "Tensor? dt_bias, Tensor? initial_states, Tensor dt_out, Tensor dA_cumsum, "
    "Tensor end_states, Tensor y, bool dt_softplus, float dt_min, float dt_max, "
    "bool return_intermediate_states) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _chunk_scan_bwd_op, _chunk_scan_bwd_fake)


_SAVED_INPUTS = ("x", "dt", "A", "B", "C", "cu_chunk_seqlens", "seq_idx", "D", "z", "dt_bias",
                 "initial_states")


def _setup_context(ctx, inputs, output):
    (x, dt, A, B, C, _, cu_chunk_seqlens, seq_idx, ctx.num_seqs, D, z, dt_bias, initial_states,
     ctx.dt_softplus, ctx.dt_min, ctx.dt_max, ctx.intermediate, _) = inputs
    _, _, dt_out, dA_cumsum, end_states, y = output
    ctx.mark_non_differentiable(dt_out, dA_cumsum, end_states, y)
    ctx.save_for_backward(x, dt, A, B, C, cu_chunk_seqlens, seq_idx, D, z, dt_bias, initial_states,
                          dt_out, dA_cumsum, end_states, y)


def _autograd_backward(ctx, dout, dstates, *unused):
    (x, dt, A, B, C, cu_chunk_seqlens, seq_idx, D, z, dt_bias, initial_states, dt_out, dA_cumsum,
     end_states, y) = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(x)
    if dstates is None:
        rows = cu_chunk_seqlens.shape[0] - 1 if ctx.intermediate else ctx.num_seqs
        dstates = torch.zeros(_states_shape(x, B, rows), dtype=torch.float32, device=x.device)
    grads = _BWD(
        dout, dstates, x, dt, A, B, C, cu_chunk_seqlens, seq_idx, ctx.num_seqs, D, z, dt_bias,
        initial_states, dt_out, dA_cumsum, end_states, y, ctx.dt_softplus, ctx.dt_min, ctx.dt_max,
        ctx.intermediate)
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = (
        g if t is not None else None for g, t in zip(grads, (x, dt, A, B, C, D, z, dt_bias,
                                                             initial_states)))
    return (dx, ddt, dA, dB, dC, None, None, None, None, dD, dz, ddt_bias, dinit,
            None, None, None, None, None)


_FWD = platform.define_op(
    f"{ssd_contract.OP}_fwd", "(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, int chunk_size, "
    "Tensor cu_chunk_seqlens, Tensor seq_idx, int num_seqs, Tensor? D, Tensor? z, "
    "Tensor? dt_bias, Tensor? initial_states, bool dt_softplus, float dt_min, float dt_max, "
    "bool return_intermediate_states, ScalarType state_dtype) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _chunk_scan_fwd_op, _chunk_scan_fwd_fake, autograd=(_autograd_backward, _setup_context))


def _requires_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def mamba_chunk_scan_combined_varlen(
        x, dt, A, B, C, chunk_size, cu_seqlens, cu_chunk_seqlens, last_chunk_indices, seq_idx,
        out=None, D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False,
        dt_limit=(0.0, math.inf), return_intermediate_states=False, state_dtype=None, *,
        validate_metadata=None):
    """Prefill over packed sequences. The states: ``(Q, H, P, N)`` final
    states, or ``(K, H, P, N)`` end-of-chunk states with
    ``return_intermediate_states``, in ``state_dtype`` (default: C's dtype).
    Shapes: ``bridge.spec.ssd_contract``.

    With ``out (T, H, P)`` given, the output is written into it in place and
    the states are returned (vLLM's contract; inference only: refused when
    an input requires grad under grad mode). With ``out=None`` the call
    returns ``(out, states)``, differentiable (Triton backward kernels) in
    x, dt, A, B, C, D, z, dt_bias and initial_states, from ``out`` and the
    states; when nothing requires grad it runs exactly the inference path.

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
    ``out`` and the states are NaN. (The backward only promises the
    bounds: gradients are unspecified for such metadata.)
    """
    tensors = dict(x=x, dt=dt, A=A, B=B, C=C, out=out, D=D, z=z, dt_bias=dt_bias,
                   initial_states=initial_states, cu_seqlens=cu_seqlens,
                   cu_chunk_seqlens=cu_chunk_seqlens, last_chunk_indices=last_chunk_indices,
                   seq_idx=seq_idx)
    compiling = torch.compiler.is_compiling()
    layout = ssd_contract.check_ssd_args(
        **tensors, chunk_size=chunk_size, dt_limit=dt_limit,
        state_dtype=None if state_dtype is None else str(state_dtype).removeprefix("torch."),
        remember=not compiling)
    differentiable = _requires_grad(x, dt, A, B, C, D, z, dt_bias, initial_states)
    if differentiable and out is not None:
        checks.fail(ssd_contract.OP, "out", "is written in place, which autograd cannot record, "
                    "and inputs require grad: pass out=None for a differentiable (out, states), "
                    "or call under torch.no_grad()")
    device = platform.check_kernel_device(tensors)
    host = platform.host_index_values(
        validate_metadata, device, cu_seqlens=cu_seqlens, cu_chunk_seqlens=cu_chunk_seqlens,
        seq_idx=seq_idx, last_chunk_indices=last_chunk_indices)
    if host is not None:
        ssd_contract.check_chunk_metadata_values(layout, **host)
    options = dict(
        x=x, dt=dt, A=A, B=B, C=C, chunk_size=layout.chunk_size, cu_chunk_seqlens=cu_chunk_seqlens,
        seq_idx=seq_idx, num_seqs=layout.num_seqs, D=D, z=z, dt_bias=dt_bias,
        initial_states=initial_states, dt_softplus=bool(dt_softplus), dt_min=float(dt_limit[0]),
        dt_max=float(dt_limit[1]), return_intermediate_states=bool(return_intermediate_states),
        state_dtype=state_dtype or C.dtype)
    if differentiable:
        out, states, *_ = _FWD(**options)
        return out, states
    # Eagerly the registered op's dispatch would only add cost; torch.compile needs the op.
    run = _OP if compiling else _chunk_scan_op
    if out is None:
        out = torch.empty_like(x)
        return out, run(**options, out=out)
    return run(**options, out=out)


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                              initial_states=None, seq_idx=None, dt_softplus=False,
                              dt_limit=(0.0, math.inf), return_final_states=False,
                              state_dtype=None):
    """The batched form: ``x, z (b, l, H, P)``, ``dt (b, l, H)``, ``B, C (b, l,
    G, N)``, ``initial_states (b, H, P, N)``, ``seq_idx (b, l)`` (a row splits
    into sequences where it changes; initial states go to each row's first
    sequence). Returns ``out (b, l, H, P)``, and with ``return_final_states``
    also the state at the end of each row ``(b, H, P, N)``. Differentiable
    in every float input (the varlen form's backward, seq_idx included)."""
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
        varlen_initial_states = initial_states.new_zeros(
            (len(cu_seqlens) - 1, *initial_states.shape[1:])).index_copy(
            0, index(first_seq).long(), initial_states)
    out, final_states = mamba_chunk_scan_combined_varlen(
        flat(x), flat(dt), A, flat(B), flat(C), chunk_size, index(cu_seqlens),
        index(metadata.cu_chunk_seqlens), index(metadata.last_chunk_indices),
        index(metadata.seq_idx), None, D=D, z=flat(z), dt_bias=dt_bias,
        initial_states=varlen_initial_states, dt_softplus=dt_softplus, dt_limit=dt_limit,
        state_dtype=state_dtype, validate_metadata=False)
    out = out.reshape(x.shape)
    if return_final_states:
        return out, final_states[index(last_seq).long()]
    return out
