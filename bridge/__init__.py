"""What the two frameworks share.

Framework-neutral modules (they import neither torch nor jax at module level,
so ``jax_impl`` and ``torch_impl`` can both use them without pulling in the
other framework):

- ``bridge.ssu_contract``: argument checking for ``selective_state_update``;
- ``bridge.ssd_contract``: argument checking and chunk metadata for the chunked scan;
- ``bridge.conv_contract``, ``bridge.norm_contract``: the same for the conv and the gated norm;
- ``bridge.launch_config``: tuned launch-config lookup (files, override, defaults), for the
  state update and per stage of the chunked scan;
- ``bridge.mixer_metadata``, ``bridge.mixer_sharding``: the mixer's per-step metadata and its
  tensor-parallel sharding rules;
- ``bridge.backends``: the backend registry behind the ``*_dispatch`` modules;
- ``bridge.state_shapes``: per-block state shapes (vLLM's ``MambaStateShapeCalculator``)
  and the conv-state layout (``$MAMBA_TWIN_CONV_STATE_LAYOUT``, SD or DS);
- ``bridge.copy_spec``: prefix-caching copy specs and the batched block copy.

The DLPack bridge (``bridge.dlpack``: ``to_jax``, ``to_torch``,
``jax_step_into``; ``bridge.state_cache``: ``MambaStateCache``) imports torch
and jax inside its functions. The names below are loaded on first use, so
``import bridge`` imports neither framework.
"""

import importlib

_EXPORTS = {
    "CONV_STATE_LAYOUT_ENV": "state_shapes", "MambaStateShapeCalculator": "state_shapes",
    "get_conv_state_layout": "state_shapes", "is_conv_state_dim_first": "state_shapes",
    "MambaCopySpec": "copy_spec", "MambaStateCopyFunc": "copy_spec",
    "get_conv_copy_spec": "copy_spec", "get_temporal_copy_spec": "copy_spec",
    "copy_blocks": "copy_spec",
    "to_jax": "dlpack", "to_torch": "dlpack", "jax_step_into": "dlpack", "InplaceStep": "dlpack",
    "AliasLostError": "dlpack", "BridgeCopyWarning": "dlpack", "SHARED_DTYPES": "dlpack",
    "MambaStateCache": "state_cache",
    "Mamba2Metadata": "mixer_metadata", "build_mamba2_metadata": "mixer_metadata",
    "MixerDims": "mixer_sharding", "mamba_v2_sharded_weight_loader": "mixer_sharding",
    "shard_mixer_weights": "mixer_sharding",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bridge' has no attribute {name!r}")
    return getattr(importlib.import_module(f"bridge.{_EXPORTS[name]}"), name)
