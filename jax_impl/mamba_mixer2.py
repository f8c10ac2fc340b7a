"""The Mamba-2 mixer layer (vLLM's ``MambaMixer2``) as a Flax NNX module on
this package's kernels:

    in_proj -> (gate, xBC, dt) -> causal conv1d -> SSM -> gated RMSNorm -> out_proj

Decode requests come first in a batch (``causal_conv1d_update`` +
``selective_state_update``), prefills after them (``causal_conv1d_fn`` +
``mamba_chunk_scan_combined_varlen``). JAX is functional: ``__call__``
returns the new conv and SSM states; ``forward_on_cache`` runs it on a
``bridge.MambaStateCache`` (jitted, the states donated: in place where XLA
aliases the cache's memory), so a ``torch_impl.MambaMixer2`` with the same
weights can continue the sequences. Tensor-parallel size 1 (the sharding
rules: ``bridge.spec.mixer_sharding``). Mirror: ``torch_impl/mamba_mixer2.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bridge.spec.mixer_metadata import Mamba2Metadata, check_checkpoint, checkpoint_shapes
from bridge.spec.mixer_sharding import MixerDims
from bridge.spec.ssu_contract import NULL_BLOCK_ID
from bridge.spec.state_shapes import MambaStateShapeCalculator, is_conv_state_dim_first
from jax_impl.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from jax_impl.gated_rms_norm import rms_norm_gated
from jax_impl.selective_state_update import selective_state_update
from jax_impl.ssd_combined import mamba_chunk_scan_combined_varlen


def _linear(x, weight, bias):
    """x @ weight.T + bias; float32 exactly (XLA's GPU default would use TF32,
    torch's does not)."""
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    y = jnp.matmul(x, weight[...].T, precision=precision)
    return y + bias[...] if bias is not None else y


def _scatter_states(ssm_state, slots, states):
    """ssm_state with ``[slots] = states``, skipping padding (null-block) slots
    (sent out of range, where the scatter drops them)."""
    rows = jnp.where(slots != NULL_BLOCK_ID, slots, ssm_state.shape[0])
    return ssm_state.at[rows].set(states, mode="drop")


class MambaMixer2(nnx.Module):
    """vLLM's constructor arguments less its config objects; ``chunk_size``
    (the model's mamba chunk size) and ``num_spec`` (speculative tokens)
    come from those in vLLM. Parameters (torch layout, as in the mirror):
    ``in_proj_weight (I + conv_dim + H, hidden)``, ``in_proj_bias``,
    ``conv_weight (conv_dim, W)``, ``conv_bias``, ``A (H,)`` (= -exp(A_log),
    float32), ``D``, ``dt_bias (H,)``, ``norm_weight (I,)``,
    ``out_proj_weight (hidden, I)``, ``out_proj_bias``."""

    def __init__(self, hidden_size: int, ssm_state_size: int, conv_kernel_size: int,
                 intermediate_size: int, use_conv_bias: bool, use_bias: bool, n_groups: int = 1,
                 num_heads: int = 128, head_dim: int = 64, rms_norm_eps: float = 1e-5,
                 activation: str = "silu", use_rms_norm: bool = True, chunk_size: int = 256,
                 num_spec: int = 0, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
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
        conv_dim, I, H = self.dims.conv_dim, intermediate_size, num_heads
        rngs = rngs or nnx.Rngs(0)

        def uniform(shape, bound, low=None):
            low = -bound if low is None else low
            return jax.random.uniform(rngs.params(), shape, jnp.float32, low, bound)

        def linear(shape, bias):
            bound = 1.0 / math.sqrt(shape[1])
            return (nnx.Param(uniform(shape, bound).astype(dtype)),
                    nnx.Param(uniform(shape[:1], bound).astype(dtype)) if bias else None)

        self.in_proj_weight, self.in_proj_bias = linear((I + conv_dim + H, hidden_size), use_bias)
        self.conv_weight, self.conv_bias = linear((conv_dim, conv_kernel_size), use_conv_bias)
        self.out_proj_weight, self.out_proj_bias = linear((hidden_size, I), use_bias)
        self.A = nnx.Param(-uniform((H,), 16.0, 1.0))
        self.D = nnx.Param(jnp.ones((H,), dtype))
        dt = jnp.exp(uniform((H,), math.log(0.1), math.log(1e-3)))
        self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(dtype))  # softplus^-1(dt)
        self.norm_weight = nnx.Param(jnp.ones((I,), dtype)) if use_rms_norm else None

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
        """Set a checkpoint: Hugging Face / mamba_ssm key names (after
        ``prefix``) mapping to jax arrays, numpy arrays or torch tensors
        (shared through DLPack without a copy where possible). ``A_log``
        becomes ``A = -exp(A_log)``."""
        from bridge.dlpack import to_jax

        check_checkpoint({k: tuple(v.shape) for k, v in weights.items()}, self._checkpoint_shapes(), prefix)

        def array(value):
            if isinstance(value, (jax.Array, np.ndarray)):
                return jnp.asarray(value)
            return to_jax(value, copy_ok=True, name="weight")

        for key, target in self._params_by_key().items():
            if target is not None:
                target.set_value(array(weights[prefix + key]).reshape(target.shape).astype(target.dtype))
        self.A.set_value(-jnp.exp(array(weights[prefix + "A_log"]).astype(jnp.float32)))

    def load_safetensors(self, path: str, prefix: str = "") -> None:
        """``load_weights`` from a safetensors file."""
        from safetensors.numpy import load_file

        self.load_weights(load_file(path), prefix)

    def checkpoint_weights(self) -> dict:
        """The weights under checkpoint names (``conv1d.weight`` 3-D as saved, ``A_log``)."""
        weights = {k: v[...] for k, v in self._params_by_key().items() if v is not None}
        weights["conv1d.weight"] = weights["conv1d.weight"][:, None, :]
        weights["A_log"] = jnp.log(-self.A[...])
        return weights

    # --- forward ---------------------------------------------------------------

    def __call__(self, hidden_states, conv_state, ssm_state, metadata: Mamba2Metadata):
        """``hidden_states (T, hidden)``, one layer's cache states ``conv_state
        (S, L, conv_dim)`` (SD; DS: ``(S, conv_dim, L)``) and ``ssm_state (S,
        H, P, N)`` -> ``(out (T, hidden), new_conv_state, new_ssm_state)``.
        The metadata's arrays must be concrete (closed over under jit)."""
        meta = metadata.map_arrays(jnp.asarray)
        dims, P, N = self.dims, self.head_dim, self.ssm_state_size
        I, H, G = self.intermediate_size, self.num_heads, dims.padded_groups
        projected = _linear(hidden_states, self.in_proj_weight, self.in_proj_bias)
        gate, xBC, dt = jnp.split(projected, [I, I + dims.conv_dim], axis=-1)
        dim_first = is_conv_state_dim_first()
        conv = conv_state if dim_first else conv_state.swapaxes(1, 2)  # (S, conv_dim, L)
        nd, npf = meta.num_decode_tokens, meta.num_prefill_tokens
        weight, bias = self.conv_weight[...], (self.conv_bias[...] if self.conv_bias is not None else None)
        A, D, dt_bias = self.A[...], self.D[...], self.dt_bias[...]
        split_xbc = lambda v: jnp.split(v, [I, I + G * N], axis=-1)  # noqa: E731
        parts = []

        # Prefix caching ("all" mode): the state is read from the block of the
        # last computed token and written to the block of the last scheduled one.
        cache_all = meta.is_mamba_cache_all
        if cache_all:
            read_col_d, read_col_p = jnp.split(meta.block_idx_last_computed_token, [meta.num_decodes])
            write_col_d, write_col_p = jnp.split(meta.block_idx_last_scheduled_token, [meta.num_decodes])
            pick = lambda table, cols: jnp.take_along_axis(table, cols[:, None], axis=1)[:, 0]  # noqa: E731

        if meta.num_decodes:
            conv_d, conv = causal_conv1d_update(
                xBC[:nd], conv, weight, bias, self.activation,
                conv_state_indices=meta.state_indices_tensor_d,
                num_accepted_tokens=meta.num_accepted_tokens, query_start_loc=meta.query_start_loc_d,
                max_query_len=meta.max_decode_query_len,
                block_idx_last_scheduled_token=write_col_d if cache_all else None,
                initial_state_idx=read_col_d if cache_all else None)
            x_d, B_d, C_d = split_xbc(conv_d)
            table_d = meta.state_indices_tensor_d
            y_d, ssm_state = selective_state_update(
                ssm_state, x_d.reshape(nd, H, P), dt[:nd], A, B_d.reshape(nd, G, N),
                C_d.reshape(nd, G, N), D, dt_bias, dt_softplus=True,
                state_batch_indices=pick(table_d, read_col_d) if cache_all else table_d,
                dst_state_batch_indices=pick(table_d, write_col_d) if cache_all else None,
                num_accepted_tokens=meta.num_accepted_tokens, cu_seqlens=meta.query_start_loc_d)
            parts.append(y_d.reshape(nd, I))

        if meta.num_prefills:
            table_p = meta.state_indices_tensor_p
            prefix = {}
            if cache_all:
                prefix = dict(block_idx_first_scheduled_token=meta.block_idx_first_scheduled_token_p,
                              block_idx_last_scheduled_token=write_col_p, initial_state_idx=read_col_p,
                              num_computed_tokens=meta.num_computed_tokens_p,
                              block_size_to_align=meta.mamba_block_size)
            conv_p, conv = causal_conv1d_fn(xBC[nd:nd + npf].T, weight, bias, conv,
                                            meta.query_start_loc_p, table_p, meta.has_initial_states_p,
                                            self.activation, **prefix)
            x_p, B_p, C_p = split_xbc(conv_p.T)
            initial_states = None
            if meta.prep_initial_states:
                read_slots = pick(table_p, read_col_p) if cache_all else table_p
                initial_states = jnp.where(meta.has_initial_states_p[:, None, None, None],
                                           ssm_state[read_slots], 0).astype(ssm_state.dtype)
            y_p, states = mamba_chunk_scan_combined_varlen(
                x_p.reshape(npf, H, P), dt[nd:nd + npf], A, B_p.reshape(npf, G, N),
                C_p.reshape(npf, G, N), self.chunk_size, meta.query_start_loc_p,
                meta.cu_chunk_seqlen_p, meta.last_chunk_indices_p, meta.seq_idx_p, D=D,
                dt_bias=dt_bias, initial_states=initial_states, dt_softplus=True,
                return_intermediate_states=cache_all, state_dtype=ssm_state.dtype)
            write_slots, final_states = table_p, states
            if cache_all:
                # The states at the block boundaries crossed, then the last state.
                ssm_state = _scatter_states(ssm_state, meta.block_state_slots_p,
                                            states[meta.block_state_chunks_p])
                write_slots = pick(table_p, write_col_p)
                final_states = states[meta.last_chunk_indices_p]
            ssm_state = _scatter_states(ssm_state, write_slots, final_states)
            parts.append(y_p.reshape(npf, I))

        # Rows of padding tokens stay 0.
        parts.append(jnp.zeros((hidden_states.shape[0] - nd - npf, I), hidden_states.dtype))
        ssm_out = jnp.concatenate([p.astype(hidden_states.dtype) for p in parts])
        if self.use_rms_norm:
            gated = rms_norm_gated(ssm_out, self.norm_weight[...], z=gate, eps=self.rms_norm_eps,
                                   group_size=dims.norm_group_size)
        else:
            gated = ssm_out * jax.nn.silu(gate)
        out = _linear(gated, self.out_proj_weight, self.out_proj_bias)
        return out, (conv if dim_first else conv.swapaxes(1, 2)), ssm_state

    def forward_on_cache(self, hidden_states, cache, metadata: Mamba2Metadata, layer: int = 0,
                         allow_writeback: bool | None = None):
        """``__call__`` on layer ``layer`` of ``cache`` (a
        ``bridge.MambaStateCache``), jitted with both states donated; the
        cache holds the new states afterwards. Returns ``out (T, hidden)``.
        The weights and the metadata's arrays are arguments of the jitted
        step, so batches of the same shapes reuse one compilation; inside it
        index values are not checked (the kernels leave memory alone for
        out-of-range slots), call ``__call__`` eagerly to have them checked.
        ``allow_writeback``: as in ``bridge.jax_step_into`` (default: copy
        back on CPU, raise ``AliasLostError`` on CUDA if XLA did not alias)."""
        graphdef, params = nnx.split(self)
        static = tuple((f.name, getattr(metadata, f.name)) for f in dataclasses.fields(metadata)
                       if f.name not in Mamba2Metadata.ARRAY_FIELDS)
        arrays = {name: jnp.asarray(getattr(metadata, name)) for name in Mamba2Metadata.ARRAY_FIELDS
                  if getattr(metadata, name) is not None}
        result = cache.run_jax_inplace(_jitted_step(graphdef, static), hidden_states, params, arrays,
                                       layer=layer, states=("conv", "ssm"), state_outputs=(1, 2),
                                       allow_writeback=allow_writeback)
        return result.outputs[0]


@functools.lru_cache(maxsize=64)
def _jitted_step(graphdef, static):
    """One jitted mixer step per module structure and metadata counts."""
    def step(conv_state, ssm_state, hidden_states, params, arrays):
        mixer = nnx.merge(graphdef, params)
        return mixer(hidden_states, conv_state, ssm_state, Mamba2Metadata(**dict(static), **arrays))

    return jax.jit(step, donate_argnums=(0, 1))
