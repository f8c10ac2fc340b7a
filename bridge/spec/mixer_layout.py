"""The framework-neutral half of both ``MambaMixer2`` modules (``torch_impl``,
``jax_impl``): the configuration, the state shapes, the checkpoint layout,
how the projection splits, and the up-front checks of a call."""

from __future__ import annotations

import importlib
from typing import Mapping

from bridge.spec.mixer_metadata import Mamba2Metadata, check_batch, check_checkpoint, checkpoint_shapes
from bridge.spec.mixer_sharding import MixerDims
from bridge.spec.state_shapes import MambaStateShapeCalculator

# Checkpoint key (Hugging Face / mamba_ssm) -> the mixers' parameter attribute.
PARAM_ATTRS = {"in_proj.weight": "in_proj_weight", "in_proj.bias": "in_proj_bias",
               "conv1d.weight": "conv_weight", "conv1d.bias": "conv_bias", "dt_bias": "dt_bias",
               "D": "D", "norm.weight": "norm_weight", "out_proj.weight": "out_proj_weight",
               "out_proj.bias": "out_proj_bias"}


class MixerLayout:
    """Base of both mixers: vLLM's constructor arguments less its config
    objects (``chunk_size``, the model's mamba chunk size, and ``num_spec``,
    speculative tokens, come from those in vLLM) as attributes, and
    ``dims``; the framework's half: ``SAFETENSORS`` (the safetensors module
    it loads with) and ``_load``."""

    SAFETENSORS = ""

    def __init__(self, hidden_size: int, ssm_state_size: int, conv_kernel_size: int,
                 intermediate_size: int, use_conv_bias: bool, use_bias: bool, n_groups: int = 1,
                 num_heads: int = 128, head_dim: int = 64, rms_norm_eps: float = 1e-5,
                 activation: str = "silu", use_rms_norm: bool = True, chunk_size: int = 256,
                 num_spec: int = 0):
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

    def load_weights(self, weights: Mapping, prefix: str = "") -> None:
        """Copy a checkpoint in: Hugging Face / mamba_ssm key names (after
        ``prefix``) mapping to torch tensors, jax or numpy arrays (shared
        through DLPack without a copy where possible). ``A_log`` becomes
        ``A = -exp(A_log)``."""
        check_checkpoint(weights, self._checkpoint_shapes(), prefix)
        self._load({attr: weights[prefix + key] for key, attr in PARAM_ATTRS.items()
                    if getattr(self, attr) is not None}, weights[prefix + "A_log"])

    def load_safetensors(self, path: str, prefix: str = "") -> None:
        """``load_weights`` from a safetensors file."""
        self.load_weights(importlib.import_module(self.SAFETENSORS).load_file(path), prefix)

    def get_state_shape(self):
        """Per-block (conv, ssm) state shapes for a ``bridge.MambaStateCache``."""
        return MambaStateShapeCalculator.mamba2_state_shape(
            tp_world_size=1, intermediate_size=self.intermediate_size, n_groups=self.n_groups,
            num_heads=self.num_heads, head_dim=self.head_dim, state_size=self.ssm_state_size,
            conv_kernel=self.conv_kernel_size, num_spec=self.num_spec)

    def _checkpoint_shapes(self) -> dict:
        return checkpoint_shapes(self.dims, self.hidden_size, self.conv_kernel_size,
                                 use_bias=self.use_bias, use_conv_bias=self.use_conv_bias,
                                 use_rms_norm=self.use_rms_norm)

    def _params_by_key(self) -> dict:
        return {key: getattr(self, attr) for key, attr in PARAM_ATTRS.items()}

    @property
    def projection_sizes(self) -> tuple[int, int, int]:
        """``in_proj``'s output splits into (gate, xBC, dt) of these widths."""
        return self.intermediate_size, self.dims.conv_dim, self.num_heads

    @property
    def xbc_sizes(self) -> tuple[int, int, int]:
        """The conv's output splits into (x, B, C) of these widths."""
        group_channels = self.dims.padded_groups * self.ssm_state_size
        return self.intermediate_size, group_channels, group_channels

    @staticmethod
    def _prefix_caching_conv_args(metadata: Mamba2Metadata, read_columns, write_columns) -> dict:
        """``causal_conv1d_fn``'s prefix-caching arguments for the prefills."""
        return dict(block_idx_first_scheduled_token=metadata.block_idx_first_scheduled_token_p,
                    block_idx_last_scheduled_token=write_columns, initial_state_idx=read_columns,
                    num_computed_tokens=metadata.num_computed_tokens_p,
                    block_size_to_align=metadata.mamba_block_size)

    def _check_batch(self, metadata: Mamba2Metadata, num_tokens: int, num_slots: int,
                     host) -> None:
        """``check_batch`` for this mixer's chunk size and speculative tokens."""
        check_batch(metadata, num_tokens=num_tokens, num_slots=num_slots,
                    chunk_size=self.chunk_size, num_spec=self.num_spec, host=host)
