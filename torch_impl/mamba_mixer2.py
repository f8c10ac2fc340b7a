"""The Mamba-2 mixer layer (vLLM's ``MambaMixer2``) as a PyTorch module on
this package's kernels:

    in_proj -> (gate, xBC, dt) -> causal conv1d -> SSM -> gated RMSNorm -> out_proj

Training: ``mixer(hidden_states)`` on ``(batch, seqlen, hidden)``, no cache
(every sequence from zero state), differentiable end to end. Serving:
decode requests come first in a batch (``causal_conv1d_update`` +
``selective_state_update``), prefills after them (``causal_conv1d_fn`` +
``mamba_chunk_scan_combined_varlen``). The conv and SSM states live in a
``bridge.MambaStateCache`` that a ``jax_impl.MambaMixer2`` with the same
weights can continue. Tensor parallelism: ``tp_size`` ranks of a
``torch.distributed`` process group, each with its shard (``torch_impl.tp``,
``bridge.spec.mixer_sharding``). Mirror: ``jax_impl/mamba_mixer2.py``.

Serving: move each batch's metadata to the device once
(``metadata_to_device``) for all layers; ``forward`` then makes no host copy
and no host sync, and ``CapturedDecodeStep`` captures a decode step in a
CUDA graph per batch size.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from bridge.spec.mixer_layout import PARAM_ATTRS, MixerLayout
from bridge.spec.checks import expect_shape, fail, shape_of
from bridge.spec.mixer_metadata import Mamba2Metadata, build_mamba2_metadata
from bridge.spec.ssu_contract import NULL_BLOCK_ID
from bridge.spec.state_shapes import is_conv_state_dim_first
from bridge.spec.mixer_sharding import shard_mixer_weights
from torch_impl import platform, tp
from torch_impl.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from torch_impl.gated_rms_norm import rms_norm_gated
from torch_impl.selective_state_update import selective_state_update
from torch_impl.ssd_combined import mamba_chunk_scan_combined_varlen


def metadata_to_device(metadata: Mamba2Metadata, device) -> Mamba2Metadata:
    """The metadata with its arrays as tensors on ``device``: once per batch,
    for every layer (``forward`` then copies nothing; a CUDA graph needs it)."""
    return metadata.map_arrays(lambda array: torch.as_tensor(array, device=device))


@triton.heuristics(platform.given_flags(HAS_SRC_ROWS="src_rows_ptr"))
@triton.jit
def _scatter_states_kernel(dst_ptr, src_ptr, dst_rows_ptr, src_rows_ptr, num_dst, num_src, row_size,
                           stride_dst, stride_src, null_id, BLOCK: tl.constexpr,
                           HAS_SRC_ROWS: tl.constexpr):
    """dst[dst_rows[i]] = src[src_rows[i]] (src[i] without src_rows), one
    program per entry and BLOCK elements of a row; entries on the null
    block or outside dst are skipped, an out-of-range src row writes NaN."""
    i = tl.program_id(0)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    dst_row = tl.load(dst_rows_ptr + i).to(tl.int64)
    if HAS_SRC_ROWS:
        src_row = tl.load(src_rows_ptr + i).to(tl.int64)
    else:
        src_row = i.to(tl.int64)
    write = (dst_row != null_id) & (dst_row >= 0) & (dst_row < num_dst)
    read = write & (src_row >= 0) & (src_row < num_src)
    in_row = cols < row_size
    values = tl.load(src_ptr + src_row * stride_src + cols, mask=in_row & read, other=float("nan"))
    tl.store(dst_ptr + dst_row * stride_dst + cols, values, mask=in_row & write)


def _scatter_states(ssm_state, slots, states, rows=None):
    """``ssm_state[slots] = states[rows]`` (``states`` when ``rows`` is None),
    in place, without a host sync; null-block and out-of-range slots skipped
    (no wraparound), an out-of-range row writes NaN."""
    if not len(slots):
        return
    target, source = ssm_state.view(ssm_state.shape[0], -1), states.reshape(states.shape[0], -1)
    block = platform.next_power_of_2(min(target.shape[1], 1024))
    with platform.on_device(ssm_state.device):
        platform.launch(_scatter_states_kernel, (len(slots), platform.cdiv(target.shape[1], block)),
            target, source, slots, rows, target.shape[0], source.shape[0], target.shape[1],
            target.stride(0), source.stride(0), NULL_BLOCK_ID, BLOCK=block)


def _gather_states(ssm_state, slots, use):
    """``ssm_state[slots]`` where ``use`` (NaN for a slot outside the cache), zeros elsewhere."""
    inside = (slots >= 0) & (slots < ssm_state.shape[0])
    rows = ssm_state[slots.clamp(0, ssm_state.shape[0] - 1).long()]
    rows = torch.where(inside[:, None, None, None], rows, math.nan)
    return torch.where(use[:, None, None, None], rows, 0).to(ssm_state.dtype)


def _pick(table, columns):
    """``table[r, columns[r]]`` per row (``columns (R,)``), or ``table[r,
    columns[r, k]]`` (``(R, K)``); -1 (out of range: skipped) for a column
    outside the table."""
    cols = columns if columns.dim() == 2 else columns[:, None]
    inside = (cols >= 0) & (cols < table.shape[1])
    picked = torch.where(inside, table.gather(1, cols.clamp(0, table.shape[1] - 1).long()), -1)
    return picked if columns.dim() == 2 else picked[:, 0]


class MambaMixer2(MixerLayout, nn.Module):
    """Arguments: ``bridge.spec.mixer_layout.MixerLayout``'s. Parameters: ``in_proj_weight (I + conv_dim + H,
    hidden)``, ``in_proj_bias``, ``conv_weight (conv_dim, W)``, ``conv_bias``,
    ``A_log (H,)`` (float32; ``A = -exp(A_log)``, the property ``A``), ``D``,
    ``dt_bias (H,)``, ``norm_weight (I,)``, ``out_proj_weight (hidden, I)``,
    ``out_proj_bias``.

    Two forwards: ``mixer(hidden_states)`` (training: ``(batch, seqlen,
    hidden)``, no cache, differentiable) and ``mixer(hidden_states, cache,
    metadata, layer)`` (serving, see ``forward``).

    ``validate_indices`` (attribute, default None: ``$MAMBA_TWIN_CHECK_INDICES``,
    off by default): True checks the metadata's values on the host before
    anything is written (one device sync), with errors naming the metadata
    field; it refuses a slot outside the cache and two requests on one slot
    (a slot written twice, or read by one request and written by another).
    Unchecked (the default, and under CUDA-graph capture): the kernels skip
    slots outside the cache and the null block, and poison the outputs of
    such requests with NaN; nothing outside the scheduled slots is written.
    Colliding requests then leave their slots unspecified (either update
    may win, or the updates chain).

    Tensor parallelism (``tp_size`` ranks of ``process_group``): each rank
    holds its shard (``in_proj`` rows of its gate, x, B, C and dt; its conv
    channels; its heads; its groups, the one group replicated when
    ``n_groups`` is 1; its norm weights; its ``out_proj`` columns; the
    ``out_proj`` bias whole, added by rank 0), of the sizes above divided as
    ``bridge.spec.mixer_sharding.MixerDims`` says. Every rank takes the same
    ``hidden_states`` and returns the same output (all-reduced); its cache
    (``get_state_shape()``) holds its conv channels and heads. Random
    initialisation is per rank: load a checkpoint (``load_weights`` takes
    the whole one) for a model equal to the unsharded one."""

    SAFETENSORS = "safetensors.torch"

    def __init__(self, *args, dtype=torch.float32, device=None, tp_size=None, process_group=None,
                 **kwargs):
        """``MixerLayout``'s arguments (vLLM's), then the parameters' ``dtype``
        and ``device``, and the tensor-parallel ranks: ``process_group`` (a
        ``torch.distributed`` group; None: the default group when ``tp_size``
        > 1) and ``tp_size`` (None or 1: unsharded; else the group's size)."""
        nn.Module.__init__(self)
        tp_size, self.tp_rank, self.process_group = tp.resolve(tp_size, process_group)
        MixerLayout.__init__(self, *args, tp_size=tp_size, **kwargs)
        self.validate_indices = None
        I, conv_dim, H = self.projection_sizes
        factory = dict(dtype=dtype, device=device)
        param = lambda *shape, **kw: nn.Parameter(torch.empty(*shape, **{**factory, **kw}))  # noqa: E731
        self.in_proj_weight = param(I + conv_dim + H, self.hidden_size)
        self.in_proj_bias = param(I + conv_dim + H) if self.use_bias else None
        self.conv_weight = param(conv_dim, self.conv_kernel_size)
        self.conv_bias = param(conv_dim) if self.use_conv_bias else None
        self.A_log = param(H, dtype=torch.float32)
        self.D = param(H)
        self.dt_bias = param(H)
        self.norm_weight = param(I) if self.use_rms_norm else None
        self.out_proj_weight = param(self.hidden_size, I)
        self.out_proj_bias = param(self.hidden_size) if self.use_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Mamba-2's usual initialisation (checkpoints overwrite it)."""
        with torch.no_grad():
            for weight, bias in ((self.in_proj_weight, self.in_proj_bias),
                                 (self.out_proj_weight, self.out_proj_bias),
                                 (self.conv_weight, self.conv_bias)):
                bound = 1.0 / math.sqrt(weight.shape[1])
                weight.uniform_(-bound, bound)
                if bias is not None:
                    bias.uniform_(-bound, bound)
            self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(1.0, 16.0)))
            self.D.fill_(1.0)
            dt = torch.exp(torch.empty_like(self.A_log).uniform_(math.log(1e-3), math.log(0.1)))
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
            if self.norm_weight is not None:
                self.norm_weight.fill_(1.0)

    @property
    def A(self) -> torch.Tensor:
        """``-exp(A_log)`` (float32), differentiable in ``A_log``."""
        return -torch.exp(self.A_log)

    # --- weights ---------------------------------------------------------------

    def _load(self, params: dict) -> None:
        """``load_weights``' framework half: values by parameter attribute."""
        from bridge.dlpack import to_torch

        def tensor(value):
            if isinstance(value, torch.Tensor):
                return value
            if isinstance(value, np.ndarray):
                return torch.from_numpy(value)
            return to_torch(value, copy_ok=True, name="weight")

        with torch.no_grad():
            for attr, value in params.items():
                target = getattr(self, attr)
                target.copy_(tensor(value).reshape(target.shape))

    def _shard_checkpoint(self, whole: dict) -> dict:
        return shard_mixer_weights(whole, self.dims, self.tp_rank)

    def checkpoint_weights(self) -> dict:
        """The weights under checkpoint names (``conv1d.weight`` 3-D as saved,
        ``A_log``); views of the parameters where the layout allows. Sharded:
        the whole checkpoint, gathered from every rank (a collective: call it
        on all of them)."""
        weights = {}
        for key, value in self._params_by_key().items():
            if value is None:
                continue
            value, rows = value.detach(), self.dims.gather_rows(key)
            if self.process_group is not None and rows is not None:
                axis = self.param_shard_axis(PARAM_ATTRS[key])
                value = tp.gather_from_ranks(value, self.process_group, axis).index_select(
                    axis, torch.from_numpy(rows).to(value.device))
            weights[key] = value
        weights["conv1d.weight"] = weights["conv1d.weight"].unsqueeze(1)
        return weights

    # --- forward ---------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, cache=None, metadata: Mamba2Metadata = None,
                layer: int = 0, *, seq_idx=None, cu_seqlens=None) -> torch.Tensor:
        """Training (no ``cache``, no ``metadata``): ``hidden_states (batch,
        seqlen, hidden)`` -> ``(batch, seqlen, hidden)``, differentiable in the
        input and every parameter; each row is one sequence from zero state,
        or ``seq_idx (batch, seqlen)`` splits a row where it changes, or
        ``cu_seqlens (num_seqs + 1,)`` packs sequences into one row (batch
        1). Their values are read on the host (a device sync for device
        tensors); without them nothing syncs.

        Serving: ``hidden_states (T, hidden)`` -> ``(T, hidden)``; the states of
        ``cache`` (``bridge.MambaStateCache``, layer ``layer``) are read and
        updated in place at the metadata's slots. ``metadata``: from
        ``metadata_to_device`` (numpy arrays are copied to the device each
        call, which a CUDA graph cannot capture). Everything is checked
        before the first write (see the class docstring). ``cache`` and
        ``metadata`` come together (one without the other is refused)."""
        if self._is_training_call(dict(cache=cache, metadata=metadata),
                                  dict(seq_idx=seq_idx, cu_seqlens=cu_seqlens)):
            return self._train_forward(tp.copy_to_ranks(hidden_states, self.process_group), seq_idx,
                                       cu_seqlens)
        hidden_states = tp.copy_to_ranks(hidden_states, self.process_group)
        device = hidden_states.device
        conv_state, ssm_state = cache.torch("conv", layer), cache.torch("ssm", layer)
        if platform.is_capturing(device) and any(
                not isinstance(a, torch.Tensor) or a.device != device for a in metadata.arrays().values()):
            raise ValueError(f"MambaMixer2: `metadata` must hold tensors on {device} to be captured "
                             "(torch_impl.metadata_to_device, once per batch)")
        meta = metadata_to_device(metadata, device)
        self._check_batch(meta, hidden_states.shape[0], ssm_state.shape[0],
                          platform.host_index_values(self.validate_indices, device, **meta.arrays()))
        if not is_conv_state_dim_first():
            conv_state = conv_state.transpose(1, 2)  # (S, conv_dim, L) as the conv kernels take it
        P, N = self.head_dim, self.ssm_state_size
        (I, conv_dim, H), G = self.projection_sizes, self.local_groups
        gate, xBC, dt = torch.split(F.linear(hidden_states, self.in_proj_weight, self.in_proj_bias),
                                    self.projection_sizes, dim=-1)
        nd, npf = meta.num_decode_tokens, meta.num_prefill_tokens
        # Rows of padding tokens and padding requests stay 0. The chunked scan
        # writes every prefill row, so only the others are zeroed (a 4k
        # prefill's full fill cost 13 us per layer).
        ssm_out = torch.empty(hidden_states.shape[0], I, dtype=hidden_states.dtype, device=device)
        ssm_out[:nd].zero_()  # the state update leaves padding requests' rows untouched
        ssm_out[nd + npf:].zero_()
        A = self.A
        kernel_args = dict(activation=self.activation, validate_indices=self.validate_indices)

        # Prefix caching ("all" mode): the state is read from the block of the
        # last computed token and written to the block of the last scheduled one
        # (speculative decodes: see Mamba2Metadata).
        cache_all = meta.is_mamba_cache_all
        if cache_all:
            counts = [meta.num_decodes, meta.num_prefills]
            read_col_d, read_col_p = torch.split(meta.block_idx_last_computed_token, counts)
            write_col_d, write_col_p = torch.split(meta.block_idx_last_scheduled_token, counts)

        if meta.num_decodes:
            table_d = meta.state_indices_tensor_d
            conv_cols, ssm_slots = {}, dict(state_batch_indices=table_d)
            if cache_all:
                conv_cols, read_col_ssm, write_col_ssm = self._decode_block_columns(
                    meta, read_col_d, write_col_d, lambda n: torch.arange(n, device=device))
                ssm_slots = dict(state_batch_indices=_pick(table_d, read_col_ssm),
                                 dst_state_batch_indices=_pick(table_d, write_col_ssm))
            conv_d = causal_conv1d_update(
                x=xBC[:nd], conv_state=conv_state, weight=self.conv_weight, bias=self.conv_bias,
                conv_state_indices=table_d, num_accepted_tokens=meta.num_accepted_tokens,
                query_start_loc=meta.query_start_loc_d, max_query_len=meta.max_decode_query_len,
                **conv_cols, **kernel_args)
            x_d, B_d, C_d = torch.split(conv_d, self.xbc_sizes, dim=-1)
            selective_state_update(
                state=ssm_state, x=x_d.view(nd, H, P), dt=dt[:nd], A=A, B=B_d.view(nd, G, N),
                C=C_d.view(nd, G, N), D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
                out=ssm_out[:nd].view(nd, H, P), num_accepted_tokens=meta.num_accepted_tokens,
                cu_seqlens=meta.query_start_loc_d, validate_indices=self.validate_indices, **ssm_slots)

        if meta.num_prefills:
            table_p = meta.state_indices_tensor_p
            conv_p = torch.empty(npf, conv_dim, dtype=xBC.dtype, device=device)
            prefix = self._prefix_caching_conv_args(meta, read_col_p, write_col_p) if cache_all else {}
            causal_conv1d_fn(x=xBC[nd:nd + npf].T, weight=self.conv_weight, bias=self.conv_bias,
                             conv_states=conv_state, query_start_loc=meta.query_start_loc_p,
                             cache_indices=table_p, has_initial_state=meta.has_initial_states_p,
                             out=conv_p.T, **prefix, **kernel_args)
            x_p, B_p, C_p = torch.split(conv_p, self.xbc_sizes, dim=-1)
            initial_states = None
            if meta.prep_initial_states:
                initial_states = _gather_states(ssm_state, _pick(table_p, read_col_p) if cache_all
                                                else table_p, meta.has_initial_states_p)
            states = mamba_chunk_scan_combined_varlen(
                x=x_p.view(npf, H, P), dt=dt[nd:nd + npf], A=A, B=B_p.view(npf, G, N),
                C=C_p.view(npf, G, N), chunk_size=self.chunk_size, cu_seqlens=meta.query_start_loc_p,
                cu_chunk_seqlens=meta.cu_chunk_seqlen_p, last_chunk_indices=meta.last_chunk_indices_p,
                seq_idx=meta.seq_idx_p, out=ssm_out[nd:nd + npf].view(npf, H, P), D=self.D,
                dt_bias=self.dt_bias, initial_states=initial_states, dt_softplus=True,
                return_intermediate_states=cache_all, state_dtype=ssm_state.dtype,
                validate_metadata=self.validate_indices)
            if cache_all:
                # The states at the block boundaries crossed, then the last state.
                _scatter_states(ssm_state, meta.block_state_slots_p, states, meta.block_state_chunks_p)
                _scatter_states(ssm_state, _pick(table_p, write_col_p), states, meta.last_chunk_indices_p)
            else:
                _scatter_states(ssm_state, table_p, states)

        return self._gated_out(ssm_out, gate)

    def _gated_out(self, ssm_out, gate):
        """The gated norm and the (row-parallel) ``out_proj``, reduced over the ranks."""
        group = self.process_group
        if self.use_rms_norm and self.dims.norm_is_local:
            gated = rms_norm_gated(x=ssm_out, weight=self.norm_weight, z=gate, eps=self.rms_norm_eps,
                                   group_size=self.dims.norm_group_size)
        elif self.use_rms_norm:  # one group over every rank's channels: its sum of squares reduced
            v = ssm_out.float() * F.silu(gate.float())
            mean_square = tp.sum_over_ranks(v.square().sum(-1, keepdim=True), group) / self.intermediate_size
            gated = (v * torch.rsqrt(mean_square + self.rms_norm_eps) * self.norm_weight.float()).to(ssm_out.dtype)
        else:
            gated = ssm_out * F.silu(gate)
        bias = self.out_proj_bias if self.tp_rank == 0 else None  # added once to the partial sums
        return tp.reduce_from_ranks(F.linear(gated, self.out_proj_weight, bias), group)

    def _train_forward(self, hidden_states, seq_idx, cu_seqlens) -> torch.Tensor:
        """The cache-free forward (``forward``'s training form): the packed
        prefill path on functional, differentiable ops."""
        host = lambda v: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v  # noqa: E731
        layout = self._training_layout(tuple(hidden_states.shape), host(seq_idx), host(cu_seqlens))
        if layout is None:  # no tokens
            return hidden_states.new_zeros(hidden_states.shape)
        cu, chunks = layout
        device = hidden_states.device
        index = lambda a: torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
        batch, seqlen, _ = hidden_states.shape
        T, P, N = batch * seqlen, self.head_dim, self.ssm_state_size
        (I, _, H), G = self.projection_sizes, self.local_groups
        gate, xBC, dt = torch.split(
            F.linear(hidden_states.reshape(T, self.hidden_size), self.in_proj_weight, self.in_proj_bias),
            self.projection_sizes, dim=-1)
        qsl = index(cu)
        conv, _ = causal_conv1d_fn(x=xBC.T, weight=self.conv_weight, bias=self.conv_bias,
                                   query_start_loc=qsl, activation=self.activation, return_states=True)
        x, B, C = torch.split(conv.T, self.xbc_sizes, dim=-1)
        y, _ = mamba_chunk_scan_combined_varlen(
            x=x.reshape(T, H, P), dt=dt, A=self.A, B=B.reshape(T, G, N), C=C.reshape(T, G, N),
            chunk_size=self.chunk_size, cu_seqlens=qsl, cu_chunk_seqlens=index(chunks.cu_chunk_seqlens),
            last_chunk_indices=index(chunks.last_chunk_indices), seq_idx=index(chunks.seq_idx), out=None,
            D=self.D, dt_bias=self.dt_bias, dt_softplus=True, validate_metadata=False)
        out = self._gated_out(y.reshape(T, I).to(hidden_states.dtype), gate)
        return out.reshape(batch, seqlen, self.hidden_size)


class CapturedDecodeStep:
    """A decode step of ``mixer`` on layer ``layer`` of ``cache`` for a fixed
    batch of ``batch_size`` requests (``1 + mixer.num_spec`` tokens each),
    captured once in a CUDA graph (on the CPU: run eagerly on the same static
    buffers). vLLM captures one per batch-size bucket: fill a smaller batch
    with padding requests (null block). Prefix caching is not captured.

    ``run(hidden_states, metadata)`` copies the inputs into the static
    buffers and replays; ``replay()`` replays on the inputs copied last."""

    def __init__(self, mixer: MambaMixer2, cache, batch_size: int, layer: int = 0):
        self.mixer, self.cache, self.layer = mixer, cache, layer
        self.device = mixer.in_proj_weight.device
        width = 1 + mixer.num_spec
        slots = np.full((batch_size, width) if mixer.num_spec else (batch_size,), NULL_BLOCK_ID)
        spec = dict(num_accepted_tokens=np.ones(batch_size, np.int32)) if mixer.num_spec else {}
        # Padding requests only: the warm-up runs write no cache slot.
        self.metadata = metadata_to_device(build_mamba2_metadata(
            [width] * batch_size, [1] * batch_size, slots, batch_size, mixer.chunk_size,
            padding=[True] * batch_size, **spec), self.device)
        self.hidden_states = torch.zeros(batch_size * width, mixer.hidden_size,
                                         dtype=mixer.in_proj_weight.dtype, device=self.device)
        self.graph = None
        if self.device.type != "cuda":
            self.out = self._step()
            return
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # compiles the kernels, outside the capture
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with platform.cuda_graph(self.graph):
            self.out = self._step()

    def _step(self) -> torch.Tensor:
        with torch.no_grad():
            return self.mixer(self.hidden_states, self.cache, self.metadata, self.layer)

    def replay(self) -> torch.Tensor:
        """The step on the static inputs; returns the static ``out`` (overwritten by the next step)."""
        if self.graph is None:
            self.out = self._step()
            return self.out
        self.cache.torch("ssm", self.layer)  # orders torch after JAX steps on the cache
        self.cache.torch("conv", self.layer)
        self.graph.replay()
        return self.out

    def run(self, hidden_states: torch.Tensor, metadata: Mamba2Metadata) -> torch.Tensor:
        """``hidden_states (batch_size * (1 + num_spec), hidden)`` and a decode
        ``metadata`` of this batch size (numpy or tensors) copied in, then
        ``replay()``. The metadata is checked as ``mixer.forward`` checks it."""
        op = "CapturedDecodeStep.run"
        static = self.metadata
        if (metadata.num_decodes, metadata.num_prefills, sorted(metadata.arrays())) != (
                static.num_decodes, 0, sorted(static.arrays())):
            fail(op, "metadata", f"must be a decode batch of {static.num_decodes} requests of "
                                 f"{static.max_decode_query_len} tokens without prefix caching, got "
                                 f"{metadata.num_decodes} decodes and {metadata.num_prefills} prefills "
                                 f"with arrays {sorted(metadata.arrays())}")
        expect_shape(op, "hidden_states", shape_of(hidden_states), tuple(self.hidden_states.shape))
        arrays = {name: torch.as_tensor(array) for name, array in metadata.arrays().items()}
        host = platform.host_index_values(self.mixer.validate_indices, self.device, **arrays)
        self.mixer._check_batch(metadata, hidden_states.shape[0], self.cache.num_blocks, host)
        self.hidden_states.copy_(hidden_states)
        for name, buffer in static.arrays().items():
            buffer.copy_(arrays[name])
        return self.replay()
