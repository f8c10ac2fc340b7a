"""The Mamba-2 mixer layer (vLLM's ``MambaMixer2``) as a Flax NNX module on
this package's kernels:

    in_proj -> (gate, xBC, dt) -> causal conv1d -> SSM -> gated RMSNorm -> out_proj

Training: ``mixer(hidden_states)`` on ``(batch, seqlen, hidden)``, no cache
(every sequence from zero state), differentiable end to end. Serving:
decode requests come first in a batch (``causal_conv1d_update`` +
``selective_state_update``), prefills after them (``causal_conv1d_fn``, as
``causal_conv1d_fn_columns`` reading the projection in place, +
``mamba_chunk_scan_combined_varlen``). JAX is functional: ``__call__``
returns the new conv and SSM states; ``forward_on_cache`` runs it on a
``bridge.MambaStateCache`` (jitted, the states donated: in place where XLA
aliases the cache's memory), so a ``torch_impl.MambaMixer2`` with the same
weights can continue the sequences. Tensor parallelism: over an axis of a
``jax.sharding.Mesh``, the parameters and states sharded, the layer under
``shard_map`` (``jax_impl.tp``, ``bridge.spec.mixer_sharding``). Mirror:
``torch_impl/mamba_mixer2.py``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax.sharding import NamedSharding, PartitionSpec as P

from bridge.spec.checks import fail
from bridge.spec.mixer_layout import PARAM_ATTRS, MixerLayout
from bridge.spec.mixer_metadata import Mamba2Metadata
from bridge.spec.mixer_sharding import shard_mixer_weights
from bridge.spec.ssd_contract import ChunkMetadata
from bridge.spec.ssu_contract import NULL_BLOCK_ID
from bridge.spec.state_shapes import is_conv_state_dim_first
from jax_impl import platform, tp
from jax_impl.causal_conv1d import causal_conv1d_fn, causal_conv1d_fn_columns, causal_conv1d_update
from jax_impl.gated_rms_norm import rms_norm_gated, rms_norm_gated_columns
from jax_impl.selective_state_update import selective_state_update
from jax_impl.ssd_combined import mamba_chunk_scan_combined_varlen

# The metadata as jit arguments: arrays are leaves, the counts that shape
# them (and switch code paths) static aux data.
jax.tree_util.register_dataclass(
    Mamba2Metadata, data_fields=list(Mamba2Metadata.ARRAY_FIELDS),
    meta_fields=["num_prefills", "num_prefill_tokens", "num_decodes", "num_decode_tokens",
                 "chunk_size", "prep_initial_states", "mamba_block_size"])
jax.tree_util.register_dataclass(
    ChunkMetadata, data_fields=["cu_chunk_seqlens", "seq_idx", "last_chunk_indices"], meta_fields=[])


def _linear(x, weight, bias):
    """x @ weight.T + bias; float32 exactly (XLA's GPU default would use TF32,
    torch's does not)."""
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    y = jnp.matmul(x, weight[...].T, precision=precision)
    return y + bias[...] if bias is not None else y


def _scatter_states(ssm_state, slots, states, rows=None):
    """``ssm_state`` with ``[slots] = states[rows]`` (``states`` when ``rows``
    is None); null-block and out-of-range slots skipped (no wraparound: sent
    past the end, where the scatter drops them), an out-of-range row gives NaN."""
    if rows is not None:
        inside = (rows >= 0) & (rows < states.shape[0])
        states = jnp.where(inside[:, None, None, None], states[jnp.clip(rows, 0, states.shape[0] - 1)],
                           jnp.nan)
    keep = (slots != NULL_BLOCK_ID) & (slots >= 0) & (slots < ssm_state.shape[0])
    target = jnp.where(keep, slots, ssm_state.shape[0])
    return ssm_state.at[target].set(states.astype(ssm_state.dtype), mode="drop")


def _gather_states(ssm_state, slots, use):
    """``ssm_state[slots]`` where ``use`` (NaN for a slot outside the cache), zeros elsewhere."""
    inside = (slots >= 0) & (slots < ssm_state.shape[0])
    rows = jnp.where(inside[:, None, None, None], ssm_state[jnp.clip(slots, 0, ssm_state.shape[0] - 1)],
                     jnp.nan)
    return jnp.where(use[:, None, None, None], rows, 0).astype(ssm_state.dtype)


def _pick(table, columns):
    """``table[r, columns[r]]`` per row (``columns (R,)``), or ``table[r,
    columns[r, k]]`` (``(R, K)``); -1 (out of range: skipped) for a column
    outside the table."""
    cols = columns if columns.ndim == 2 else columns[:, None]
    inside = (cols >= 0) & (cols < table.shape[1])
    picked = jnp.where(inside, jnp.take_along_axis(table, jnp.clip(cols, 0, table.shape[1] - 1), axis=1), -1)
    return picked if columns.ndim == 2 else picked[:, 0]


class MambaMixer2(platform.CountsAssignments, MixerLayout, nnx.Module):
    """Arguments: ``bridge.spec.mixer_layout.MixerLayout``'s. Parameters (torch layout, as in the mirror):
    ``in_proj_weight (I + conv_dim + H, hidden)``, ``in_proj_bias``,
    ``conv_weight (conv_dim, W)``, ``conv_bias``, ``A_log (H,)`` (float32;
    ``A = -exp(A_log)``, the property ``A``), ``D``, ``dt_bias (H,)``,
    ``norm_weight (I,)``, ``out_proj_weight (hidden, I)``, ``out_proj_bias``.

    Two forwards: ``mixer(hidden_states)`` (training: ``(batch, seqlen,
    hidden)``, no cache, differentiable; returns ``out``) and
    ``mixer(hidden_states, conv_state, ssm_state, metadata)`` (serving,
    see ``__call__``).

    ``validate_indices`` (attribute, default None): concrete metadata
    (numpy, or jax arrays outside jit) is checked on the host before
    anything is written, with errors naming the metadata field: slots
    outside the cache and two requests on one slot (a slot written twice, or
    read by one request and written by another) are refused; False skips
    those checks. Unchecked (False, or traced metadata): slots outside the
    cache and the null block are skipped, the outputs of such requests are
    NaN, nothing outside the scheduled slots is written; colliding requests
    leave their slots unspecified (one of the updates wins).

    Recompiles: a jitted step (``forward_on_cache``, or ``jax.jit`` of
    ``__call__`` with the metadata as an argument: a pytree whose counts are
    static) compiles once per token count, metadata counts (requests and
    tokens of the decodes and of the prefills) and array shapes; lengths,
    slots and chunk boundaries are values. To bound them, bucket the counts
    with padding requests (null block, ``build_mamba2_metadata(...,
    padding=...)``): decodes up to a batch-size bucket, prefills up to a
    request-count bucket, the last padding prefill taking the tokens up to a
    token bucket. The number of chunks of P prefills over T tokens lies in
    ``[ceil(T / chunk_size), ceil(T / chunk_size) + P]``: at most P + 1
    compilations per bucket.

    Tensor parallelism (``mesh`` with an axis ``tp_axis`` of ``tp_size``
    devices): the parameters above are global arrays laid out rank by rank
    along their sharded axis (rank r's block: its shard, as
    ``bridge.spec.mixer_sharding`` defines it; the ``out_proj`` bias
    replicated) and placed with ``NamedSharding``; so are the states
    (``state_shardings``: conv channels and heads, block r rank r's
    ``get_state_shape()``). Both forwards run per rank under ``shard_map``
    and return the output replicated (``psum`` after ``out_proj``); the
    inputs are replicated. Random initialisation draws every rank's block
    independently: load a checkpoint (``load_weights`` takes the whole one)
    for a model equal to the unsharded one.
    """

    SAFETENSORS = "safetensors.numpy"

    def __init__(self, *args, dtype=jnp.float32, rngs: nnx.Rngs | None = None, mesh=None,
                 tp_axis: str = "tp", **kwargs):
        """``MixerLayout``'s arguments (vLLM's), then the parameters' ``dtype``
        and ``rngs``, and the tensor-parallel ranks: the ``tp_axis`` axis of
        ``mesh`` (a ``jax.sharding.Mesh``; None: unsharded, on the default device)."""
        if mesh is not None and tp_axis not in mesh.shape:
            fail("MambaMixer2", "tp_axis", f"{tp_axis!r} is not an axis of `mesh` {dict(mesh.shape)}")
        MixerLayout.__init__(self, *args, tp_size=1 if mesh is None else mesh.shape[tp_axis], **kwargs)
        self.mesh, self.tp_axis = mesh, tp_axis
        self.validate_indices = None
        I, conv_dim, H = (size * self.tp_size for size in self.projection_sizes)  # all ranks'

        rngs = rngs or nnx.Rngs(0)

        def uniform(shape, bound, low=None):
            low = -bound if low is None else low
            return jax.random.uniform(rngs.params(), shape, jnp.float32, low, bound)

        def linear(shape, bias):
            bound = 1.0 / math.sqrt(shape[1])
            return (nnx.Param(uniform(shape, bound).astype(dtype)),
                    nnx.Param(uniform(shape[:1], bound).astype(dtype)) if bias else None)

        self.in_proj_weight, self.in_proj_bias = linear((I + conv_dim + H, self.hidden_size), self.use_bias)
        self.conv_weight, self.conv_bias = linear((conv_dim, self.conv_kernel_size), self.use_conv_bias)
        self.out_proj_weight, self.out_proj_bias = linear((self.hidden_size, I), self.use_bias)
        self.A_log = nnx.Param(jnp.log(uniform((H,), 16.0, 1.0)))
        self.D = nnx.Param(jnp.ones((H,), dtype))
        dt = jnp.exp(uniform((H,), math.log(0.1), math.log(1e-3)))
        self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(dtype))  # softplus^-1(dt)
        self.norm_weight = nnx.Param(jnp.ones((I,), dtype)) if self.use_rms_norm else None
        if mesh is not None:
            for attr, param in self._params_by_attr().items():
                param.set_value(tp.put(param[...], self.param_sharding(attr)))

    @property
    def _reduce_axis(self):
        """The mesh axis the per-rank results are reduced over (None: unsharded)."""
        return None if self.mesh is None else self.tp_axis

    def param_sharding(self, attr: str) -> NamedSharding:
        """The ``NamedSharding`` of parameter ``attr`` on the mesh."""
        return NamedSharding(self.mesh, self._param_spec(attr, getattr(self, attr).ndim))

    def _param_spec(self, attr: str, ndim: int) -> P:
        return tp.spec(self.param_shard_axis(attr), ndim, self.tp_axis)

    @staticmethod
    def _state_axes() -> tuple[int, int]:
        """The sharded axis of a (conv, ssm) state block: its channels (SD
        ``(L, conv_dim)``, DS ``(conv_dim, L)``), its heads ``(H, P, N)``."""
        return (0 if is_conv_state_dim_first() else 1), 0

    def _state_specs(self) -> tuple[P, P]:
        """(conv, ssm) states ``(S, *block)``."""
        return tuple(tp.spec(axis + 1, ndim, self.tp_axis) for axis, ndim in zip(self._state_axes(), (3, 4)))

    def global_state_shape(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-block (conv, ssm) shapes of the sharded states: ``get_state_shape()``'s
        with the sharded axis ``tp_size`` times longer (block r: rank r's)."""
        return tuple(tuple(n * self.tp_size if a == axis else n for a, n in enumerate(shape))
                     for shape, axis in zip(self.get_state_shape(), self._state_axes()))

    def state_shardings(self) -> tuple[NamedSharding, NamedSharding]:
        """The (conv, ssm) states' ``NamedSharding`` on the mesh (see ``global_state_shape``)."""
        return tuple(NamedSharding(self.mesh, s) for s in self._state_specs())

    @property
    def A(self):
        """``-exp(A_log)`` (float32), differentiable in ``A_log``."""
        return -jnp.exp(self.A_log[...])

    # --- weights ---------------------------------------------------------------

    def _load(self, params: dict) -> None:
        """``load_weights``' framework half: values by parameter attribute."""
        from bridge.dlpack import to_jax

        def array(value):
            if isinstance(value, (jax.Array, np.ndarray)):
                return jnp.asarray(value)
            return to_jax(value, copy_ok=True, name="weight")

        for attr, value in params.items():
            target = getattr(self, attr)
            value = array(value).reshape(target.shape).astype(target.dtype)
            target.set_value(value if self.mesh is None else tp.put(value, self.param_sharding(attr)))

    def _shard_checkpoint(self, whole: dict) -> dict:
        """Every rank's shard, laid out rank by rank along the sharded axis."""
        whole = {key: np.asarray(value) for key, value in whole.items()}
        shards = [shard_mixer_weights(whole, self.dims, rank) for rank in range(self.tp_size)]
        return {key: value if self.param_shard_axis(attr) is None else
                np.concatenate([s[key] for s in shards], self.param_shard_axis(attr))
                for key, value in shards[0].items() for attr in [PARAM_ATTRS[key]]}

    def checkpoint_weights(self) -> dict:
        """The weights under checkpoint names (``conv1d.weight`` 3-D as saved,
        ``A_log``); sharded: the whole checkpoint, gathered."""
        weights = {}
        for key, value in self._params_by_key().items():
            if value is None:
                continue
            rows = self.dims.gather_rows(key)
            weights[key] = value[...] if self.mesh is None or rows is None else jnp.take(
                value[...], rows, axis=self.param_shard_axis(PARAM_ATTRS[key]))
        weights["conv1d.weight"] = weights["conv1d.weight"][:, None, :]
        return weights

    # --- forward ---------------------------------------------------------------

    def __call__(self, hidden_states, conv_state=None, ssm_state=None, metadata: Mamba2Metadata = None,
                 *, seq_idx=None, cu_seqlens=None):
        """Training (no states, no metadata): ``hidden_states (batch, seqlen,
        hidden)`` -> ``out (batch, seqlen, hidden)``, differentiable
        (``jax.grad`` / ``nnx.grad``) in the input and every parameter, and
        jittable; each row is one sequence from zero state, or ``seq_idx
        (batch, seqlen)`` splits a row where it changes, or ``cu_seqlens
        (num_seqs + 1,)`` packs sequences into one row (batch 1). Both must
        be concrete (numpy, or closed over under jit): the chunk layout
        depends on their values.

        Serving: ``hidden_states (T, hidden)``, one layer's cache states ``conv_state
        (S, L, conv_dim)`` (SD; DS: ``(S, conv_dim, L)``) and ``ssm_state (S,
        H, P, N)`` -> ``(out (T, hidden), new_conv_state, new_ssm_state)``.
        Jittable with ``metadata`` as an argument (see the class docstring).
        ``conv_state``, ``ssm_state`` and ``metadata`` come together.
        Sharded: the states laid out by ``state_shardings()``."""
        if self._is_training_call(dict(conv_state=conv_state, ssm_state=ssm_state, metadata=metadata),
                                  dict(seq_idx=seq_idx, cu_seqlens=cu_seqlens)):
            return self._train_forward(hidden_states, seq_idx, cu_seqlens)
        self._check_batch(metadata, hidden_states.shape[0], ssm_state.shape[0],
                          platform.host_index_values(self.validate_indices, **metadata.arrays()))
        if self.mesh is None:
            return self._serve(hidden_states, conv_state, ssm_state, metadata)
        conv_spec, ssm_spec = self._state_specs()
        return tp.run_sharded(self, self._param_spec, MambaMixer2._serve,
                              (hidden_states, conv_state, ssm_state, metadata),
                              (P(), conv_spec, ssm_spec, P()), (P(), conv_spec, ssm_spec))

    def _serve(self, hidden_states, conv_state, ssm_state, metadata: Mamba2Metadata):
        """The serving forward on one rank's shard (the metadata checked)."""
        meta = metadata.map_arrays(jnp.asarray)
        P, N = self.head_dim, self.ssm_state_size
        (I, _, H), G = self.projection_sizes, self.local_groups
        split = lambda v, sizes: jnp.split(v, np.cumsum(sizes)[:-1].tolist(), axis=-1)  # noqa: E731
        projection = _linear(hidden_states, self.in_proj_weight, self.in_proj_bias)
        gate, xBC, dt = split(projection, self.projection_sizes)
        dim_first = is_conv_state_dim_first()
        conv = conv_state if dim_first else conv_state.swapaxes(1, 2)  # (S, conv_dim, L)
        nd, npf = meta.num_decode_tokens, meta.num_prefill_tokens
        weight, bias = self.conv_weight[...], (self.conv_bias[...] if self.conv_bias is not None else None)
        A, D, dt_bias = self.A, self.D[...], self.dt_bias[...]
        parts = []

        # Prefix caching ("all" mode): the state is read from the block of the
        # last computed token and written to the block of the last scheduled one
        # (speculative decodes: see Mamba2Metadata).
        cache_all = meta.is_mamba_cache_all
        if cache_all:
            read_col_d, read_col_p = jnp.split(meta.block_idx_last_computed_token, [meta.num_decodes])
            write_col_d, write_col_p = jnp.split(meta.block_idx_last_scheduled_token, [meta.num_decodes])

        if meta.num_decodes:
            table_d = meta.state_indices_tensor_d
            conv_cols, ssm_slots = {}, dict(state_batch_indices=table_d)
            if cache_all:
                conv_cols, read_col_ssm, write_col_ssm = self._decode_block_columns(
                    meta, read_col_d, write_col_d, lambda n: jnp.arange(n, dtype=write_col_d.dtype))
                ssm_slots = dict(state_batch_indices=_pick(table_d, read_col_ssm),
                                 dst_state_batch_indices=_pick(table_d, write_col_ssm))
            conv_d, conv = causal_conv1d_update(
                x=xBC[:nd], conv_state=conv, weight=weight, bias=bias, activation=self.activation,
                conv_state_indices=table_d, num_accepted_tokens=meta.num_accepted_tokens,
                query_start_loc=meta.query_start_loc_d, max_query_len=meta.max_decode_query_len,
                **conv_cols)
            x_d, B_d, C_d = split(conv_d, self.xbc_sizes)
            y_d, ssm_state = selective_state_update(
                state=ssm_state, x=x_d.reshape(nd, H, P), dt=dt[:nd], A=A, B=B_d.reshape(nd, G, N),
                C=C_d.reshape(nd, G, N), D=D, dt_bias=dt_bias, dt_softplus=True,
                num_accepted_tokens=meta.num_accepted_tokens, cu_seqlens=meta.query_start_loc_d,
                **ssm_slots)
            parts.append(y_d.reshape(nd, I))

        if meta.num_prefills:
            table_p = meta.state_indices_tensor_p
            prefix = self._prefix_caching_conv_args(meta, read_col_p, write_col_p) if cache_all else {}
            # xBC's columns of the projection read in place, x, B and C written apart: no copies.
            x_p, B_p, C_p, conv = causal_conv1d_fn_columns(
                projection, rows=(nd, nd + npf), columns=(I, I + self.projection_sizes[1]),
                splits=tuple(np.cumsum(self.xbc_sizes)[:-1].tolist()), weight=weight, bias=bias,
                conv_states=conv, query_start_loc=meta.query_start_loc_p, cache_indices=table_p,
                has_initial_state=meta.has_initial_states_p, activation=self.activation, **prefix)
            initial_states = None
            if meta.prep_initial_states:
                initial_states = _gather_states(ssm_state, _pick(table_p, read_col_p) if cache_all
                                                else table_p, meta.has_initial_states_p)
            y_p, states = mamba_chunk_scan_combined_varlen(
                x=x_p.reshape(npf, H, P), dt=dt[nd:nd + npf], A=A, B=B_p.reshape(npf, G, N),
                C=C_p.reshape(npf, G, N), chunk_size=self.chunk_size, cu_seqlens=meta.query_start_loc_p,
                cu_chunk_seqlens=meta.cu_chunk_seqlen_p, last_chunk_indices=meta.last_chunk_indices_p,
                seq_idx=meta.seq_idx_p, D=D, dt_bias=dt_bias, initial_states=initial_states,
                dt_softplus=True, return_intermediate_states=cache_all, state_dtype=ssm_state.dtype)
            if cache_all:
                # The states at the block boundaries crossed, then the last state.
                ssm_state = _scatter_states(ssm_state, meta.block_state_slots_p, states,
                                            meta.block_state_chunks_p)
                ssm_state = _scatter_states(ssm_state, _pick(table_p, write_col_p), states,
                                            meta.last_chunk_indices_p)
            else:
                ssm_state = _scatter_states(ssm_state, table_p, states)
            parts.append(y_p.reshape(npf, I))

        # Rows of padding tokens stay 0.
        parts.append(jnp.zeros((hidden_states.shape[0] - nd - npf, I), hidden_states.dtype))
        ssm_out = jnp.concatenate([p.astype(hidden_states.dtype) for p in parts])
        out = self._gated_out(ssm_out, gate, projection)
        return out, (conv if dim_first else conv.swapaxes(1, 2)), ssm_state

    def _gated_out(self, ssm_out, gate, projection=None):
        """The gated norm and the (row-parallel) ``out_proj``, reduced over the
        ranks. Given the ``projection`` that ``gate`` leads (inference), the
        norm reads the gate from it in place."""
        axis = self._reduce_axis
        if self.use_rms_norm and self.dims.norm_is_local and projection is not None:
            gated = rms_norm_gated_columns(x=ssm_out, weight=self.norm_weight[...], z_source=projection,
                                           z_column=0, eps=self.rms_norm_eps,
                                           group_size=self.dims.norm_group_size)
        elif self.use_rms_norm and self.dims.norm_is_local:
            gated = rms_norm_gated(x=ssm_out, weight=self.norm_weight[...], z=gate, eps=self.rms_norm_eps,
                                   group_size=self.dims.norm_group_size)
        elif self.use_rms_norm:  # one group over every rank's channels: its sum of squares reduced
            v = ssm_out.astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32))
            mean_square = tp.sum_over_ranks(jnp.sum(v * v, -1, keepdims=True), axis) / self.intermediate_size
            gated = (v * jax.lax.rsqrt(mean_square + self.rms_norm_eps)
                     * self.norm_weight[...].astype(jnp.float32)).astype(ssm_out.dtype)
        else:
            gated = ssm_out * jax.nn.silu(gate)
        bias = None if self.out_proj_bias is None else tp.first_rank_only(self.out_proj_bias[...], axis)
        return tp.reduce_from_ranks(_linear(gated, self.out_proj_weight, bias), axis)

    def _train_forward(self, hidden_states, seq_idx, cu_seqlens):
        """The cache-free forward (``__call__``'s training form): the packed
        prefill path on the differentiable ops."""
        for name, value in (("seq_idx", seq_idx), ("cu_seqlens", cu_seqlens)):
            if value is not None and not platform.is_concrete(value):
                raise ValueError(f"MambaMixer2: `{name}` must be concrete (numpy, or closed over "
                                 "under jit, not traced): the chunk layout depends on its values")
        host = lambda v: None if v is None else np.asarray(v)  # noqa: E731
        layout = self._training_layout(tuple(hidden_states.shape), host(seq_idx), host(cu_seqlens))
        if layout is None:  # no tokens
            return jnp.zeros(hidden_states.shape, hidden_states.dtype)
        cu, chunks = layout
        if self.mesh is None:
            return self._train_local(hidden_states, cu, chunks)
        return tp.run_sharded(self, self._param_spec, MambaMixer2._train_local, (hidden_states, cu, chunks),
                              (P(), P(), P()), P())

    def _train_local(self, hidden_states, cu, chunks: ChunkMetadata):
        """The training forward on one rank's shard, the packing given."""
        batch, seqlen, _ = hidden_states.shape
        T, P, N = batch * seqlen, self.head_dim, self.ssm_state_size
        (I, _, H), G = self.projection_sizes, self.local_groups
        split = lambda v, sizes: jnp.split(v, np.cumsum(sizes)[:-1].tolist(), axis=-1)  # noqa: E731
        gate, xBC, dt = split(_linear(hidden_states.reshape(T, self.hidden_size), self.in_proj_weight,
                                      self.in_proj_bias), self.projection_sizes)
        qsl = jnp.asarray(cu)
        conv, _ = causal_conv1d_fn(
            x=xBC.T, weight=self.conv_weight[...],
            bias=self.conv_bias[...] if self.conv_bias is not None else None,
            query_start_loc=qsl, activation=self.activation, validate_indices=False)
        x, B, C = split(conv.T, self.xbc_sizes)
        y, _ = mamba_chunk_scan_combined_varlen(
            x=x.reshape(T, H, P), dt=dt, A=self.A, B=B.reshape(T, G, N), C=C.reshape(T, G, N),
            chunk_size=self.chunk_size, cu_seqlens=qsl, cu_chunk_seqlens=jnp.asarray(chunks.cu_chunk_seqlens),
            last_chunk_indices=jnp.asarray(chunks.last_chunk_indices), seq_idx=jnp.asarray(chunks.seq_idx),
            D=self.D[...], dt_bias=self.dt_bias[...], dt_softplus=True, validate_metadata=False)
        out = self._gated_out(y.reshape(T, I).astype(hidden_states.dtype), gate)
        return out.reshape(batch, seqlen, self.hidden_size)

    def forward_on_cache(self, hidden_states, cache, metadata: Mamba2Metadata, layer: int = 0,
                         allow_writeback: bool | None = None):
        """``__call__`` on layer ``layer`` of ``cache`` (a
        ``bridge.MambaStateCache``), jitted with both states donated and the
        weights and ``metadata`` as arguments; the cache holds the new states
        afterwards. Returns ``out (T, hidden)``. The metadata is checked
        before the jitted step, on the host (see the class docstring).
        ``allow_writeback``: as in ``bridge.jax_step_into`` (default: copy
        back on CPU, raise ``AliasLostError`` on CUDA if XLA did not alias).
        Unsharded only (a cache is one device's memory)."""
        if self.mesh is not None:
            fail("MambaMixer2.forward_on_cache", "cache", "holds one device's states; a sharded mixer "
                 "takes states laid out by state_shardings() in __call__")
        self._check_batch(metadata, hidden_states.shape[0], cache.num_blocks,
                          platform.host_index_values(self.validate_indices, **metadata.arrays()))
        result = cache.run_jax_inplace(_jitted_step, hidden_states, self, metadata,
                                       layer=layer, states=("conv", "ssm"), state_outputs=(1, 2),
                                       allow_writeback=allow_writeback)
        return result.outputs[0]


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _jitted_step(conv_state, ssm_state, hidden_states, mixer, metadata):
    """The mixer step, jitted with the states donated. The module is an
    argument (an nnx module is a pytree: no nnx.split per call); jit keys on
    its structure and on the metadata's counts and shapes."""
    return mixer(hidden_states, conv_state, ssm_state, metadata)
