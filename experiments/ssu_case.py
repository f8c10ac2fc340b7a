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
from experiments.shapes import MAMBA2_2P7B_HEADS as MAMBA2_2P7B
from experiments.timing import rel_error, time_jax, time_torch
from jax_impl import reference as jax_reference
from torch_impl import reference as torch_reference

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
    state = torch.from_numpy(compact).to(device).to(getattr(torch, case.state_dtype)).double()
    inputs = {k: torch.from_numpy(v).to(device) for k, v in case.inputs.items()}
    indices = torch.arange(1, case.batch + 1, dtype=torch.int32, device=device)
    out = torch.zeros(inputs["x"].shape, dtype=torch.float64, device=device)
    torch_reference.selective_state_update_torch_ops(
        state, **inputs, state_batch_indices=indices, out=out, **OPTIONS, compute_dtype=torch.float64)
    return out.cpu().numpy(), state[1:].cpu().numpy()


def rotation(implementation: str, prepared) -> tuple:
    """``(rotate, result)`` for one implementation on ``prepared`` (its
    framework's ``prepare``): ``rotate()`` makes one step per index set on a
    scratch copy of the cache (JAX: jitted afresh, so a pinned launch config
    takes effect, with the scratch cache donated; returns it). The sets are
    disjoint, so after one rotation ``result()`` — (out of the last step, the
    last set's slots), float32 numpy — is one step from the initial cache,
    which ``float64_reference`` computes. Timing goes on rotating."""
    update, framework, _ = IMPLEMENTATIONS[implementation]
    inputs, state, index_sets = prepared
    if framework == "torch":
        out = torch.full_like(inputs["x"], float("nan"))  # poisoned: every step overwrites it
        scratch = state.clone()

        def rotate():
            for indices in index_sets:
                update(state=scratch, **inputs, out=out, state_batch_indices=indices, **OPTIONS)

        def result():
            # copies: on CPU .numpy() would share memory with tensors the timing overwrites
            return tuple(t.to("cpu", torch.float32, copy=True).numpy()
                         for t in (out, scratch[index_sets[-1].long()]))
        return rotate, result

    def rotate_sets(carry, inputs, index_sets):
        state, out = carry
        for indices in index_sets:  # each step's out feeds the next: XLA cannot drop it
            out, state = update(state, **inputs, out=out, state_batch_indices=indices, **OPTIONS)
        return state, out

    jitted = jax.jit(rotate_sets, donate_argnums=0)
    carry = [(jnp.copy(state), jnp.full_like(inputs["x"], jnp.nan))]

    def rotate():
        carry[0] = jitted(carry[0], inputs, index_sets)
        return carry[0]

    def result():
        scratch, out = carry[0]
        return (np.asarray(out.astype(jnp.float32)),
                np.asarray(scratch[index_sets[-1]].astype(jnp.float32)))
    return rotate, result


def measure(case: DecodeCase, implementation: str, prepared, want, repeats: int) -> dict:
    """Errors vs the float64 ``want`` and median seconds per step of one
    implementation; ``prepared`` is ``prepare(case, <its framework>)``."""
    _, framework, graph = IMPLEMENTATIONS[implementation]
    rotate, result = rotation(implementation, prepared)
    rotate()
    out, state = result()
    seconds = (time_torch(rotate, repeats, graph) if framework == "torch" else
               time_jax(lambda _: rotate(), None, repeats))
    seconds /= len(case.index_sets)
    return dict(max_rel_error_out=rel_error(out, want[0]),
                max_rel_error_state=rel_error(state, want[1]),
                median_us=seconds * 1e6, state_GBps=case.state_bytes_per_step / seconds / 1e9)
