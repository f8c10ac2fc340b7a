"""Mamba-2 kernels for PyTorch, written in Triton. Mirror: ``jax_impl``."""

from torch_impl import platform  # noqa: F401  (first: picks interpreter mode)
from torch_impl.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from torch_impl.autotune import warmup_launch_configs
from torch_impl.gated_rms_norm import rms_norm_gated
from torch_impl.mamba_mixer2 import CapturedDecodeStep, MambaMixer2, metadata_to_device
from torch_impl.selective_scan import selective_scan_fn
from torch_impl.selective_state_update import (
    get_ssm_config_file_name, get_ssm_configs, override_ssm_config, selective_state_update,
    try_get_optimal_ssm_config)
from torch_impl.ssd_combined import mamba_chunk_scan_combined, mamba_chunk_scan_combined_varlen
from bridge.spec.ssd_contract import chunk_metadata
from bridge.spec.ssu_contract import NULL_BLOCK_ID

__all__ = ["NULL_BLOCK_ID", "chunk_metadata", "get_ssm_config_file_name", "get_ssm_configs",
           "mamba_chunk_scan_combined", "mamba_chunk_scan_combined_varlen",
           "override_ssm_config", "selective_state_update", "try_get_optimal_ssm_config"]
__all__ += ["causal_conv1d_fn", "causal_conv1d_update"]
__all__ += ["rms_norm_gated"]
__all__ += ["warmup_launch_configs"]
__all__ += ["selective_scan_fn"]
__all__ += ["CapturedDecodeStep", "MambaMixer2", "metadata_to_device"]
from torch_impl.mamba2_lm import Mamba2LMHeadModel  # noqa: E402
from bridge.spec.lm_config import Mamba2Config  # noqa: E402
__all__ += ["Mamba2Config", "Mamba2LMHeadModel"]
