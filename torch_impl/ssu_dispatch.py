"""Backend dispatch for the state update (vLLM's ``ssu_dispatch``):
``triton`` (this package's kernel), ``reference`` (torch ops, float32 math)
and ``flashinfer`` (when that package is installed). Every backend takes
``torch_impl.selective_state_update``'s arguments, forwarded as given.
Mirror: ``jax_impl/ssu_dispatch.py``."""

from __future__ import annotations

import functools

import torch

from bridge.spec.backends import BackendRegistry, MambaConfig, MambaSSUBackend
from bridge.spec.ssu_contract import NULL_BLOCK_ID
from torch_impl import reference
from torch_impl.selective_state_update import selective_state_update as triton_selective_state_update

_REGISTRY = BackendRegistry("Mamba SSU")
_REGISTRY.register_function("triton", triton_selective_state_update)
_REGISTRY.register_function(
    "reference", functools.partial(reference.selective_state_update_torch_ops, compute_dtype=torch.float32),
    has_stochastic_rounding=False)


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

    def __call__(self, state, x, dt, A, B, C, D=None, dt_bias=None, z=None, dt_softplus=False,
                 state_batch_indices=None, dst_state_batch_indices=None,
                 null_block_id=NULL_BLOCK_ID, out=None, num_accepted_tokens=None,
                 cu_seqlens=None, is_blackwell=False, validate_indices=None):
        # flashinfer names its arguments differently: the one backend that maps them.
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


initialize_mamba_ssu_backend = _REGISTRY.initialize  # unknown names raise ValueError
get_mamba_ssu_backend = _REGISTRY.get  # RuntimeError before initialization


def selective_state_update(*args, **kwargs):
    """Run the initialized backend (updates ``state`` and ``out`` in place; returns ``out``)."""
    return _REGISTRY.get()(*args, **kwargs)
