"""Backend dispatch for the state update (vLLM's ``ssu_dispatch``):
``pallas`` (this package's kernel) and ``xla`` (jnp ops, float32 math).
Functional: every backend takes ``jax_impl.selective_state_update``'s
arguments, forwarded as given, and returns ``(out, new_state)``. Mirror:
``torch_impl/ssu_dispatch.py``."""

from __future__ import annotations

import functools

import jax.numpy as jnp

from bridge.spec.backends import BackendRegistry
from jax_impl import reference
from jax_impl.selective_state_update import selective_state_update as pallas_selective_state_update

_REGISTRY = BackendRegistry("Mamba SSU")
_REGISTRY.register_function("pallas", pallas_selective_state_update)
_REGISTRY.register_function(
    "xla", functools.partial(reference.selective_state_update_jnp, compute_dtype=jnp.float32),
    has_stochastic_rounding=False)

initialize_mamba_ssu_backend = _REGISTRY.initialize  # unknown names raise ValueError
get_mamba_ssu_backend = _REGISTRY.get  # RuntimeError before initialization


def selective_state_update(*args, **kwargs):
    """Run the initialized backend; returns ``(out, new_state)``."""
    return _REGISTRY.get()(*args, **kwargs)
