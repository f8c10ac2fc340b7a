"""One adapter per framework so that each test is written once and run for
both: native arrays from numpy case inputs, the kernel, the float64
reference, and results back as float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest


class TorchSide:
    name = "torch"

    def __init__(self):
        torch = pytest.importorskip("torch")
        torch_impl = pytest.importorskip("torch_impl")  # before triton: sets interpreter mode
        from torch_impl import reference
        self.torch, self.impl, self.reference = torch, torch_impl, reference
        self.device = torch_impl.platform.default_device()

    def array(self, values: np.ndarray, dtype: str):
        dtype = getattr(self.torch, dtype)
        return self.torch.from_numpy(np.ascontiguousarray(values)).to(self.device, dtype)

    def native(self, arrays, dtypes):
        return {k: self.array(v, dtypes[k]) for k, v in arrays.items()}

    def numpy(self, tensor) -> np.ndarray:
        return tensor.detach().to("cpu", self.torch.float64).numpy()

    def run_kernel(self, inputs, **options):
        """Kernel on copies: returns (out, new_state) as float64 numpy."""
        inputs = {k: v.clone() for k, v in inputs.items()}
        out = self.impl.selective_state_update(**inputs, **options)
        assert out is inputs["out"], "torch kernel must return the `out` it wrote"
        return self.numpy(out), self.numpy(inputs["state"])

    def run_reference(self, inputs, **options):
        out, state = self.reference.selective_state_update_ref(**inputs, **options)
        return self.numpy(out), self.numpy(state)

    def zeros_like(self, tensor):
        return self.torch.zeros_like(tensor)

    def decode_step(self, state, **args):
        """One selective_state_update on a copy of ``state``: (out, new_state)."""
        state = state.clone()
        return self.impl.selective_state_update(state, **args), state

    def run_ssd(self, inputs, **options):
        """Chunked-scan kernel into a copy of ``out``: (out, states) as float64 numpy."""
        inputs = dict(inputs, out=inputs["out"].clone())
        options = dict(options, state_dtype=getattr(self.torch, options["state_dtype"]))
        states = self.impl.mamba_chunk_scan_combined_varlen(**inputs, **options)
        return self.numpy(inputs["out"]), self.numpy(states)

    def ssd_references(self, inputs, **options):
        """{"sequential": (out, final_states), "chunked": (out, states)}, float64 numpy."""
        return _ssd_references(self.reference, self.numpy, inputs, options)

    def run_conv(self, function, inputs, **options):
        """``causal_conv1d_fn`` / ``_update`` on copies of the state and
        ``out``: (out, new_state) as float64 numpy."""
        state_arg = "conv_states" if function == "causal_conv1d_fn" else "conv_state"
        inputs = dict(inputs, **{state_arg: inputs[state_arg].clone(), "out": inputs["out"].clone()})
        out = getattr(self.impl, function)(**inputs, **options)
        assert out is inputs["out"], "torch kernel must return the `out` it wrote"
        return self.numpy(out), self.numpy(inputs[state_arg])

    def run_mixer(self, mixer, hidden_states: np.ndarray, cache, metadata) -> np.ndarray:
        """One mixer forward on ``cache`` (updated in place): out as float64 numpy."""
        with self.torch.no_grad():
            return self.numpy(mixer(self.array(hidden_states, "float32"), cache, metadata))

    def conv_reference(self, function, inputs, **options):
        """The float64 reference of ``function``: (out, new_state) as numpy."""
        inputs = {k: v for k, v in inputs.items() if k != "out"}
        return tuple(map(self.numpy, getattr(self.reference, f"{function}_ref")(**inputs, **options)))


class JaxSide:
    name = "jax"

    def __init__(self):
        jax = pytest.importorskip("jax")
        import jax.numpy as jnp
        import jax_impl
        from jax_impl import reference
        self.jax, self.jnp, self.impl, self.reference = jax, jnp, jax_impl, reference

    def array(self, values: np.ndarray, dtype: str):
        return self.jnp.asarray(values.astype(np.float32) if values.dtype.kind == "f" else values,
                                dtype=getattr(self.jnp, dtype))

    def native(self, arrays, dtypes):
        return {k: self.array(v, dtypes[k]) for k, v in arrays.items()}

    def numpy(self, array) -> np.ndarray:
        return np.asarray(array.astype(self.jnp.float32) if array.dtype != np.float64 else array,
                          dtype=np.float64)

    def run_kernel(self, inputs, **options):
        out, state = self.impl.selective_state_update(**inputs, **options)
        return self.numpy(out), self.numpy(state)

    def run_reference(self, inputs, **options):
        out, state = self.reference.selective_state_update_ref(**inputs, **options)
        return self.numpy(out), self.numpy(state)

    def zeros_like(self, array):
        return self.jnp.zeros_like(array)

    def decode_step(self, state, **args):
        """One selective_state_update: (out, new_state)."""
        return self.impl.selective_state_update(state, **args)

    def run_ssd(self, inputs, **options):
        """Chunked-scan kernel: (out, states) as float64 numpy."""
        options = dict(options, state_dtype=getattr(self.jnp, options["state_dtype"]))
        out, states = self.impl.mamba_chunk_scan_combined_varlen(**inputs, **options)
        return self.numpy(out), self.numpy(states)

    def ssd_references(self, inputs, **options):
        """{"sequential": (out, final_states), "chunked": (out, states)}, float64 numpy."""
        return _ssd_references(self.reference, self.numpy, inputs, options)

    def run_conv(self, function, inputs, **options):
        """``causal_conv1d_fn`` / ``_update``: (out, new_state) as float64 numpy."""
        out, state = getattr(self.impl, function)(**inputs, **options)
        return self.numpy(out), self.numpy(state)

    def run_mixer(self, mixer, hidden_states: np.ndarray, cache, metadata) -> np.ndarray:
        """One mixer forward on ``cache`` (updated in place): out as float64 numpy."""
        return self.numpy(mixer.forward_on_cache(self.array(hidden_states, "float32"), cache, metadata))

    def conv_reference(self, function, inputs, **options):
        """The float64 reference of ``function``: (out, new_state) as numpy."""
        inputs = {k: v for k, v in inputs.items() if k != "out"}
        return getattr(self.reference, f"{function}_ref")(**inputs, **options)


def _ssd_references(reference, numpy, inputs, options):
    common = {k: inputs.get(k) for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias",
                                          "initial_states")}
    common.update(dt_softplus=options["dt_softplus"], dt_limit=options["dt_limit"])
    sequential = reference.ssd_sequential_ref(**common, cu_seqlens=inputs["cu_seqlens"])
    chunked = reference.ssd_chunked_ref(
        **common, chunk_size=options["chunk_size"], cu_chunk_seqlens=inputs["cu_chunk_seqlens"],
        seq_idx=inputs["seq_idx"], last_chunk_indices=inputs["last_chunk_indices"],
        return_intermediate_states=options["return_intermediate_states"])
    return {"sequential": tuple(map(numpy, sequential)), "chunked": tuple(map(numpy, chunked))}


SIDES = {"torch": TorchSide, "jax": JaxSide}


@pytest.fixture(params=list(SIDES), scope="session")
def side(request):
    return SIDES[request.param]()
