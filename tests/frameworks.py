"""One adapter per framework so that each test is written once and run for
both: native arrays from numpy case inputs, the kernel, the float64
reference (``reference``, numpy) on the inputs as the kernel sees them, and
results back as float64 numpy; and the one closeness check of the tests,
``assert_close``."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pytest

import reference

# Per dtype of the computation, relative to the largest finite |expected|.
TOLERANCE = {"float64": 1e-12, "float32": 2e-5, "float16": 5e-3, "bfloat16": 2e-2}


def as_float64(array) -> np.ndarray:
    """A torch tensor, jax array or numpy array (any real dtype) as float64 numpy."""
    if hasattr(array, "detach"):  # torch: bfloat16 has no numpy dtype
        array = array.detach().cpu().double()
    return np.asarray(array).astype(np.float64)


def as_numpy(array):
    """``array`` (torch, jax or numpy) as numpy: floats as float64, integers
    and booleans as they are; None stays None."""
    if array is None:
        return None
    if hasattr(array, "detach") and not array.is_floating_point():
        return array.detach().cpu().numpy()
    values = np.asarray(array) if not hasattr(array, "detach") else None
    if values is not None and (np.issubdtype(values.dtype, np.integer) or values.dtype == bool):
        return values
    return as_float64(array)


def numpy_reference(function, inputs, **options):
    """``reference.<function>`` on ``inputs`` (native arrays by argument name)."""
    return getattr(reference, function)(**{k: as_numpy(v) for k, v in inputs.items()}, **options)


def assert_close(actual, expected, dtype: str, what: str = "", *, tol: Optional[float] = None) -> None:
    """``actual`` equals ``expected`` (torch, jax or numpy arrays) within
    ``tol`` (default ``TOLERANCE[dtype]``, ``dtype`` naming the precision of
    the computation) times the largest finite ``|expected|``, elementwise;
    NaN exactly where ``expected`` is NaN, so a poisoned element left
    unwritten, or one written that should stay poisoned, fails."""
    actual, expected = as_float64(actual), as_float64(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{what}: NaN pattern")
    finite = np.isfinite(expected)
    scale = np.abs(expected[finite]).max() if finite.any() else 1.0
    tol = TOLERANCE[dtype] if tol is None else tol
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale, equal_nan=True, err_msg=what)


class _Side:
    """What both adapters do alike; ``xp`` is the framework's array module."""

    name: str

    def native(self, arrays, dtypes):
        return {k: self.array(v, dtypes[k]) for k, v in arrays.items()}

    @staticmethod
    def numpy(array) -> np.ndarray:
        return as_float64(array)

    def zeros_like(self, array):
        return self.xp.zeros_like(array)

    @staticmethod
    def run_reference(inputs, **options):
        """The state update's float64 reference: (out, new_state)."""
        return numpy_reference("selective_state_update", inputs, **options)

    @staticmethod
    def ssd_reference(inputs, **options):
        """The chunked scan's float64 reference: (out, states)."""
        options = {k: v for k, v in options.items() if k in ("dt_softplus", "dt_limit",
                                                              "return_intermediate_states")}
        inputs = {k: v for k, v in inputs.items() if k not in ("out", "seq_idx", "last_chunk_indices")}
        return numpy_reference("mamba_chunk_scan_combined_varlen", inputs, **options)

    @staticmethod
    def conv_reference(function, inputs, **options):
        """The float64 reference of ``function``: (out, new_state)."""
        return numpy_reference(function, {k: v for k, v in inputs.items() if k != "out"}, **options)

    @staticmethod
    def _plain_ssd_args(inputs, options):
        """The chunked scan's arguments as the plain-ops forms take them."""
        return ({k: v for k, v in inputs.items() if k not in ("cu_seqlens", "out")},
                {k: v for k, v in options.items() if k != "state_dtype"})


class TorchSide(_Side):
    name = "torch"

    def __init__(self):
        torch = pytest.importorskip("torch")
        torch_impl = pytest.importorskip("torch_impl")  # before triton: sets interpreter mode
        from torch_impl import reference as plain_ops
        self.torch, self.xp, self.impl, self.plain_ops = torch, torch, torch_impl, plain_ops
        self.device = torch_impl.platform.default_device()

    def plain_ops_ssu(self, inputs, **options):
        """The ``reference`` backend in float64 on float64 copies: (out, new_state)."""
        torch = self.torch
        inputs = {k: v.to(torch.float64, copy=True) if v.is_floating_point() else v
                  for k, v in inputs.items()}
        self.plain_ops.selective_state_update_torch_ops(**inputs, **options, compute_dtype=torch.float64)
        return self.numpy(inputs["out"]), self.numpy(inputs["state"])

    def plain_ops_ssd(self, inputs, **options):
        """``ssd_chunked_torch_ops`` in float64: (out, states)."""
        inputs, options = self._plain_ssd_args(inputs, options)
        return tuple(map(self.numpy, self.plain_ops.ssd_chunked_torch_ops(
            **inputs, **options, compute_dtype=self.torch.float64)))

    def array(self, values: np.ndarray, dtype: str):
        dtype = getattr(self.torch, dtype)
        return self.torch.from_numpy(np.ascontiguousarray(values)).to(self.device, dtype)

    def run_kernel(self, inputs, **options):
        """Kernel on copies: returns (out, new_state) as float64 numpy."""
        inputs = {k: v.clone() for k, v in inputs.items()}
        out = self.impl.selective_state_update(**inputs, **options)
        assert out is inputs["out"], "torch kernel must return the `out` it wrote"
        return self.numpy(out), self.numpy(inputs["state"])

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


class JaxSide(_Side):
    name = "jax"

    def __init__(self):
        jax = pytest.importorskip("jax")
        import jax.numpy as jnp
        import jax_impl
        from jax_impl import reference as plain_ops
        self.jax, self.jnp, self.xp, self.impl, self.plain_ops = jax, jnp, jnp, jax_impl, plain_ops

    def plain_ops_ssu(self, inputs, **options):
        """The ``xla`` backend in float64: (out, new_state)."""
        with self.jax.enable_x64(True):
            inputs = {k: self.jnp.asarray(as_numpy(v)) for k, v in inputs.items()}
            return tuple(map(self.numpy, self.plain_ops.selective_state_update_jnp(
                **inputs, **options, compute_dtype=self.jnp.float64)))

    def plain_ops_ssd(self, inputs, **options):
        """``ssd_chunked_jnp`` in float64 (the metadata concrete): (out, states)."""
        inputs, options = self._plain_ssd_args(inputs, options)
        with self.jax.enable_x64(True):
            return tuple(map(self.numpy, self.plain_ops.ssd_chunked_jnp(
                **{k: as_numpy(v) for k, v in inputs.items()}, **options,
                compute_dtype=self.jnp.float64)))

    def array(self, values: np.ndarray, dtype: str):
        return self.jnp.asarray(values.astype(np.float32) if values.dtype.kind == "f" else values,
                                dtype=getattr(self.jnp, dtype))

    def run_kernel(self, inputs, **options):
        return tuple(map(self.numpy, self.impl.selective_state_update(**inputs, **options)))

    def decode_step(self, state, **args):
        """One selective_state_update: (out, new_state)."""
        return self.impl.selective_state_update(state, **args)

    def run_ssd(self, inputs, **options):
        """Chunked-scan kernel: (out, states) as float64 numpy."""
        options = dict(options, state_dtype=getattr(self.jnp, options["state_dtype"]))
        return tuple(map(self.numpy, self.impl.mamba_chunk_scan_combined_varlen(**inputs, **options)))

    def run_conv(self, function, inputs, **options):
        """``causal_conv1d_fn`` / ``_update``: (out, new_state) as float64 numpy."""
        return tuple(map(self.numpy, getattr(self.impl, function)(**inputs, **options)))

    def run_mixer(self, mixer, hidden_states: np.ndarray, cache, metadata) -> np.ndarray:
        """One mixer forward on ``cache`` (updated in place): out as float64 numpy."""
        return self.numpy(mixer.forward_on_cache(self.array(hidden_states, "float32"), cache, metadata))


SIDES = {"torch": TorchSide, "jax": JaxSide}


@pytest.fixture(params=list(SIDES), scope="session")
def side(request):
    return SIDES[request.param]()
