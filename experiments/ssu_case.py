"""The state update (one Mamba-2 decode step) as the experiments run it, for
every implementation: inputs, the float64 check, and timing on a scratch
copy of the cache.

The cache holds ``num_sets`` disjoint sets of ``batch`` slots (plus slot 0,
the null block) and one timed call makes one step per set, so consecutive
steps never touch the same state: with ``rotate_bytes`` = 2x the L2 size the
state a step reads was last touched more than an L2's worth of traffic ago,
as in a real server where the layers between two steps evict it. The small
per-step inputs (x, B, C, z, out) stay the same and may hit in L2, as they
would coming from the previous layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import torch_impl  # before triton: interpreter mode on CPU
import torch
import jax
import jax.numpy as jnp

import jax_impl
from experiments.timing import rel_error, time_jax, time_torch
from jax_impl import reference as jax_reference
from torch_impl import reference as torch_reference

MAMBA2_2P7B = dict(nheads=80, headdim=64, dstate=128, ngroups=1)
OPTIONS = dict(dt_softplus=True)

# name -> (function, framework, whether the torch step can be captured in a CUDA graph)
IMPLEMENTATIONS = {
    "triton": (lambda **kw: torch_impl.selective_state_update(**kw, validate_indices=False),
               "torch", True),
    "torch-reference": (torch_reference.selective_state_update_torch_ops, "torch", False),
    "pallas": (jax_impl.selective_state_update, "jax", None),
    "xla-reference": (jax_reference.selective_state_update_jnp, "jax", None),
}


@dataclass
class DecodeCase:
    """Inputs of one decode step (tied per-head dt/A/dt_bias, D, z) on a
    cache of ``1 + num_sets * batch`` slots, as float32 numpy arrays."""

    batch: int
    nheads: int
    headdim: int
    dstate: int
    ngroups: int
    state_dtype: str
    state: np.ndarray  # (slots, nheads, headdim, dstate)
    inputs: dict[str, np.ndarray]
    index_sets: np.ndarray  # (num_sets, batch) int32, disjoint, never slot 0

    @property
    def state_bytes_per_step(self) -> int:
        """State bytes a step reads and writes (the traffic that matters)."""
        itemsize = 4 if self.state_dtype == "float32" else 2
        return 2 * self.batch * self.nheads * self.headdim * self.dstate * itemsize

    def shape(self) -> dict:
        return dict(batch=self.batch, nheads=self.nheads, headdim=self.headdim, dstate=self.dstate,
                    ngroups=self.ngroups, state_dtype=self.state_dtype,
                    cache_slots=len(self.state), index_sets=len(self.index_sets))


def state_itemsize(state_dtype: str) -> int:
    return 4 if state_dtype == "float32" else 2


def make_decode_case(batch, nheads, headdim, dstate, ngroups, state_dtype, rotate_bytes,
                     seed=0) -> DecodeCase:
    """Enough disjoint index sets (at least 2) that one rotation reads at
    least ``rotate_bytes`` of state."""
    set_bytes = batch * nheads * headdim * dstate * state_itemsize(state_dtype)
    num_sets = max(2, math.ceil(rotate_bytes / set_bytes))
    rng = np.random.default_rng(seed)
    slots = 1 + num_sets * batch
    r = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    inputs = dict(x=r(batch, nheads, headdim), dt=r(batch, nheads) * 0.5, A=-np.exp(r(nheads) * 0.5),
                  B=r(batch, ngroups, dstate), C=r(batch, ngroups, dstate), D=r(nheads),
                  dt_bias=r(nheads) * 0.5, z=r(batch, nheads, headdim))
    index_sets = rng.permutation(np.arange(1, slots, dtype=np.int32)).reshape(num_sets, batch)
    return DecodeCase(batch, nheads, headdim, dstate, ngroups, state_dtype,
                      r(slots, nheads, headdim, dstate), inputs, index_sets)


def prepare(case: DecodeCase, framework: str) -> tuple[dict, object, list]:
    """(inputs, cache in the state dtype, index sets) on the framework's default device."""
    if framework == "torch":
        device = torch_impl.platform.default_device()
        inputs = {k: torch.from_numpy(v).to(device) for k, v in case.inputs.items()}
        state = torch.from_numpy(case.state).to(device).to(getattr(torch, case.state_dtype))
        return inputs, state, [torch.from_numpy(s).to(device) for s in case.index_sets]
    inputs = {k: jnp.asarray(v) for k, v in case.inputs.items()}
    state = jnp.asarray(case.state).astype(getattr(jnp, case.state_dtype))
    return inputs, state, [jnp.asarray(s) for s in case.index_sets]


def float64_reference(case: DecodeCase) -> tuple[np.ndarray, np.ndarray]:
    """(out, new state of the last index set's slots) in float64, from the
    cache rounded to the state dtype as the kernels see it. Computed on a
    compact cache (the null block and the last set only): the same math, a
    fraction of the memory."""
    device = torch_impl.platform.default_device()
    compact = case.state[np.concatenate([[0], case.index_sets[-1]])]
    state = torch.from_numpy(compact).to(device).to(getattr(torch, case.state_dtype))
    inputs = {k: torch.from_numpy(v).to(device) for k, v in case.inputs.items()}
    indices = torch.arange(1, case.batch + 1, dtype=torch.int32, device=device)
    out, new_state = torch_reference.selective_state_update_ref(
        state, **inputs, state_batch_indices=indices, **OPTIONS)
    return out.cpu().numpy(), new_state[1:].cpu().numpy()


# The check: one rotation on a scratch copy of the cache. The sets are
# disjoint, so afterwards the last set's slots hold one step from the initial
# cache and ``out`` the last step's output, which float64_reference computes.
# The timing then goes on rotating on that scratch copy.

def _torch_check_and_time(update, graph, prepared, repeats):
    inputs, state, index_sets = prepared
    out = torch.zeros_like(inputs["x"])
    scratch = state.clone()

    def rotation():
        for indices in index_sets:
            update(state=scratch, **inputs, out=out, state_batch_indices=indices, **OPTIONS)

    rotation()
    # copies: on CPU .numpy() would share memory with tensors the timing overwrites
    got = tuple(t.to("cpu", torch.float32, copy=True).numpy()
                for t in (out, scratch[index_sets[-1].long()]))
    return got, time_torch(rotation, repeats, graph)


def _jax_check_and_time(update, prepared, repeats):
    """Freshly jitted, so a pinned launch config takes effect (block sizes are
    static: each config is its own trace). Each step's ``out`` feeds the
    next step, so XLA cannot drop it."""
    inputs, state, index_sets = prepared

    def rotate(carry, inputs, index_sets):
        state, out = carry
        for indices in index_sets:
            out, state = update(state, **inputs, out=out, state_batch_indices=indices, **OPTIONS)
        return state, out

    rotation = jax.jit(rotate, donate_argnums=0)
    scratch, out = rotation((jnp.copy(state), jnp.zeros_like(inputs["x"])), inputs, index_sets)
    got = (np.asarray(out.astype(jnp.float32)),
           np.asarray(scratch[index_sets[-1]].astype(jnp.float32)))
    return got, time_jax(lambda carry: rotation(carry, inputs, index_sets), (scratch, out), repeats)


def measure(case: DecodeCase, implementation: str, prepared, want, repeats: int) -> dict:
    """Errors vs the float64 ``want`` and median seconds per step of one
    implementation; ``prepared`` is ``prepare(case, <its framework>)``."""
    update, framework, graph = IMPLEMENTATIONS[implementation]
    if framework == "torch":
        (out, state), seconds = _torch_check_and_time(update, graph, prepared, repeats)
    else:
        (out, state), seconds = _jax_check_and_time(update, prepared, repeats)
    seconds /= len(case.index_sets)
    return dict(max_rel_error_out=rel_error(out, want[0]),
                max_rel_error_state=rel_error(state, want[1]),
                median_us=seconds * 1e6, state_GBps=case.state_bytes_per_step / seconds / 1e9)
