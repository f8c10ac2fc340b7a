"""Mamba-1's prefill scan ``selective_scan_fn`` (vLLM's signature and in-place
contract) as a Triton kernel. The math, shapes, prefix-caching writes and
the unchecked contract: ``bridge.spec.selective_scan_contract``. Mirror:
``jax_impl/selective_scan.py``.
"""

from __future__ import annotations

import torch

from bridge.spec.selective_scan_contract import (
    NULL_BLOCK_ID, ScanLayout, check_selective_scan_args, check_selective_scan_index_values, scan_tiles)
from torch_impl import platform

import triton  # noqa: E402  (after platform, which may set TRITON_INTERPRET)
import triton.language as tl  # noqa: E402

MAX_GRID_Y = 2**16 - 1  # sequences are the grid's y axis


@triton.jit
def _pick(tile, at):
    """The row of ``tile`` that the one-hot mask ``at`` selects, over axis 0,
    which each thread holds whole: a sum of the values' integer bits (x + 0
    folds away; a float sum kept one add per value, the conversion's cost
    again)."""
    if tile.dtype.primitive_bitwidth == 16:
        bits = tile.to(tl.int16, bitcast=True)
    else:
        bits = tile.to(tl.int32, bitcast=True)
    return tl.sum(tl.where(at, bits, 0), axis=0).to(bits.dtype).to(tile.dtype, bitcast=True)


@triton.jit
def _load(pointers, mask):
    """``tl.load`` with 0 where ``mask`` is False; unmasked when None."""
    if mask is None:
        values = tl.load(pointers)
    else:
        values = tl.load(pointers, mask=mask, other=0.0)
    return values


@triton.jit
def _scan_tile(h, A2, D, delta_bias, start, first_tok, end_tok, ok, offset, row, first_col,
               null_block_id, block_size, u_cols, delta_cols, z_cols, out_cols, B_cols, C_cols,
               stride_u_tok, stride_delta_tok, stride_z_tok, stride_out_tok, stride_B_tok, stride_C_tok,
               stride_cache_col, states_ptr, stride_states_slot, state_tile, state_mask, mask_d, mask_n,
               DELTA_SOFTPLUS: tl.constexpr, BLOCK_T: tl.constexpr, EDGE: tl.constexpr, EVEN: tl.constexpr):
    """One tile of BLOCK_T tokens from ``start``: the (BLOCK_D, BLOCK_N)
    state ``h`` carried through them, the outputs stored; returns ``h``.
    ``EDGE`` 0: the tile lies inside the sequence (no masks over tokens, and
    none at all when ``EVEN``);
    1: it may cross an end of the sequence (masked); 2: also a prefix-caching
    block boundary may lie in it (states written there)."""
    offs_t = tl.arange(0, BLOCK_T)
    toks = start + offs_t
    if EDGE:
        valid = (toks >= first_tok) & (toks < end_tok)
    else:
        valid = offs_t < BLOCK_T
    if EDGE == 0 and EVEN:  # no masks: unpredicated vector loads
        mask_td = None
        mask_tdn = None
    else:
        mask_td = valid[:, None] & mask_d[None, :]
        mask_tdn = mask_td[:, :, None] & mask_n[None, None, :]
    u = _load(u_cols + toks[:, None] * stride_u_tok, mask_td).to(tl.float32)
    dt = _load(delta_cols + toks[:, None] * stride_delta_tok, mask_td).to(tl.float32)
    if delta_bias is not None:
        dt += delta_bias[None, :]
    if DELTA_SOFTPLUS:
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
    if EDGE:
        dt = tl.where(valid[:, None], dt, 0.0)  # outside the sequence: h unchanged
    du = dt * u
    # B, C loaded as (BLOCK_T, BLOCK_D, BLOCK_N) with a 0 stride over
    # channels: each thread reads the whole tile (broadcast vector loads),
    # laid out like the state.
    B = _load(B_cols + toks[:, None, None] * stride_B_tok, mask_tdn)
    C = _load(C_cols + toks[:, None, None] * stride_C_tok, mask_tdn)
    y = tl.zeros((BLOCK_T, h.shape[0]), tl.float32)
    for j in tl.static_range(BLOCK_T):
        at_j = offs_t == j
        dt_j = _pick(dt, at_j[:, None])
        du_j = _pick(du, at_j[:, None])
        B_j = _pick(B, at_j[:, None, None]).to(tl.float32)
        C_j = _pick(C, at_j[:, None, None]).to(tl.float32)
        h = tl.exp2(dt_j[:, None] * A2) * h + du_j[:, None] * B_j
        y = tl.where(at_j[:, None], tl.sum(C_j * h, axis=1)[None, :], y)
        if EDGE == 2:
            # The state after a token that completes a block (not the last token).
            i = start + j - first_tok
            if ok & (i >= 0) & ((offset + i + 1) % block_size == 0) & (start + j + 1 < end_tok):
                slot = tl.load(row + (first_col + (offset + i) // block_size) * stride_cache_col).to(tl.int64)
                tl.store(states_ptr + tl.where(slot != null_block_id, slot, 0) * stride_states_slot
                         + state_tile, h.to(states_ptr.dtype.element_ty),
                         mask=state_mask & (slot != null_block_id))
    if D is not None:
        y += D[None, :] * u
    if z_cols is not None:
        z = _load(z_cols + toks[:, None] * stride_z_tok, mask_td).to(tl.float32)
        y *= z * tl.sigmoid(z)
    y = tl.where(ok, y, float("nan"))
    tl.store(out_cols + toks[:, None] * stride_out_tok, y.to(out_cols.dtype.element_ty), mask=mask_td)
    return h


# dstate strides unspecialized: the state and A tiles then load with the
# threads over channels, the layout every tile of the loop uses (a load
# coalesced over dstate would put the loop's state in another layout).
@triton.heuristics(platform.given_flags(
    HAS_D="D_ptr", HAS_Z="z_ptr", HAS_DELTA_BIAS="delta_bias_ptr", IS_VARLEN="query_start_loc_ptr",
    HAS_CACHE_INDICES="cache_indices_ptr", HAS_INITIAL_STATE="has_initial_state_ptr",
    IS_APC="block_idx_first_ptr", HAS_CHUNKS="cu_chunk_seqlen_ptr"))
@triton.jit(do_not_specialize=["stride_A_dstate", "stride_states_dstate"])
def _selective_scan_kernel(
    # pointers
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, out_ptr, states_ptr,
    query_start_loc_ptr, cache_indices_ptr, has_initial_state_ptr, block_idx_first_ptr,
    block_idx_last_ptr, initial_state_idx_ptr, cu_chunk_seqlen_ptr, last_chunk_indices_ptr,
    # sizes
    null_block_id, block_size, num_tokens, num_slots, index_columns, num_chunks, dim, dstate,
    channels_per_group,
    # strides ((seq, dim, token) for u, delta, z, out; (seq, group, dstate, token) for B, C)
    stride_u_seq, stride_u_dim, stride_u_tok,
    stride_delta_seq, stride_delta_dim, stride_delta_tok,
    stride_z_seq, stride_z_dim, stride_z_tok,
    stride_out_seq, stride_out_dim, stride_out_tok,
    stride_B_seq, stride_B_group, stride_B_dstate, stride_B_tok,
    stride_C_seq, stride_C_group, stride_C_dstate, stride_C_tok,
    stride_A_dim, stride_A_dstate, stride_D_dim, stride_delta_bias_dim,
    stride_states_slot, stride_states_dim, stride_states_dstate,
    stride_cache_seq, stride_cache_col,
    # meta-parameters
    DELTA_SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_CACHE_INDICES: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr,
    IS_APC: tl.constexpr, HAS_CHUNKS: tl.constexpr, EVEN: tl.constexpr,
):
    """Grid (cdiv(dim, BLOCK_D), num_seqs): one program holds a (BLOCK_D,
    dstate) float32 state of one sequence in registers while it walks the
    sequence's tokens, BLOCK_T at a time. Every load and store is masked against the real
    extents; a sequence breaking the contract writes no state and NaN outputs."""
    pid_d = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    if IS_VARLEN:
        bos = tl.load(query_start_loc_ptr + seq).to(tl.int64)
        eos = tl.load(query_start_loc_ptr + seq + 1).to(tl.int64)
    else:
        bos = seq * 0
        eos = bos + num_tokens
    ok = (bos >= 0) & (bos <= eos) & (eos <= num_tokens)
    first_tok = tl.minimum(tl.maximum(bos, 0), num_tokens)
    end_tok = tl.minimum(tl.maximum(eos, first_tok), num_tokens)
    seqlen = end_tok - first_tok

    padding = seq < 0  # False, as a tensor
    read_slot = seq
    write_slot = seq
    if HAS_CACHE_INDICES:
        row = cache_indices_ptr + seq * stride_cache_seq
        if IS_APC:
            init_col = tl.load(initial_state_idx_ptr + seq).to(tl.int64)
            first_col = tl.load(block_idx_first_ptr + seq).to(tl.int64)
            last_col = tl.load(block_idx_last_ptr + seq).to(tl.int64)
            cols_ok = ((init_col >= 0) & (init_col < index_columns) & (first_col >= 0)
                       & (first_col <= last_col) & (last_col < index_columns))
            read_slot = tl.load(row + tl.where(cols_ok, init_col, 0) * stride_cache_col).to(tl.int64)
            write_slot = tl.load(row + tl.where(cols_ok, last_col, 0) * stride_cache_col).to(tl.int64)
            padding = cols_ok & (read_slot == null_block_id)
            ok = ok & cols_ok
        else:
            read_slot = tl.load(row).to(tl.int64)
            write_slot = read_slot
            padding = read_slot == null_block_id
    in_cache_write = (write_slot >= 0) & (write_slot < num_slots)
    if HAS_CACHE_INDICES:
        in_cache_write = in_cache_write | (write_slot == null_block_id)  # not kept
    ok = ok & (read_slot >= 0) & (read_slot < num_slots) & in_cache_write

    offset = seq * 0  # of the first scheduled token in its block (APC)
    if IS_APC:
        if HAS_CHUNKS:
            last_chunk = tl.load(last_chunk_indices_ptr + seq).to(tl.int64)
            prev = tl.load(last_chunk_indices_ptr + seq - 1, mask=seq > 0, other=-1).to(tl.int64)
            first_chunk = prev + 1
            chunks_ok = (first_chunk >= 0) & (first_chunk <= last_chunk) & (last_chunk < num_chunks)
            chunk = tl.where(chunks_ok, first_chunk, 0)
            first_len = (tl.load(cu_chunk_seqlen_ptr + chunk + 1, mask=chunks_ok, other=0)
                         - tl.load(cu_chunk_seqlen_ptr + chunk, mask=chunks_ok, other=0)).to(tl.int64)
            partial = chunks_ok & (last_chunk > first_chunk) & (first_len > 0) & (first_len < block_size)
            offset = tl.where(partial, block_size - first_len, 0)
            ok = ok & chunks_ok
        boundaries = (offset + tl.maximum(seqlen, 1) - 1) // block_size
        ok = ok & (last_col == first_col + boundaries)
        bad_slots = tl.full([], 0, tl.int32)
        for col in range(first_col, tl.where(ok & ~padding, last_col, first_col)):
            slot = tl.load(row + col * stride_cache_col).to(tl.int64)
            bad_slots += ((slot != null_block_id) & ((slot < 0) | (slot >= num_slots))).to(tl.int32)
        ok = ok & (bad_slots == 0)

    # Threads over channels in every tile (the state (BLOCK_D, BLOCK_N),
    # token tiles (BLOCK_T, BLOCK_D), B / C (BLOCK_T, BLOCK_D, BLOCK_N)): with
    # BLOCK_D = 32 * num_warps each thread keeps its channel's dstate row and
    # a tile's tokens in registers, so the reductions over dstate and the
    # token picks stay inside it (no shuffles, no shared memory; checked in
    # the sm_90 assembly).
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    state_mask = mask_d[:, None] & mask_n[None, :]
    state_tile = offs_d[:, None] * stride_states_dim + offs_n[None, :] * stride_states_dstate
    group = (pid_d * BLOCK_D) // channels_per_group

    if HAS_INITIAL_STATE:
        load_state = ok & ~padding & (tl.load(has_initial_state_ptr + seq) != 0)
        h = tl.load(states_ptr + tl.where(load_state, read_slot, 0) * stride_states_slot + state_tile,
                    mask=state_mask & load_state, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    # exp(dt * A) as exp2(dt * A2): log2(e) folded in once.
    A2 = tl.load(A_ptr + offs_d[:, None] * stride_A_dim + offs_n[None, :] * stride_A_dstate,
                 mask=state_mask, other=0.0).to(tl.float32) * 1.4426950408889634
    D = tl.load(D_ptr + offs_d * stride_D_dim, mask=mask_d, other=0.0).to(tl.float32) if HAS_D else None
    delta_bias = (tl.load(delta_bias_ptr + offs_d * stride_delta_bias_dim, mask=mask_d, other=0.0)
                  .to(tl.float32) if HAS_DELTA_BIAS else None)

    # Tokens in tiles of BLOCK_T starting at multiples of BLOCK_T (aligned
    # vector loads: BLOCK_T contiguous tokens per thread, threads over
    # channels). Tiles inside the sequence run unmasked over tokens (masks
    # constant along a vector, so the loads vectorize); the first and last
    # are masked at the sequence's ends.
    u_cols = (u_ptr + seq * stride_u_seq + offs_d * stride_u_dim)[None, :]
    delta_cols = (delta_ptr + seq * stride_delta_seq + offs_d * stride_delta_dim)[None, :]
    z_cols = (z_ptr + seq * stride_z_seq + offs_d * stride_z_dim)[None, :] if HAS_Z else None
    out_cols = (out_ptr + seq * stride_out_seq + offs_d * stride_out_dim)[None, :]
    over_d = (offs_d * 0)[None, :, None]
    B_cols = (B_ptr + seq * stride_B_seq + group * stride_B_group + offs_n * stride_B_dstate)[None, None, :] + over_d
    C_cols = (C_ptr + seq * stride_C_seq + group * stride_C_group + offs_n * stride_C_dstate)[None, None, :] + over_d
    if not IS_APC:  # unused without prefix caching
        row, first_col = seq, seq
    first_tile = first_tok // BLOCK_T * BLOCK_T
    for start in range(first_tile, tl.where(padding, first_tile, end_tok), BLOCK_T):
        inside = (start >= first_tok) & (start + BLOCK_T <= end_tok)
        if IS_APC:  # a block boundary in the tile takes the slow path too
            i = start - first_tok
            inside = inside & ((offset + i + BLOCK_T) // block_size == (offset + i) // block_size)
        # EDGE must be a constexpr, hence one call per path. (The arguments
        # cannot travel as one tuple: compiled Triton 3.6 rejects a tuple
        # holding an absent operand's None; the interpreter accepts it.)
        if inside:
            h = _scan_tile(h, A2, D, delta_bias, start, first_tok, end_tok, ok, offset, row, first_col,
                           null_block_id, block_size, u_cols, delta_cols, z_cols, out_cols, B_cols, C_cols,
                           stride_u_tok, stride_delta_tok, stride_z_tok, stride_out_tok, stride_B_tok,
                           stride_C_tok, stride_cache_col, states_ptr, stride_states_slot, state_tile,
                           state_mask, mask_d, mask_n, DELTA_SOFTPLUS=DELTA_SOFTPLUS, BLOCK_T=BLOCK_T, EDGE=0,
                           EVEN=EVEN)
        else:
            h = _scan_tile(h, A2, D, delta_bias, start, first_tok, end_tok, ok, offset, row, first_col,
                           null_block_id, block_size, u_cols, delta_cols, z_cols, out_cols, B_cols, C_cols,
                           stride_u_tok, stride_delta_tok, stride_z_tok, stride_out_tok, stride_B_tok,
                           stride_C_tok, stride_cache_col, states_ptr, stride_states_slot, state_tile,
                           state_mask, mask_d, mask_n, DELTA_SOFTPLUS=DELTA_SOFTPLUS, BLOCK_T=BLOCK_T,
                           EDGE=IS_APC + 1, EVEN=EVEN)

    keep = ok & ~padding & (seqlen > 0)
    if HAS_CACHE_INDICES:
        keep = keep & (write_slot != null_block_id)
    tl.store(states_ptr + tl.where(keep, write_slot, 0) * stride_states_slot + state_tile,
             h.to(states_ptr.dtype.element_ty), mask=state_mask & keep)


def _seq_strides(tensor, varlen: bool, ndim: int) -> tuple:
    """Strides with a leading sequence axis (0 for the packed varlen form)
    and, for B / C given without a group axis, a group stride of 0."""
    if tensor is None:
        return platform.strides(None, ndim)
    strides = list(tensor.stride())
    if varlen:
        strides.insert(0, 0)
    if len(strides) < ndim:
        strides.insert(1, 0)
    return tuple(strides)


def _launch(ssm_states, delta, z, u, A, B, C, D, delta_bias, query_start_loc, cache_indices,
            has_initial_state, block_idx_first_scheduled_token, block_idx_last_scheduled_token,
            initial_state_idx, cu_chunk_seqlen, last_chunk_indices, delta_softplus: bool,
            null_block_id: int, block_size: int):
    """The kernel launch on checked arguments; the output goes into ``z``
    when given, else into ``delta``."""
    layout = check_selective_scan_args(  # cached per signature
        u=u, ssm_states=ssm_states, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
        query_start_loc=query_start_loc, cache_indices=cache_indices,
        has_initial_state=has_initial_state,
        block_idx_first_scheduled_token=block_idx_first_scheduled_token,
        block_idx_last_scheduled_token=block_idx_last_scheduled_token,
        initial_state_idx=initial_state_idx, cu_chunk_seqlen=cu_chunk_seqlen,
        last_chunk_indices=last_chunk_indices)
    states = ssm_states.view(ssm_states.shape[0], layout.dim, layout.dstate)
    out = delta if z is None else z
    varlen = layout.varlen
    cache_strides = (0, 0) if cache_indices is None else (
        cache_indices.stride(0), cache_indices.stride(1) if cache_indices.dim() == 2 else 0)
    tiles = scan_tiles(layout)
    grid = (platform.cdiv(layout.dim, tiles.block_d), layout.num_seqs)
    with platform.on_device(u.device):
        platform.launch(_selective_scan_kernel, grid,
            u, delta, A, B, C, D, z, delta_bias, out, states,
            query_start_loc, cache_indices, has_initial_state, block_idx_first_scheduled_token,
            block_idx_last_scheduled_token, initial_state_idx, cu_chunk_seqlen, last_chunk_indices,
            null_block_id, block_size, layout.num_tokens, layout.num_slots, layout.index_columns,
            layout.num_chunks, layout.dim, layout.dstate, layout.channels_per_group,
            *_seq_strides(u, varlen, 3), *_seq_strides(delta, varlen, 3), *_seq_strides(z, varlen, 3),
            *_seq_strides(out, varlen, 3), *_seq_strides(B, varlen, 4), *_seq_strides(C, varlen, 4),
            *A.stride(), *platform.strides(D, 1), *platform.strides(delta_bias, 1),
            *states.stride(), *cache_strides,
            DELTA_SOFTPLUS=delta_softplus, BLOCK_D=tiles.block_d, BLOCK_N=tiles.block_n,
            BLOCK_T=tiles.block_t, EVEN=tiles.even, num_warps=tiles.num_warps)


_OP = platform.define_op(
    "selective_scan_fwd",
    "(Tensor(a!) ssm_states, Tensor(b!) delta, Tensor(c!)? z, Tensor u, "
    "Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? delta_bias, Tensor? query_start_loc, "
    "Tensor? cache_indices, Tensor? has_initial_state, Tensor? block_idx_first_scheduled_token, "
    "Tensor? block_idx_last_scheduled_token, Tensor? initial_state_idx, Tensor? cu_chunk_seqlen, "
    "Tensor? last_chunk_indices, bool delta_softplus, int null_block_id, int block_size) -> ()",
    _launch)


def selective_scan_fn(u, ssm_states, delta, A, B, C, D=None, z=None, delta_bias=None,
                      delta_softplus=False, query_start_loc=None, cache_indices=None,
                      has_initial_state=None, null_block_id=NULL_BLOCK_ID, block_size=1024,
                      block_idx_first_scheduled_token=None, block_idx_last_scheduled_token=None,
                      initial_state_idx=None, cu_chunk_seqlen=None, last_chunk_indices=None, *,
                      validate_indices=None):
    """Mamba-1 prefill: ``u, delta, z (dim, T)`` packed by ``query_start_loc``
    (or ``(batch, dim, seqlen)``), ``B, C (ngroups, dstate, T)``; reads and
    writes ``ssm_states (slots, dim, dstate)`` in place at ``cache_indices``
    (a block table with prefix caching). Writes the output into ``z`` when
    given, else into ``delta``, and returns that tensor.

    Shapes, the prefix-caching writes and the unchecked contract (bad index
    values: no state written, NaN outputs, never an access outside the
    tensors): ``bridge.spec.selective_scan_contract``. ``validate_indices``
    (default ``$MAMBA_TWIN_CHECK_INDICES``, off) checks index values on the
    host (a device sync; skipped under CUDA-graph capture / torch.compile).
    Inference only: refused (RuntimeError) when an input requires grad with
    grad mode on.
    """
    if torch.is_grad_enabled() and any(getattr(t, "requires_grad", False)
                                       for t in (u, ssm_states, delta, A, B, C, D, z, delta_bias)):
        raise RuntimeError("selective_scan_fn is an inference-only (prefill) op: it has no gradient and "
                           "writes `ssm_states` and its output in place; call it under torch.no_grad() "
                           "or torch.inference_mode() (to train a Mamba-2 model: mamba_chunk_scan_combined)")
    index_args = dict(query_start_loc=query_start_loc, cache_indices=cache_indices,
                      has_initial_state=has_initial_state,
                      block_idx_first_scheduled_token=block_idx_first_scheduled_token,
                      block_idx_last_scheduled_token=block_idx_last_scheduled_token,
                      initial_state_idx=initial_state_idx, cu_chunk_seqlen=cu_chunk_seqlen,
                      last_chunk_indices=last_chunk_indices)
    float_args = dict(u=u, ssm_states=ssm_states, delta=delta, A=A, B=B, C=C, D=D, z=z,
                      delta_bias=delta_bias)
    layout = check_selective_scan_args(**float_args, **index_args, null_block_id=null_block_id,
                                       block_size=block_size, delta_softplus=delta_softplus)
    device = platform.check_kernel_device({**float_args, **index_args})
    host = platform.host_index_values(validate_indices, device, **index_args)
    if host is not None:
        check_selective_scan_index_values(layout, null_block_id=int(null_block_id),
                                          block_size=int(block_size), **host)
    if layout.num_seqs > MAX_GRID_Y:
        raise ValueError(f"selective_scan_fn: {layout.num_seqs} sequences; the Triton kernel takes "
                         f"at most {MAX_GRID_Y} per call (CUDA's grid limit)")
    if ssm_states.dim() == 4 and not _viewable(ssm_states, layout):
        raise ValueError("selective_scan_fn: `ssm_states` (slots, nheads, dim // nheads, dstate) must "
                         "be viewable as (slots, dim, dstate) (heads contiguous over dim)")
    out = delta if z is None else z
    if layout.num_seqs == 0 or layout.num_tokens == 0 or layout.dim == 0:
        return out
    _OP(ssm_states=ssm_states, delta=delta, z=z, u=u, A=A, B=B, C=C, D=D, delta_bias=delta_bias,
        **index_args, delta_softplus=bool(delta_softplus), null_block_id=int(null_block_id),
        block_size=int(block_size))
    return out


def _viewable(states, layout: ScanLayout) -> bool:
    return states.stride(1) == states.shape[2] * states.stride(2) or states.shape[1] == 1
