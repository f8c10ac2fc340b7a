"""What the two frameworks share.

``bridge.spec`` is the framework-neutral spec code (numpy only; see its
docstring): argument contracts, launch configs, the backend registry, state
shapes, copy specs and the mixer's metadata, sharding and checkpoint layout.

The interop layer beside it imports torch and jax inside its functions:
``bridge.dlpack`` (``to_jax``, ``to_torch``, ``jax_step_into``) and
``bridge.state_cache`` (``MambaStateCache``). The names below are loaded on
first use, so ``import bridge`` imports neither framework.
"""

import importlib

_EXPORTS = {
    "CONV_STATE_LAYOUT_ENV": "spec.state_shapes", "MambaStateShapeCalculator": "spec.state_shapes",
    "get_conv_state_layout": "spec.state_shapes", "is_conv_state_dim_first": "spec.state_shapes",
    "MambaCopySpec": "spec.copy_spec", "MambaStateCopyFunc": "spec.copy_spec",
    "get_conv_copy_spec": "spec.copy_spec", "get_temporal_copy_spec": "spec.copy_spec",
    "copy_blocks": "spec.copy_spec",
    "Mamba2Metadata": "spec.mixer_metadata", "build_mamba2_metadata": "spec.mixer_metadata",
    "MixerDims": "spec.mixer_sharding", "mamba_v2_sharded_weight_loader": "spec.mixer_sharding",
    "shard_mixer_weights": "spec.mixer_sharding",
    "to_jax": "dlpack", "to_torch": "dlpack", "jax_step_into": "dlpack", "InplaceStep": "dlpack",
    "AliasLostError": "dlpack", "BridgeCopyWarning": "dlpack", "SHARED_DTYPES": "dlpack",
    "MambaStateCache": "state_cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bridge' has no attribute {name!r}")
    return getattr(importlib.import_module(f"bridge.{_EXPORTS[name]}"), name)
