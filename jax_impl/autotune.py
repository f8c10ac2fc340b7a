"""First-use autotuning of the state update's launch config and the explicit
warm-up, on scratch buffers (never the caller's state). The lookup order and
the cache: ``bridge.spec.launch_config``. Mirror: ``torch_impl/autotune.py``."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from bridge.spec import launch_config as lc
from jax_impl import platform

REPEATS = 5  # timed samples per candidate, median taken


def on_gpu() -> bool:
    return platform.ON_GPU


def scratch_timer(shape: lc.SsuShape) -> Callable[[], float]:
    """Seconds per step of ``selective_state_update`` on scratch buffers of
    ``shape`` with the config the lookup gives (traced afresh per call): each
    sample is one jitted loop through disjoint slot sets of a scratch cache
    (``SsuShape.scratch_sets``) so the state comes from memory. The fixed
    cost of a dispatch is in every candidate's time alike."""
    from jax_impl.selective_state_update import selective_state_update  # imports this module

    sets = shape.scratch_sets(lc.SCRATCH_ROTATE_BYTES if on_gpu() else 0)
    inputs = {k: jnp.asarray(v) for k, v in shape.scratch_inputs(sets).items()}
    index_sets = inputs.pop("index_sets")
    state_shape = (1 + sets * shape.batch, shape.nheads, shape.headdim, shape.dstate)

    def rotate(state, out):
        def step(i, carry):
            out, state = selective_state_update(carry[1], **inputs, out=carry[0], dt_softplus=True,
                                                state_batch_indices=index_sets[i])
            return out, state
        return jax.lax.fori_loop(0, sets, step, (out, state))[::-1]

    def time_step() -> float:
        jitted = jax.jit(rotate, donate_argnums=(0, 1))  # a new trace: the pinned config applies
        carry = jax.block_until_ready(jitted(jnp.zeros(state_shape, shape.state_dtype),
                                             jnp.zeros_like(inputs["x"])))  # compiles
        samples = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            carry = jax.block_until_ready(jitted(*carry))
            samples.append((time.perf_counter() - start) / sets)
        return statistics.median(samples)
    return time_step


@dataclasses.dataclass(frozen=True)
class SsuTuner:
    """Times launch configs on the default device (``bridge.spec.launch_config.SsuTuner``);
    ``traced``: the caller's state is a tracer."""
    traced: bool

    def blocked(self) -> Optional[str]:
        # A new array is a tracer inside jit even when the state is a closed-over constant.
        if self.traced or isinstance(jnp.zeros(()), jax.core.Tracer):
            return "inside JAX tracing"
        return None

    def scratch_timer(self, shape: lc.SsuShape) -> Callable[[], float]:
        return scratch_timer(shape)


TUNERS = {traced: SsuTuner(traced) for traced in (False, True)}


def tuner(traced: bool) -> Optional[SsuTuner]:
    """The tuner for a call whose state is (``traced``) or is not a tracer;
    None off the GPU, where timings mean nothing (no autotuning there, and
    no warning)."""
    return TUNERS[traced] if on_gpu() else None


def warmup_launch_configs(*, nheads: int, headdim: int, dstate: int, state_dtype: str = "float32",
                          batches: Sequence[int] = lc.WARMUP_BATCHES,
                          is_blackwell: bool = False) -> dict[int, lc.LaunchConfig]:
    """``{batch: (BLOCK_SIZE_M, num_warps)}`` of the state update for a
    state of (nheads, headdim, dstate) in ``state_dtype`` ('float32',
    'float16' or 'bfloat16') at each batch, autotuned now on the default GPU
    where no override, shipped or cached file answers, and written to the
    user cache. Call it before tracing (``jax.jit``); RuntimeError without a GPU."""
    from jax_impl.selective_state_update import SSU_CONFIGS  # imports this module

    return SSU_CONFIGS.warmup(nheads=nheads, headdim=headdim, dstate=dstate, state_dtype=state_dtype,
                              batches=batches, tuner=tuner(False), is_blackwell=is_blackwell,
                              device_name=platform.device_name())
