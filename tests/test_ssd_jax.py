"""The JAX chunked scan (SSD prefill): Pallas kernels against the float64
references, and the two references against each other.

Small shapes: without a GPU the kernels run in Pallas' interpreter."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridge.ssd_contract import chunk_metadata
from jax_impl import mamba_chunk_scan_combined, mamba_chunk_scan_combined_varlen
from jax_impl.reference import ssd_chunked_ref, ssd_sequential_ref

# By input dtype (bf16 inputs round the kernels' tiles before their products),
# relative to the result's max |value|.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
MIXED = "mixed"  # a random mix of sequence lengths


@dataclasses.dataclass(frozen=True)
class Case:
    lengths: tuple | str = (MIXED,)
    chunk_size: int = 16
    nheads: int = 4
    headdim: int = 16
    dstate: int = 16
    ngroups: int = 1
    dtype: str = "float32"
    initial_states: bool = False
    D: Optional[str] = None  # "head" (H,) or "full" (H, P)
    z: bool = False
    dt_bias: bool = False
    dt_softplus: bool = False
    dt_limit: tuple = (0.0, float("inf"))
    intermediate: bool = False
    state_dtype: Optional[str] = None
    resumed: bool = False  # chunk metadata of a prefill that resumes each sequence

    def __str__(self):
        fields = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                  if getattr(self, f.name) != f.default]
        return ",".join(fields) or "default"


def sequence_lengths(case: Case, rng) -> list[int]:
    L = case.chunk_size
    if case.lengths == (MIXED,):
        return [int(n) for n in rng.integers(1, 3 * L, size=4)]
    return [{"L-1": L - 1, "L": L, "L+1": L + 1}.get(n, n) for n in case.lengths]


def make_inputs(case: Case, rng):
    """(arrays as jnp in the case's dtype, options) for the varlen call."""
    lengths = sequence_lengths(case, rng)
    cu_seqlens = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    T, Q, L = cu_seqlens[-1], len(lengths), case.chunk_size
    computed = None
    if case.resumed:  # never a multiple of chunk_size: every first chunk is short
        computed = L * rng.integers(0, 3, size=Q) + rng.integers(1, L, size=Q)
    metadata = chunk_metadata(cu_seqlens, L, num_computed_tokens=computed)
    H, P, N, G = case.nheads, case.headdim, case.dstate, case.ngroups
    normal = lambda *shape: rng.standard_normal(shape)  # noqa: E731
    # Without softplus dt is used as given, so it must be positive.
    dt = rng.uniform(-4.0, 1.0, (T, H)) if case.dt_softplus else rng.uniform(0.005, 0.3, (T, H))
    arrays = dict(x=normal(T, H, P), dt=dt, A=-rng.uniform(0.5, 4.0, H), B=normal(T, G, N),
                  C=normal(T, G, N))
    if case.initial_states:
        arrays["initial_states"] = normal(Q, H, P, N)
    if case.D:
        arrays["D"] = normal(H) if case.D == "head" else normal(H, P)
    if case.z:
        arrays["z"] = normal(T, H, P)
    if case.dt_bias:
        arrays["dt_bias"] = rng.uniform(-0.5, 0.5, H)
    arrays = {k: jnp.asarray(v, case.dtype) for k, v in arrays.items()}
    arrays["A"] = arrays["A"].astype(jnp.float32)
    options = dict(chunk_size=case.chunk_size, cu_seqlens=jnp.asarray(cu_seqlens),
                   cu_chunk_seqlens=jnp.asarray(metadata.cu_chunk_seqlens),
                   last_chunk_indices=jnp.asarray(metadata.last_chunk_indices),
                   seq_idx=jnp.asarray(metadata.seq_idx), dt_softplus=case.dt_softplus,
                   dt_limit=case.dt_limit)
    return arrays, options


def run_references(arrays, options, intermediate=False):
    """((out, states) of the chunked reference, (out, final_states) of the
    sequential one), float64 numpy, from the same (possibly bf16) inputs."""
    math = {k: options[k] for k in ("dt_softplus", "dt_limit")}
    chunked = ssd_chunked_ref(**arrays, **math, chunk_size=options["chunk_size"],
                              cu_chunk_seqlens=options["cu_chunk_seqlens"],
                              seq_idx=options["seq_idx"],
                              last_chunk_indices=options["last_chunk_indices"],
                              return_intermediate_states=intermediate)
    sequential = ssd_sequential_ref(**arrays, **math, cu_seqlens=options["cu_seqlens"])
    return chunked, sequential


def assert_close(got, want, dtype: str, what: str):
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    error = np.abs(got - want).max() / np.abs(want).max()
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.2e}"


CASES = [
    Case(lengths=(1,)),
    Case(lengths=("L-1", "L", "L+1"), initial_states=True, D="head", z=True, dt_bias=True,
         dt_softplus=True, dt_limit=(0.02, 0.5), intermediate=True),
    Case(ngroups=4, D="full", z=True),
    Case(ngroups=2, initial_states=True, dt_bias=True, dt_softplus=True, resumed=True),
    Case(lengths=(40,), chunk_size=32, headdim=32, dstate=32, nheads=2, ngroups=2,
         initial_states=True, intermediate=True),
    Case(ngroups=2, dtype="bfloat16", initial_states=True, D="full", z=True, dt_bias=True,
         dt_softplus=True, intermediate=True),
    Case(lengths=("L-1", "L+1"), dtype="bfloat16", D="head", dt_limit=(0.0, 0.1),
         state_dtype="float32"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_float64_references(case, rng):
    arrays, options = make_inputs(case, rng)
    out, states = mamba_chunk_scan_combined_varlen(
        **arrays, **options, return_intermediate_states=case.intermediate,
        state_dtype=case.state_dtype)
    (_, chunked_states), (sequential_out, final_states) = run_references(
        arrays, options, case.intermediate)
    assert out.dtype == arrays["x"].dtype
    assert states.dtype == (case.state_dtype or arrays["C"].dtype)  # default: C's dtype
    assert_close(out, sequential_out, case.dtype, f"out, {case}")
    assert_close(states, chunked_states, case.dtype, f"states, {case}")
    if not case.intermediate:
        assert_close(states, final_states, case.dtype, f"final states, {case}")


def test_references_agree(rng):
    """Sequential recurrence and chunked-quadratic form, every option on; the
    chunk-end states of the last chunks are the final states."""
    case = Case(ngroups=2, initial_states=True, D="full", z=True, dt_bias=True, dt_softplus=True,
                dt_limit=(0.02, 0.8), resumed=True)
    arrays, options = make_inputs(case, rng)
    (chunked_out, chunk_end_states), (sequential_out, final_states) = run_references(
        arrays, options, intermediate=True)
    np.testing.assert_allclose(chunked_out, sequential_out, rtol=1e-10, atol=1e-10)
    last = np.asarray(options["last_chunk_indices"])
    np.testing.assert_allclose(chunk_end_states[last], final_states, rtol=1e-10, atol=1e-10)


def test_out_poisoned_and_donated_under_jit(rng):
    """Under jit with `out` donated, the kernel writes every row of the NaN
    `out` in place."""
    case = Case(lengths=(5, "L+1"), ngroups=2, D="head")
    arrays, options = make_inputs(case, rng)
    static = ("chunk_size", "dt_softplus", "dt_limit")
    call = jax.jit(mamba_chunk_scan_combined_varlen, static_argnames=static,
                   donate_argnames="out")
    poisoned = jnp.full(arrays["x"].shape, jnp.nan, arrays["x"].dtype) + 0  # XLA-owned buffer
    out, _ = call(**arrays, **options, out=poisoned)
    assert poisoned.is_deleted(), "`out` was not donated"
    _, (sequential_out, _) = run_references(arrays, options)
    assert_close(out, sequential_out, case.dtype, "donated out")


@pytest.mark.parametrize("with_seq_idx", [False, True])
def test_batched_form(with_seq_idx, rng):
    """(batch, seqlen, ...) with initial states for each row's first sequence;
    with seq_idx a row holds several sequences."""
    batch, seqlen, H, P, N, G, L = 2, 20, 2, 16, 16, 1, 16
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    x, z = normal(batch, seqlen, H, P), normal(batch, seqlen, H, P)
    B, C = normal(batch, seqlen, G, N), normal(batch, seqlen, G, N)
    dt = jnp.asarray(rng.uniform(-3.0, 0.5, (batch, seqlen, H)), jnp.float32)
    A = -jnp.asarray(rng.uniform(0.5, 2.0, H), jnp.float32)
    D, initial = normal(H), normal(batch, H, P, N)
    # Row 0: one sequence; with seq_idx, row 1 splits at token 7 into two.
    seq_idx = None
    if with_seq_idx:
        seq_idx = np.array([[0] * seqlen, [0] * 7 + [1] * (seqlen - 7)], np.int32)
    out, final_states = mamba_chunk_scan_combined(
        x, dt, A, B, C, L, D=D, z=z, initial_states=initial, seq_idx=seq_idx, dt_softplus=True,
        return_final_states=True)

    lengths = [seqlen, 7, seqlen - 7] if with_seq_idx else [seqlen, seqlen]
    cu_seqlens = np.concatenate([[0], np.cumsum(lengths)])
    flat = lambda a: a.reshape((batch * seqlen,) + a.shape[2:])  # noqa: E731
    # Each row's initial state starts its first sequence; the others start from 0.
    initial_per_seq = np.zeros((len(lengths), H, P, N), np.float32)
    initial_per_seq[[0, 1]] = initial
    want_out, want_states = ssd_sequential_ref(
        flat(x), flat(dt), A, flat(B), flat(C), cu_seqlens, D=D, z=flat(z),
        initial_states=initial_per_seq, dt_softplus=True)
    assert out.shape == x.shape and final_states.shape == initial.shape
    assert_close(flat(out), want_out, "float32", "batched out")
    assert_close(final_states, want_states[[0, len(lengths) - 1]], "float32",
                 "batched final states")


def test_inconsistent_metadata_raises(rng):
    arrays, options = make_inputs(Case(lengths=(5, "L+1")), rng)
    options["last_chunk_indices"] = jnp.zeros_like(options["last_chunk_indices"])
    with pytest.raises(ValueError, match="last_chunk_indices"):
        mamba_chunk_scan_combined_varlen(**arrays, **options)
