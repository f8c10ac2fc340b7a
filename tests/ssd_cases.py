"""Framework-neutral test cases for the chunked scan: each case is a set of
options, turned into fresh random numpy inputs per test run."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import pytest

from bridge.spec.ssd_contract import INDEX_ARGS, chunk_metadata
from frameworks import assert_close

# bfloat16 casts the scaled operands of every tensor-core product: looser
# than the tests' default for the dtype.
BF16_TOLERANCE = 3e-2


@dataclasses.dataclass(frozen=True)
class SsdCase:
    seqlens: tuple = (1, 15, 16, 17, 40)  # or "random": 1-5 sequences of 1-50 tokens per run
    computed: Optional[tuple] = None  # tokens already in the cache (resumed prefill)
    chunk_size: int = 16
    nheads: int = 4
    headdim: int = 16
    dstate: int = 16
    ngroups: int = 2
    D: str = "head"              # head | full | none
    has_z: bool = True
    has_dt_bias: bool = True
    softplus: bool = True
    dt_limit: tuple = (0.0, float("inf"))
    initial_states: bool = True
    intermediate: bool = False
    input_dtype: str = "float32"
    state_dtype: str = "float32"

    def __str__(self):
        fields, default = dataclasses.asdict(self), dataclasses.asdict(SsdCase())
        return ",".join(f"{k}={v}" for k, v in fields.items() if v != default[k]) or "default"


CASES = [
    SsdCase(),
    SsdCase(seqlens=(1,)), SsdCase(seqlens=(15,)), SsdCase(seqlens=(16,)), SsdCase(seqlens=(17,)),
    SsdCase(seqlens=(70,), initial_states=False),
    SsdCase(intermediate=True),
    SsdCase(computed=(0, 3, 16, 9, 33), intermediate=True),
    SsdCase(ngroups=1, D="full"), SsdCase(ngroups=4, D="none", has_z=False),
    SsdCase(has_dt_bias=False, softplus=False, initial_states=False),
    SsdCase(dt_limit=(0.05, 0.6)),
    SsdCase(chunk_size=32, headdim=24, dstate=32, seqlens=(31, 33, 5)),
    SsdCase(nheads=2, headdim=64, dstate=64, ngroups=1, seqlens=(20, 9)),
    SsdCase(nheads=2, headdim=32, dstate=128, ngroups=2, seqlens=(18,), intermediate=True),
    SsdCase(seqlens="random"), SsdCase(seqlens="random", chunk_size=32, ngroups=1),
    SsdCase(input_dtype="bfloat16"),
    SsdCase(input_dtype="bfloat16", state_dtype="bfloat16", intermediate=True),
    SsdCase(input_dtype="float16", state_dtype="float16", ngroups=1),
]
# A cross-framework subset (each case runs both kernels).
CROSS_CASES = [CASES[i] for i in (0, 7, 8, 11, 12, 15, 18)]
assert CROSS_CASES[-1].state_dtype == "bfloat16" and CROSS_CASES[5].seqlens == "random"
# What CI (CPU interpreters) runs of the JAX side and of the cross subset; the GPU runs all.
CI_JAX_CASES = [CASES[i] for i in (0, 4, 7, 9, 12, 18)]
CI_CROSS_CASES = [CROSS_CASES[i] for i in (0, 5, 6)]


def ci_subset(cases, ci_cases, **slow):
    """``cases`` as pytest params, those outside ``ci_cases`` marked slow (``slow``: its kwargs)."""
    return [case if case in ci_cases else pytest.param(case, marks=pytest.mark.slow(**slow))
            for case in cases]

def make_ssd_inputs(case: SsdCase, rng: np.random.Generator):
    """Returns (arrays, dtypes, options): numpy arrays by argument name, the
    dtype each should have, and the keyword options. ``out`` is poisoned
    with NaN so that an element the kernel fails to write fails the test."""
    seqlens = (rng.integers(1, 51, size=rng.integers(1, 6)) if case.seqlens == "random"
               else np.asarray(case.seqlens))
    cu_seqlens = np.concatenate([[0], np.cumsum(seqlens)])
    T, H, P, N, G, Q = int(cu_seqlens[-1]), case.nheads, case.headdim, case.dstate, case.ngroups, len(seqlens)
    metadata = chunk_metadata(cu_seqlens, case.chunk_size, case.computed)

    def r(*shape, scale=1.0):
        return rng.standard_normal(shape) * scale

    arrays = {
        "x": r(T, H, P), "dt": r(T, H, scale=0.5), "A": -np.exp(r(H, scale=0.5)),
        "B": r(T, G, N), "C": r(T, G, N),
        "cu_seqlens": cu_seqlens, "cu_chunk_seqlens": metadata.cu_chunk_seqlens,
        "seq_idx": metadata.seq_idx, "last_chunk_indices": metadata.last_chunk_indices,
        "out": np.full((T, H, P), np.nan),
    }
    if case.D != "none":
        arrays["D"] = r(H) if case.D == "head" else r(H, P)
    if case.has_z:
        arrays["z"] = r(T, H, P)
    if case.has_dt_bias:
        arrays["dt_bias"] = r(H, scale=0.5)
    if not case.softplus:
        arrays["dt"] = np.abs(arrays["dt"]) + 0.05  # the caller supplies positive steps
    if case.initial_states:
        arrays["initial_states"] = r(Q, H, P, N)
    dtypes = {k: (case.input_dtype if k in ("x", "dt", "B", "C", "z", "out") else "float32")
              for k in arrays}
    dtypes.update({k: "int32" for k in INDEX_ARGS})
    if case.initial_states:
        dtypes["initial_states"] = case.state_dtype
    options = {"chunk_size": case.chunk_size, "dt_softplus": case.softplus,
               "dt_limit": case.dt_limit, "return_intermediate_states": case.intermediate,
               "state_dtype": case.state_dtype}
    return arrays, dtypes, options


def assert_ssd_close(got, want, dtype: str, what: str):
    """Every element written (no NaN where ``want`` has none) and within the
    dtype's tolerance relative to the largest |value|."""
    assert_close(got, want, dtype, what, tol=BF16_TOLERANCE if dtype == "bfloat16" else None)
