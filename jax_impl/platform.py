"""Where the Pallas kernels run: compiled (Triton backend) on a GPU, else in
Pallas' interpreter on the CPU."""

import jax

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU


def default_device() -> jax.Device:
    return jax.devices()[0]


def device_name(device: jax.Device | None = None) -> str:
    device = device or default_device()
    return device.device_kind if device.platform == "gpu" else "cpu"


def is_concrete(array) -> bool:
    """A value known on the host (not traced under ``jax.jit``): index values
    can then be checked before a kernel runs."""
    return not isinstance(array, jax.core.Tracer)
