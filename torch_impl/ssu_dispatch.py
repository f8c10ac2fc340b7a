"""Backend dispatch for the state update (vLLM's ``ssu_dispatch``):
``triton`` (this package's kernel), ``reference`` (torch ops, float32 math)
and ``flashinfer`` (when that package is installed). Mirror:
``jax_impl/ssu_dispatch.py``."""

from __future__ import annotations

import torch

from bridge.spec.backends import BackendRegistry, MambaConfig, MambaSSUBackend
from bridge.spec.ssu_contract import NULL_BLOCK_ID
from torch_impl import reference
from torch_impl.selective_state_update import selective_state_update as triton_selective_state_update

_REGISTRY = BackendRegistry("Mamba SSU")


@_REGISTRY.register("triton")
class TritonSSUBackend(MambaSSUBackend):
    name = "triton"

    def __call__(self, state, x, dt, A, B, C, D, dt_bias, z=None, dt_softplus=False,
                 state_batch_indices=None, dst_state_batch_indices=None,
                 null_block_id=NULL_BLOCK_ID, out=None, num_accepted_tokens=None,
                 cu_seqlens=None, is_blackwell=False):
        config = self._mamba_config
        return triton_selective_state_update(
            state, x, dt, A, B, C, D, dt_bias, z, dt_softplus, state_batch_indices,
            dst_state_batch_indices, null_block_id, out, num_accepted_tokens, cu_seqlens,
            is_blackwell, config.enable_stochastic_rounding,
            config.stochastic_rounding_philox_rounds)


@_REGISTRY.register("reference")
class ReferenceSSUBackend(MambaSSUBackend):
    name = "reference"

    def __init__(self, mamba_config: MambaConfig):
        if mamba_config.enable_stochastic_rounding:
            raise ValueError("mamba_config: the reference backend has no stochastic rounding")
        super().__init__(mamba_config)

    def __call__(self, state, x, dt, A, B, C, D, dt_bias, z=None, dt_softplus=False,
                 state_batch_indices=None, dst_state_batch_indices=None,
                 null_block_id=NULL_BLOCK_ID, out=None, num_accepted_tokens=None,
                 cu_seqlens=None, is_blackwell=False):
        return reference.selective_state_update_torch_ops(
            state, x, dt, A, B, C, D, dt_bias, z, dt_softplus, state_batch_indices,
            dst_state_batch_indices, null_block_id, out, num_accepted_tokens, cu_seqlens,
            compute_dtype=torch.float32)


@_REGISTRY.register("flashinfer")
class FlashInferSSUBackend(MambaSSUBackend):
    name = "flashinfer"

    def __init__(self, mamba_config: MambaConfig):
        try:
            from flashinfer.mamba import selective_state_update as kernel
        except ImportError as error:
            raise ImportError(
                "The flashinfer Mamba SSU backend needs the `flashinfer-python` package "
                "(>= 0.6.4): pip install flashinfer-python") from error
        super().__init__(mamba_config)
        self._kernel = kernel

    def __call__(self, state, x, dt, A, B, C, D, dt_bias, z=None, dt_softplus=False,
                 state_batch_indices=None, dst_state_batch_indices=None,
                 null_block_id=NULL_BLOCK_ID, out=None, num_accepted_tokens=None,
                 cu_seqlens=None, is_blackwell=False):
        config = self._mamba_config
        seed = (torch.randint(0, 2**32, (1,), device=state.device)
                if config.enable_stochastic_rounding else None)
        steps = (state_batch_indices.size(-1)
                 if cu_seqlens is not None and state_batch_indices is not None else 0)
        return self._kernel(
            state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
            state_batch_indices=state_batch_indices,
            dst_state_batch_indices=dst_state_batch_indices, cu_seqlens=cu_seqlens,
            num_accepted_tokens=num_accepted_tokens, cache_steps=steps,
            pad_slot_id=null_block_id, out=out, rand_seed=seed,
            philox_rounds=config.stochastic_rounding_philox_rounds or 10)


def initialize_mamba_ssu_backend(mamba_config: MambaConfig) -> None:
    """Select the process-wide backend; unknown names raise ValueError."""
    _REGISTRY.initialize(mamba_config)


def get_mamba_ssu_backend() -> MambaSSUBackend:
    """The initialized backend; RuntimeError before initialization."""
    return _REGISTRY.get()


def selective_state_update(state, x, dt, A, B, C, D, dt_bias, z=None, dt_softplus=False,
                           state_batch_indices=None, dst_state_batch_indices=None,
                           null_block_id=NULL_BLOCK_ID, out=None, num_accepted_tokens=None,
                           cu_seqlens=None, is_blackwell=False):
    """Run the initialized backend (updates ``state`` and ``out`` in place)."""
    return get_mamba_ssu_backend()(
        state, x, dt, A, B, C, D, dt_bias, z=z, dt_softplus=dt_softplus,
        state_batch_indices=state_batch_indices,
        dst_state_batch_indices=dst_state_batch_indices, null_block_id=null_block_id,
        out=out, num_accepted_tokens=num_accepted_tokens, cu_seqlens=cu_seqlens,
        is_blackwell=is_blackwell)
