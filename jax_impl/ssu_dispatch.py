"""Backend dispatch for the state update (vLLM's ``ssu_dispatch``):
``pallas`` (this package's kernel) and ``xla`` (jnp ops, float32 math).
Functional: every backend returns ``(out, new_state)``. Mirror:
``torch_impl/ssu_dispatch.py``."""

from __future__ import annotations

import jax.numpy as jnp

from bridge.spec.backends import BackendRegistry, MambaConfig, MambaSSUBackend
from bridge.spec.ssu_contract import NULL_BLOCK_ID
from jax_impl import reference
from jax_impl.selective_state_update import selective_state_update as pallas_selective_state_update

_REGISTRY = BackendRegistry("Mamba SSU")


@_REGISTRY.register("pallas")
class PallasSSUBackend(MambaSSUBackend):
    name = "pallas"

    def __call__(self, state, x, dt, A, B, C, D, dt_bias, z=None, dt_softplus=False,
                 state_batch_indices=None, dst_state_batch_indices=None,
                 null_block_id=NULL_BLOCK_ID, out=None, num_accepted_tokens=None,
                 cu_seqlens=None, is_blackwell=False, rounding_seed=None):
        config = self._mamba_config
        return pallas_selective_state_update(
            state, x, dt, A, B, C, D, dt_bias, z, dt_softplus, state_batch_indices,
            dst_state_batch_indices, null_block_id, out, num_accepted_tokens, cu_seqlens,
            is_blackwell, config.enable_stochastic_rounding,
            config.stochastic_rounding_philox_rounds, rounding_seed=rounding_seed)


@_REGISTRY.register("xla")
class XlaSSUBackend(MambaSSUBackend):
    name = "xla"

    def __init__(self, mamba_config: MambaConfig):
        if mamba_config.enable_stochastic_rounding:
            raise ValueError("mamba_config: the xla backend has no stochastic rounding")
        super().__init__(mamba_config)

    def __call__(self, state, x, dt, A, B, C, D, dt_bias, z=None, dt_softplus=False,
                 state_batch_indices=None, dst_state_batch_indices=None,
                 null_block_id=NULL_BLOCK_ID, out=None, num_accepted_tokens=None,
                 cu_seqlens=None, is_blackwell=False, rounding_seed=None):
        return reference.selective_state_update_jnp(
            state, x, dt, A, B, C, D, dt_bias, z, dt_softplus, state_batch_indices,
            dst_state_batch_indices, null_block_id, out, num_accepted_tokens, cu_seqlens,
            compute_dtype=jnp.float32)


def initialize_mamba_ssu_backend(mamba_config: MambaConfig) -> None:
    """Select the process-wide backend; unknown names raise ValueError."""
    _REGISTRY.initialize(mamba_config)


def get_mamba_ssu_backend() -> MambaSSUBackend:
    """The initialized backend; RuntimeError before initialization."""
    return _REGISTRY.get()


def selective_state_update(state, x, dt, A, B, C, D, dt_bias, z=None, dt_softplus=False,
                           state_batch_indices=None, dst_state_batch_indices=None,
                           null_block_id=NULL_BLOCK_ID, out=None, num_accepted_tokens=None,
                           cu_seqlens=None, is_blackwell=False, rounding_seed=None):
    """Run the initialized backend; returns ``(out, new_state)``."""
    return get_mamba_ssu_backend()(
        state, x, dt, A, B, C, D, dt_bias, z=z, dt_softplus=dt_softplus,
        state_batch_indices=state_batch_indices,
        dst_state_batch_indices=dst_state_batch_indices, null_block_id=null_block_id,
        out=out, num_accepted_tokens=num_accepted_tokens, cu_seqlens=cu_seqlens,
        is_blackwell=is_blackwell, rounding_seed=rounding_seed)
