"""What the two frameworks share.

Framework-neutral modules (they import neither torch nor jax at module level,
so ``jax_impl`` and ``torch_impl`` can both use them without pulling in the
other framework):

- ``bridge.ssu_contract``: argument checking for ``selective_state_update``;
- ``bridge.launch_config``: tuned launch-config lookup (files, override, heuristic);
- ``bridge.backends``: the backend registry behind the ``*_dispatch`` modules.
"""
