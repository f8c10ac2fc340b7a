"""The Mamba-2 mixer layer (vLLM's ``MambaMixer2``) as a PyTorch module on
this package's kernels:

    in_proj -> (gate, xBC, dt) -> causal conv1d -> SSM -> gated RMSNorm -> out_proj

Decode requests come first in a batch (``causal_conv1d_update`` +
``selective_state_update``), prefills after them (``causal_conv1d_fn`` +
``mamba_chunk_scan_combined_varlen``). The conv and SSM states live in a
``bridge.MambaStateCache`` that a ``jax_impl.MambaMixer2`` with the same
weights can continue. Tensor-parallel size 1 (the sharding rules:
``bridge.spec.mixer_sharding``). Mirror: ``jax_impl/mamba_mixer2.py``.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bridge.spec.mixer_metadata import Mamba2Metadata, check_checkpoint, checkpoint_shapes
from bridge.spec.mixer_sharding import MixerDims
from bridge.spec.ssu_contract import NULL_BLOCK_ID
from bridge.spec.state_shapes import MambaStateShapeCalculator, is_conv_state_dim_first
from torch_impl.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from torch_impl.gated_rms_norm import rms_norm_gated
from torch_impl.selective_state_update import selective_state_update
from torch_impl.ssd_combined import mamba_chunk_scan_combined_varlen


def _scatter_states(ssm_state, slots, states):
    """ssm_state[slots] = states, in place, skipping padding (null-block) slots."""
    keep = slots != NULL_BLOCK_ID
    ssm_state[slots[keep].long()] = states[keep]


class MambaMixer2(nn.Module):
    """vLLM's constructor arguments less its config objects; ``chunk_size``
    (the model's mamba chunk size) and ``num_spec`` (speculative tokens)
    come from those in vLLM. Parameters: ``in_proj_weight (I + conv_dim + H,
    hidden)``, ``in_proj_bias``, ``conv_weight (conv_dim, W)``, ``conv_bias``,
    ``A (H,)`` (= -exp(A_log), float32), ``D``, ``dt_bias (H,)``,
    ``norm_weight (I,)``, ``out_proj_weight (hidden, I)``, ``out_proj_bias``."""

    def __init__(self, hidden_size: int, ssm_state_size: int, conv_kernel_size: int,
                 intermediate_size: int, use_conv_bias: bool, use_bias: bool, n_groups: int = 1,
                 num_heads: int = 128, head_dim: int = 64, rms_norm_eps: float = 1e-5,
                 activation: str = "silu", use_rms_norm: bool = True, chunk_size: int = 256,
                 num_spec: int = 0, *, dtype=torch.float32, device=None):
        super().__init__()
        self.dims = MixerDims(intermediate_size, n_groups, num_heads, head_dim, ssm_state_size)
        if activation not in ("silu", "swish"):
            raise ValueError(f"MambaMixer2: `activation` must be 'silu' or 'swish', got {activation!r}")
        self.hidden_size, self.ssm_state_size, self.conv_kernel_size = (
            hidden_size, ssm_state_size, conv_kernel_size)
        self.intermediate_size, self.n_groups, self.num_heads, self.head_dim = (
            intermediate_size, n_groups, num_heads, head_dim)
        self.use_bias, self.use_conv_bias, self.use_rms_norm = use_bias, use_conv_bias, use_rms_norm
        self.rms_norm_eps, self.activation, self.chunk_size, self.num_spec = (
            rms_norm_eps, activation, chunk_size, num_spec)
        self.validate_indices = True  # host checks of index values in every kernel call
        conv_dim, I, H = self.dims.conv_dim, intermediate_size, num_heads
        factory = dict(dtype=dtype, device=device)
        param = lambda *shape, **kw: nn.Parameter(torch.empty(*shape, **{**factory, **kw}))  # noqa: E731
        self.in_proj_weight = param(I + conv_dim + H, hidden_size)
        self.in_proj_bias = param(I + conv_dim + H) if use_bias else None
        self.conv_weight = param(conv_dim, conv_kernel_size)
        self.conv_bias = param(conv_dim) if use_conv_bias else None
        self.A = param(H, dtype=torch.float32)
        self.D = param(H)
        self.dt_bias = param(H)
        self.norm_weight = param(I) if use_rms_norm else None
        self.out_proj_weight = param(hidden_size, I)
        self.out_proj_bias = param(hidden_size) if use_bias else None
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
            self.A.copy_(-torch.empty_like(self.A).uniform_(1.0, 16.0))
            self.D.fill_(1.0)
            dt = torch.exp(torch.empty_like(self.A).uniform_(math.log(1e-3), math.log(0.1)))
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
            if self.norm_weight is not None:
                self.norm_weight.fill_(1.0)

    def get_state_shape(self):
        """Per-block (conv, ssm) state shapes for a ``bridge.MambaStateCache``."""
        return MambaStateShapeCalculator.mamba2_state_shape(
            tp_world_size=1, intermediate_size=self.intermediate_size, n_groups=self.n_groups,
            num_heads=self.num_heads, head_dim=self.head_dim, state_size=self.ssm_state_size,
            conv_kernel=self.conv_kernel_size, num_spec=self.num_spec)

    # --- weights ---------------------------------------------------------------

    def _checkpoint_shapes(self):
        return checkpoint_shapes(self.dims, self.hidden_size, self.conv_kernel_size,
                                 use_bias=self.use_bias, use_conv_bias=self.use_conv_bias,
                                 use_rms_norm=self.use_rms_norm)

    def _params_by_key(self) -> dict:
        return {"in_proj.weight": self.in_proj_weight, "in_proj.bias": self.in_proj_bias,
                "conv1d.weight": self.conv_weight, "conv1d.bias": self.conv_bias,
                "dt_bias": self.dt_bias, "D": self.D, "norm.weight": self.norm_weight,
                "out_proj.weight": self.out_proj_weight, "out_proj.bias": self.out_proj_bias}

    def load_weights(self, weights: Mapping, prefix: str = "") -> None:
        """Copy a checkpoint in: Hugging Face / mamba_ssm key names (after
        ``prefix``) mapping to torch tensors, numpy arrays or jax arrays
        (shared through DLPack without a copy where possible). ``A_log``
        becomes ``A = -exp(A_log)``."""
        from bridge.dlpack import to_torch

        check_checkpoint({k: tuple(v.shape) for k, v in weights.items()}, self._checkpoint_shapes(), prefix)

        def tensor(value):
            if isinstance(value, torch.Tensor):
                return value
            if isinstance(value, np.ndarray):
                return torch.from_numpy(value)
            return to_torch(value, copy_ok=True, name="weight")

        with torch.no_grad():
            for key, target in self._params_by_key().items():
                if target is not None:
                    target.copy_(tensor(weights[prefix + key]).reshape(target.shape))
            self.A.copy_(-torch.exp(tensor(weights[prefix + "A_log"]).float()))

    def load_safetensors(self, path: str, prefix: str = "") -> None:
        """``load_weights`` from a safetensors file."""
        from safetensors.torch import load_file

        self.load_weights(load_file(path), prefix)

    def checkpoint_weights(self) -> dict:
        """The weights under checkpoint names (``conv1d.weight`` 3-D as saved,
        ``A_log``); views of the parameters where the layout allows."""
        weights = {k: v.detach() for k, v in self._params_by_key().items() if v is not None}
        weights["conv1d.weight"] = weights["conv1d.weight"].unsqueeze(1)
        weights["A_log"] = torch.log(-self.A.detach())
        return weights

    # --- forward ---------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, cache, metadata: Mamba2Metadata,
                layer: int = 0) -> torch.Tensor:
        """``hidden_states (T, hidden)`` -> ``(T, hidden)``; the states of
        ``cache`` (``bridge.MambaStateCache``, layer ``layer``) are read and
        updated in place at the metadata's slots."""
        meta = metadata.map_arrays(lambda a: torch.as_tensor(a, device=hidden_states.device))
        dims, P, N = self.dims, self.head_dim, self.ssm_state_size
        I, H, G = self.intermediate_size, self.num_heads, dims.padded_groups
        projected = F.linear(hidden_states, self.in_proj_weight, self.in_proj_bias)
        gate, xBC, dt = torch.split(projected, [I, dims.conv_dim, H], dim=-1)
        conv_state = cache.torch("conv", layer)
        if not is_conv_state_dim_first():
            conv_state = conv_state.transpose(1, 2)  # (S, conv_dim, L) as the conv kernels take it
        ssm_state = cache.torch("ssm", layer)
        # Rows of padding tokens and padding requests stay 0.
        ssm_out = torch.zeros(hidden_states.shape[0], I, dtype=hidden_states.dtype,
                              device=hidden_states.device)
        nd, npf = meta.num_decode_tokens, meta.num_prefill_tokens
        activation = self.activation
        check = dict(validate_indices=self.validate_indices)
        split_xbc = lambda v: torch.split(v, [I, G * N, G * N], dim=-1)  # noqa: E731

        # Prefix caching ("all" mode): the state is read from the block of the
        # last computed token and written to the block of the last scheduled one.
        cache_all = meta.is_mamba_cache_all
        if cache_all:
            counts = [meta.num_decodes, meta.num_prefills]
            read_col_d, read_col_p = torch.split(meta.block_idx_last_computed_token, counts)
            write_col_d, write_col_p = torch.split(meta.block_idx_last_scheduled_token, counts)
            pick = lambda table, cols: table.gather(1, cols[:, None].long()).squeeze(1)  # noqa: E731

        if meta.num_decodes:
            conv_d = causal_conv1d_update(
                xBC[:nd], conv_state, self.conv_weight, self.conv_bias, activation,
                conv_state_indices=meta.state_indices_tensor_d,
                num_accepted_tokens=meta.num_accepted_tokens, query_start_loc=meta.query_start_loc_d,
                max_query_len=meta.max_decode_query_len,
                block_idx_last_scheduled_token=write_col_d if cache_all else None,
                initial_state_idx=read_col_d if cache_all else None, **check)
            x_d, B_d, C_d = split_xbc(conv_d)
            table_d = meta.state_indices_tensor_d
            selective_state_update(
                ssm_state, x_d.view(nd, H, P), dt[:nd], self.A, B_d.view(nd, G, N),
                C_d.view(nd, G, N), self.D, self.dt_bias, dt_softplus=True,
                state_batch_indices=pick(table_d, read_col_d) if cache_all else table_d,
                dst_state_batch_indices=pick(table_d, write_col_d) if cache_all else None,
                out=ssm_out[:nd].view(nd, H, P), num_accepted_tokens=meta.num_accepted_tokens,
                cu_seqlens=meta.query_start_loc_d, **check)

        if meta.num_prefills:
            table_p = meta.state_indices_tensor_p
            conv_p = torch.empty(npf, dims.conv_dim, dtype=xBC.dtype, device=xBC.device)
            prefix = {}
            if cache_all:
                prefix = dict(block_idx_first_scheduled_token=meta.block_idx_first_scheduled_token_p,
                              block_idx_last_scheduled_token=write_col_p, initial_state_idx=read_col_p,
                              num_computed_tokens=meta.num_computed_tokens_p,
                              block_size_to_align=meta.mamba_block_size)
            causal_conv1d_fn(xBC[nd:nd + npf].T, self.conv_weight, self.conv_bias, conv_state,
                             meta.query_start_loc_p, table_p, meta.has_initial_states_p,
                             activation, **prefix, out=conv_p.T, **check)
            x_p, B_p, C_p = split_xbc(conv_p)
            initial_states = None
            if meta.prep_initial_states:
                read_slots = pick(table_p, read_col_p) if cache_all else table_p
                initial_states = torch.where(meta.has_initial_states_p[:, None, None, None],
                                             ssm_state[read_slots.long()], 0)
            states = mamba_chunk_scan_combined_varlen(
                x_p.view(npf, H, P), dt[nd:nd + npf], self.A, B_p.view(npf, G, N),
                C_p.view(npf, G, N), self.chunk_size, meta.query_start_loc_p,
                meta.cu_chunk_seqlen_p, meta.last_chunk_indices_p, meta.seq_idx_p,
                ssm_out[nd:nd + npf].view(npf, H, P), D=self.D, dt_bias=self.dt_bias,
                initial_states=initial_states, dt_softplus=True,
                return_intermediate_states=cache_all, state_dtype=ssm_state.dtype,
                validate_metadata=self.validate_indices)
            write_slots, final_states = table_p, states
            if cache_all:
                # The states at the block boundaries crossed, then the last state.
                _scatter_states(ssm_state, meta.block_state_slots_p, states[meta.block_state_chunks_p.long()])
                write_slots = pick(table_p, write_col_p)
                final_states = states[meta.last_chunk_indices_p.long()]
            _scatter_states(ssm_state, write_slots, final_states)

        if self.use_rms_norm:
            gated = rms_norm_gated(ssm_out, self.norm_weight, z=gate, eps=self.rms_norm_eps,
                                   group_size=dims.norm_group_size)
        else:
            gated = ssm_out * F.silu(gate)
        return F.linear(gated, self.out_proj_weight, self.out_proj_bias)
