"""Where the Pallas kernels run (compiled, Triton lowering, on a GPU; else in
Pallas' interpreter on the CPU), the prologue every wrapper shares, and the
count of attribute assignments on the package's modules."""

import jax
import jax.numpy as jnp
import numpy as np


ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU


def default_device() -> jax.Device:
    return jax.devices()[0]


def device_name(device: jax.Device | None = None) -> str:
    device = device or default_device()
    return device.device_kind if device.platform == "gpu" else "cpu"


class CountsAssignments:
    """Mixin of this package's nnx modules: every attribute assignment on
    one bumps ``assignments()``, so a cached flattening of a model (see
    ``mamba2_lm``) knows its structure may have changed."""

    def __setattr__(self, name, value):
        _assignments[0] += 1
        super().__setattr__(name, value)


_assignments = [0]


def assignments() -> int:
    """Attribute assignments on this package's nnx modules so far."""
    return _assignments[0]


def is_concrete(array) -> bool:
    """A value known on the host (not traced under ``jax.jit``): index values
    can then be checked before a kernel runs."""
    return not isinstance(array, jax.core.Tracer)


def eager_interpreted(launch, operands):
    """``launch`` for an eager call on concrete ``operands`` in the
    interpreter, jitted at XLA's lowest optimisation level: such a call
    compiles its program for one run, so compile time is its cost (about
    halved). Under a GPU or a trace, ``launch`` as it is."""
    if not INTERPRET or not all(map(is_concrete, operands)):
        return launch
    return jax.jit(launch, compiler_options={"xla_backend_optimization_level": 0,
                                             "xla_llvm_disable_expensive_passes": True})


def host_index_values(validate, **indices) -> dict | None:
    """Host (numpy) copies of the given index arrays for the value checks, or
    None when they cannot run (traced under jit) or are switched off
    (``validate=False``). Concrete values are checked by default: an eager JAX
    call is not a serving hot path, and under jit the kernels' device-side
    guards apply (``True`` and ``$MAMBA_TWIN_CHECK_INDICES`` change nothing here).
    Absent arrays are left out."""
    if validate is False:
        return None
    present = {name: array for name, array in indices.items() if array is not None}
    if not all(is_concrete(array) for array in present.values()):
        return None
    return {name: np.asarray(array) for name, array in present.items()}


def int32_indices(array):
    """Index values as int32, the kernels' index type (in x64 mode too);
    int64 values saturate, so that one out of range stays out of range
    (a plain cast would wrap 2**32 + s onto slot s). None stays None."""
    if array is None:
        return None
    if array.dtype == jnp.int64:
        info = jnp.iinfo(jnp.int32)
        array = jnp.clip(array, info.min, info.max)
    return array.astype(jnp.int32)


def inference_only(refuse, function, *arrays):
    """``function(*arrays)``; differentiated (``jax.grad`` / ``jax.vjp`` /
    ``jax.jvp`` through it), a clear error instead of Pallas's on aliasing:
    ``refuse`` is the op's name (a ValueError saying it is inference-only) or
    a callable that raises."""
    wrapped = jax.custom_jvp(function)

    @wrapped.defjvp
    def _refuse(primals, tangents):
        if callable(refuse):
            refuse()
        raise ValueError(f"{refuse} is an inference-only (decode) op: it has no gradient; call "
                         f"it outside jax.grad / jax.vjp")

    return wrapped(*arrays)
