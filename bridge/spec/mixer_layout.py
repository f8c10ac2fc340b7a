"""The framework-neutral half of both ``MambaMixer2`` modules (``torch_impl``,
``jax_impl``): the configuration, the state shapes, the checkpoint layout,
how the projection splits, and the up-front checks of a call."""

from __future__ import annotations

from bridge.spec.mixer_metadata import Mamba2Metadata, check_batch, checkpoint_shapes
from bridge.spec.mixer_sharding import MixerDims
from bridge.spec.state_shapes import MambaStateShapeCalculator

# Checkpoint key (Hugging Face / mamba_ssm) -> the mixers' parameter attribute.
PARAM_ATTRS = {"in_proj.weight": "in_proj_weight", "in_proj.bias": "in_proj_bias",
               "conv1d.weight": "conv_weight", "conv1d.bias": "conv_bias", "dt_bias": "dt_bias",
               "D": "D", "norm.weight": "norm_weight", "out_proj.weight": "out_proj_weight",
               "out_proj.bias": "out_proj_bias"}


class MixerLayout:
    """Mixin: ``_configure`` (from the constructor) sets vLLM's constructor
    arguments as attributes and ``dims``; the rest reads them."""

    def _configure(self, *, hidden_size, ssm_state_size, conv_kernel_size, intermediate_size,
                   use_conv_bias, use_bias, n_groups, num_heads, head_dim, rms_norm_eps,
                   activation, use_rms_norm, chunk_size, num_spec) -> None:
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

    def _check_batch(self, metadata: Mamba2Metadata, num_tokens: int, num_slots: int,
                     host) -> None:
        """``check_batch`` for this mixer's chunk size and speculative tokens."""
        check_batch(metadata, num_tokens=num_tokens, num_slots=num_slots,
                    chunk_size=self.chunk_size, num_spec=self.num_spec, host=host)
