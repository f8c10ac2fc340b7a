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


SIDES = {"torch": TorchSide, "jax": JaxSide}


@pytest.fixture(params=list(SIDES), scope="session")
def side(request):
    return SIDES[request.param]()
