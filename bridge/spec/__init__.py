"""The framework-neutral spec code: numpy only, imported by both
``torch_impl`` and ``jax_impl`` (neither framework is imported at module level).

- ``checks``: the argument-error helpers every contract uses;
- ``ssu_contract``, ``ssd_contract``, ``conv_contract``, ``norm_contract``: argument
  contracts (shapes, dtypes, index values) of the ops;
- ``launch_config``: tuned launch-config lookup (files, override, heuristics);
- ``backends``: the backend registry behind the ``ssu_dispatch`` modules;
- ``state_shapes``: per-block state shapes and the conv-state layout;
- ``copy_spec``: prefix-caching copy specs and the batched block copy;
- ``mixer_metadata``, ``mixer_sharding``: the mixer's per-step metadata, its
  tensor-parallel sharding rules and checkpoint layout.
- ``lm_config``: the language model's config (both published layouts), its
  checkpoint keys, and the generation bookkeeping (slots, sampling options).
"""
