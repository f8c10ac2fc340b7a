"""The framework-neutral half of both ``MambaMixer2`` modules (``torch_impl``,
``jax_impl``): the configuration, the state shapes, the checkpoint layout,
how the projection splits, and the up-front checks of a call.

Tensor parallelism (``tp_size`` > 1): the sizes here (``projection_sizes``,
``xbc_sizes``, ``local_heads``, ``local_groups``, ``get_state_shape``) are one
rank's (``bridge.spec.mixer_sharding``); checkpoints stay whole."""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Mapping, Optional

import numpy as np

from bridge.spec.checks import fail
from bridge.spec.mixer_metadata import Mamba2Metadata, check_batch, check_checkpoint, checkpoint_shapes
from bridge.spec.mixer_sharding import PARAM_SHARD_AXIS, MixerDims
from bridge.spec.ssd_contract import ChunkMetadata, chunk_metadata
from bridge.spec.state_shapes import MambaStateShapeCalculator

OP = "MambaMixer2"

# Checkpoint key (Hugging Face / mamba_ssm) -> the mixers' parameter attribute.
PARAM_ATTRS = {"in_proj.weight": "in_proj_weight", "in_proj.bias": "in_proj_bias",
               "conv1d.weight": "conv_weight", "conv1d.bias": "conv_bias", "dt_bias": "dt_bias",
               "D": "D", "norm.weight": "norm_weight", "out_proj.weight": "out_proj_weight",
               "out_proj.bias": "out_proj_bias", "A_log": "A_log"}


class MixerLayout:
    """Base of both mixers: vLLM's constructor arguments less its config
    objects (``chunk_size``, the model's mamba chunk size, and ``num_spec``,
    speculative tokens, come from those in vLLM) as attributes, and
    ``dims``, and ``tp_size`` (keyword: the tensor-parallel ranks; the
    frameworks derive it from their process group or mesh); the framework's
    half: ``SAFETENSORS`` (the safetensors module it loads with), ``_load``
    and ``_shard_checkpoint``."""

    SAFETENSORS = ""

    def __init__(self, hidden_size: int, ssm_state_size: int, conv_kernel_size: int,
                 intermediate_size: int, use_conv_bias: bool, use_bias: bool, n_groups: int = 1,
                 num_heads: int = 128, head_dim: int = 64, rms_norm_eps: float = 1e-5,
                 activation: str = "silu", use_rms_norm: bool = True, chunk_size: int = 256,
                 num_spec: int = 0, *, tp_size: int = 1):
        self.dims = MixerDims(intermediate_size, n_groups, num_heads, head_dim, ssm_state_size, tp_size)
        self.tp_size = tp_size
        if activation not in ("silu", "swish"):
            raise ValueError(f"MambaMixer2: `activation` must be 'silu' or 'swish', got {activation!r}")
        self.hidden_size, self.ssm_state_size, self.conv_kernel_size = (
            hidden_size, ssm_state_size, conv_kernel_size)
        self.intermediate_size, self.n_groups, self.num_heads, self.head_dim = (
            intermediate_size, n_groups, num_heads, head_dim)
        self.use_bias, self.use_conv_bias, self.use_rms_norm = use_bias, use_conv_bias, use_rms_norm
        self.rms_norm_eps, self.activation, self.chunk_size, self.num_spec = (
            rms_norm_eps, activation, chunk_size, num_spec)

    def load_weights(self, weights: Mapping, prefix: str = "") -> None:
        """Copy a checkpoint in: Hugging Face / mamba_ssm key names (after
        ``prefix``) mapping to torch tensors, jax or numpy arrays (shared
        through DLPack without a copy where possible). ``A_log`` is the
        parameter itself (``A = -exp(A_log)``, float32). A whole (TP 1)
        checkpoint at any ``tp_size``: each rank takes its shard
        (``mamba_v2_sharded_weight_loader``'s rules)."""
        check_checkpoint(weights, self._checkpoint_shapes(), prefix)
        whole = {key: weights[prefix + key] for key, attr in PARAM_ATTRS.items() if getattr(self, attr) is not None}
        self._load({PARAM_ATTRS[key]: value for key, value in
                    (self._shard_checkpoint(whole) if self.tp_size > 1 else whole).items()})

    def load_safetensors(self, path: str, prefix: str = "") -> None:
        """``load_weights`` from a safetensors file."""
        self.load_weights(importlib.import_module(self.SAFETENSORS).load_file(path), prefix)

    def get_state_shape(self):
        """Per-block (conv, ssm) state shapes for a ``bridge.MambaStateCache``
        (one rank's: its conv channels and heads)."""
        return MambaStateShapeCalculator.mamba2_state_shape(
            tp_world_size=self.tp_size, intermediate_size=self.intermediate_size, n_groups=self.n_groups,
            num_heads=self.num_heads, head_dim=self.head_dim, state_size=self.ssm_state_size,
            conv_kernel=self.conv_kernel_size, num_spec=self.num_spec)

    def _checkpoint_shapes(self) -> dict:
        return checkpoint_shapes(dataclasses.replace(self.dims, tp_size=1), self.hidden_size, self.conv_kernel_size,
                                 use_bias=self.use_bias, use_conv_bias=self.use_conv_bias,
                                 use_rms_norm=self.use_rms_norm)

    def _params_by_key(self) -> dict:
        return {key: getattr(self, attr) for key, attr in PARAM_ATTRS.items()}

    def _params_by_attr(self) -> dict:
        """The parameters present, by attribute name."""
        return {attr: getattr(self, attr) for attr in PARAM_ATTRS.values() if getattr(self, attr) is not None}

    @staticmethod
    def param_shard_axis(attr: str) -> Optional[int]:
        """The axis parameter ``attr`` is sharded on across the ranks (None: replicated)."""
        return PARAM_SHARD_AXIS[next(key for key, a in PARAM_ATTRS.items() if a == attr)]

    @property
    def local_heads(self) -> int:
        return self.dims.local("num_heads")

    @property
    def local_groups(self) -> int:
        """B and C groups of one rank (a replicated group counted on each)."""
        return self.dims.local("padded_groups")

    @property
    def projection_sizes(self) -> tuple[int, int, int]:
        """``in_proj``'s output splits into (gate, xBC, dt) of these widths (one rank's)."""
        return self.dims.local("intermediate_size"), self.dims.local("conv_dim"), self.local_heads

    @property
    def xbc_sizes(self) -> tuple[int, int, int]:
        """The conv's output splits into (x, B, C) of these widths (one rank's)."""
        group_channels = self.local_groups * self.ssm_state_size
        return self.dims.local("intermediate_size"), group_channels, group_channels

    @staticmethod
    def _prefix_caching_conv_args(metadata: Mamba2Metadata, read_columns, write_columns) -> dict:
        """``causal_conv1d_fn``'s prefix-caching arguments for the prefills."""
        return dict(block_idx_first_scheduled_token=metadata.block_idx_first_scheduled_token_p,
                    block_idx_last_scheduled_token=write_columns, initial_state_idx=read_columns,
                    num_computed_tokens=metadata.num_computed_tokens_p,
                    block_size_to_align=metadata.mamba_block_size)

    @staticmethod
    def _decode_block_columns(metadata: Mamba2Metadata, read_columns, write_columns, arange):
        """Prefix caching, the decodes' block-table columns (framework
        arrays; ``arange(n)``: the framework's, on the columns' device):
        ``(conv arguments, SSM read columns, SSM write columns)``. Speculative
        decodes continue from the previous step's last scheduled column and
        its per-token columns; their SSM columns are ``(num_decodes, 1 +
        num_spec)``, one per token (see ``Mamba2Metadata``)."""
        ssm = (read_columns, write_columns)
        if metadata.is_spec_decode:
            read_columns = metadata.block_idx_last_scheduled_token_prev_step[:metadata.num_decodes]
            offsets = arange(metadata.max_decode_query_len)
            ssm = (read_columns[:, None] + offsets, write_columns[:, None] + offsets)
        return dict(block_idx_last_scheduled_token=write_columns, initial_state_idx=read_columns), *ssm

    def _check_batch(self, metadata: Mamba2Metadata, num_tokens: int, num_slots: int,
                     host) -> None:
        """``check_batch`` for this mixer's chunk size and speculative tokens."""
        check_batch(metadata, num_tokens=num_tokens, num_slots=num_slots,
                    chunk_size=self.chunk_size, num_spec=self.num_spec, host=host)

    # --- the cache-free training forward ------------------------------------------

    @staticmethod
    def _is_training_call(serving: Mapping, training: Mapping) -> bool:
        """True for the cache-free training forward (every ``serving``
        argument absent), False for the serving forward (all given); a
        partial set, or a training-only argument with a cache, is refused
        by name."""
        given = [name for name, value in serving.items() if value is not None]
        if given and len(given) < len(serving):
            missing = next(name for name, value in serving.items() if value is None)
            fail(OP, missing, f"is required with `{given[0]}` (the serving forward takes "
                              f"{', '.join(f'`{n}`' for n in serving)} together); leave them all out "
                              "for the cache-free training forward")
        if given:
            for name, value in training.items():
                if value is not None:
                    fail(OP, name, "is an argument of the cache-free training forward only (the "
                                   "serving forward reads the sequences from `metadata`)")
        return not given

    def _training_layout(self, shape, seq_idx=None,
                         cu_seqlens=None) -> Optional[tuple[np.ndarray, ChunkMetadata]]:
        """``hidden_states (batch, seqlen, hidden)`` as packed sequences:
        ``(cu_seqlens (Q+1,) int32, chunk metadata)`` over the ``batch *
        seqlen`` tokens (None when there are none). Each row is one sequence, or (``seq_idx (batch,
        seqlen)``, host values) splits where ``seq_idx`` changes, or (batch
        1, ``cu_seqlens (Q+1,)``, host values) holds the given sequences."""
        if len(shape) != 3 or shape[2] != self.hidden_size:
            fail(OP, "hidden_states", f"must be (batch, seqlen, {self.hidden_size}) without a cache, "
                                      f"got shape {tuple(shape)}")
        batch, seqlen = int(shape[0]), int(shape[1])
        if seq_idx is not None and cu_seqlens is not None:
            fail(OP, "cu_seqlens", "and `seq_idx` both describe packed rows: pass one of them")
        if batch * seqlen == 0:
            return None
        if cu_seqlens is not None:
            return _packed_layout(batch, seqlen, np.asarray(cu_seqlens), self.chunk_size)
        if seq_idx is not None:
            return _seq_idx_layout(batch, seqlen, np.asarray(seq_idx), self.chunk_size)
        return _rows_layout(batch, seqlen, self.chunk_size)


@functools.lru_cache(maxsize=64)
def _rows_layout(batch: int, seqlen: int, chunk_size: int) -> tuple[np.ndarray, ChunkMetadata]:
    """One sequence per row (cached: a training loop reuses its shapes)."""
    cu = (np.arange(batch + 1, dtype=np.int64) * seqlen).astype(np.int32)
    return cu, chunk_metadata(cu, chunk_size)


def _seq_idx_layout(batch: int, seqlen: int, ids: np.ndarray, chunk_size: int):
    if ids.shape != (batch, seqlen) or ids.dtype.kind not in "iu":
        fail(OP, "seq_idx", f"must be integer ({batch}, {seqlen}) (batch, seqlen), got {ids.dtype} "
                            f"of shape {ids.shape}")
    if (np.diff(ids, axis=1) < 0).any():
        fail(OP, "seq_idx", "must not decrease along a row (a row splits where it changes)")
    is_start = np.ones((batch, seqlen), dtype=bool)
    is_start[:, 1:] = ids[:, 1:] != ids[:, :-1]
    cu = np.append(np.flatnonzero(is_start.ravel()), batch * seqlen).astype(np.int32)
    return cu, chunk_metadata(cu, chunk_size)


def _packed_layout(batch: int, seqlen: int, cu: np.ndarray, chunk_size: int):
    if batch != 1:
        fail(OP, "cu_seqlens", f"packs sequences into one row: `hidden_states` must be (1, seqlen, "
                               f"hidden), got batch {batch}")
    if cu.ndim != 1 or cu.dtype.kind not in "iu" or len(cu) < 2 or cu[0] != 0 or cu[-1] != seqlen \
            or (np.diff(cu) < 1).any():
        fail(OP, "cu_seqlens", f"must be integer (num_seqs + 1,), rising strictly from 0 to seqlen "
                               f"{seqlen}, got {cu.dtype} {cu.tolist()[:8]}")
    cu = cu.astype(np.int32)
    return cu, chunk_metadata(cu, chunk_size)
