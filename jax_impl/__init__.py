"""Mamba-2 kernels for JAX, written in Pallas. Mirror: ``torch_impl``."""

from jax_impl import platform  # noqa: F401
from jax_impl.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from jax_impl.autotune import warmup_launch_configs
from jax_impl.gated_rms_norm import rms_norm_gated
from jax_impl.mamba_mixer2 import MambaMixer2
from jax_impl.selective_scan import selective_scan_fn
from jax_impl.selective_state_update import (
    get_ssm_config_file_name, get_ssm_configs, override_ssm_config, selective_state_update,
    try_get_optimal_ssm_config)
from jax_impl.ssd_combined import mamba_chunk_scan_combined, mamba_chunk_scan_combined_varlen
from bridge.spec.ssu_contract import NULL_BLOCK_ID

__all__ = ["NULL_BLOCK_ID", "get_ssm_config_file_name", "get_ssm_configs",
           "mamba_chunk_scan_combined", "mamba_chunk_scan_combined_varlen", "override_ssm_config",
           "selective_state_update", "try_get_optimal_ssm_config"]
__all__ += ["causal_conv1d_fn", "causal_conv1d_update"]
__all__ += ["rms_norm_gated"]
__all__ += ["warmup_launch_configs"]
__all__ += ["selective_scan_fn"]
__all__ += ["MambaMixer2"]
from jax_impl.mamba2_lm import Mamba2LMHeadModel  # noqa: E402
from bridge.spec.lm_config import Mamba2Config  # noqa: E402
__all__ += ["Mamba2Config", "Mamba2LMHeadModel"]
