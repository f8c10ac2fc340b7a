"""Triton against Pallas on the very same inputs: the torch tensors are
shared with JAX through DLPack (no copy), so both kernels read identical bits."""

import numpy as np
import pytest

from frameworks import JaxSide, TorchSide, assert_close
from ssu_cases import SsuCase, case_params, make_inputs


@pytest.fixture(scope="module")
def sides():
    return TorchSide(), JaxSide()


def share(jax, torch_inputs):
    return {k: jax.dlpack.from_dlpack(v) for k, v in torch_inputs.items()}


@pytest.mark.parametrize("case", case_params())
def test_triton_matches_pallas(sides, case, rng):
    torch_side, jax_side = sides
    arrays, dtypes, options = make_inputs(case, rng)
    torch_inputs = torch_side.native(arrays, dtypes)
    jax_inputs = share(jax_side.jax, torch_inputs)
    assert jax_inputs["x"].unsafe_buffer_pointer() == torch_inputs["x"].data_ptr()
    t_out, t_state = torch_side.run_kernel(torch_inputs, **options)
    j_out, j_state = jax_side.run_kernel(jax_inputs, **options)
    assert_close(t_out, j_out, case.input_dtype, f"triton vs pallas out, {case}")
    assert_close(t_state, j_state, case.state_dtype, f"triton vs pallas state, {case}")


def stochastic_case(rng, num_copies):
    """num_copies sequences with identical inputs, each in its own fp16 slot:
    the copies differ only in their random rounding."""
    case = SsuCase(batch=1, nheads=2, dim=16, dstate=16, ngroups=1, indices="none",
                   state_dtype="float16")
    arrays, dtypes, options = make_inputs(case, rng)
    arrays = {k: (np.repeat(v, num_copies, axis=0) if k not in ("A", "D", "dt_bias") else v)
              for k, v in arrays.items()}
    return arrays, dtypes, options


def rounding_error_in_ulps(states, exact):
    """|mean over copies - exact| in units of the local fp16 spacing."""
    spacing = np.abs(np.spacing(exact.astype(np.float16)).astype(np.float64))
    return np.abs(states.mean(axis=0) - exact) / spacing


@pytest.mark.parametrize("name", [pytest.param("torch", marks=pytest.mark.slow), "jax"])
def test_stochastic_rounding_is_unbiased(sides, name, rng):
    side = dict(zip(["torch", "jax"], sides))[name]
    num_copies = 256
    arrays, dtypes, options = stochastic_case(rng, num_copies)
    inputs = side.native(arrays, dtypes)
    _, want_state = side.run_reference(inputs, **options)
    exact = want_state[0]
    _, nearest = side.run_kernel(inputs, **options)
    _, rounded = side.run_kernel(inputs, **options, enable_stochastic_rounding=True,
                                 rounding_seed=int(rng.integers(2**32)))
    nearest, rounded = nearest[:num_copies], rounded[:num_copies]  # the updated slots
    # Every value is one of the two fp16 neighbours of the exact value.
    f16 = exact.astype(np.float16)
    down = np.nextafter(f16, np.float16(-np.inf)).astype(np.float64)
    up = np.nextafter(f16, np.float16(np.inf)).astype(np.float64)
    here = f16.astype(np.float64)
    assert np.all((rounded == down) | (rounded == here) | (rounded == up))
    # Round-to-nearest is biased by ~0.25 ulp on average; stochastic rounding's
    # mean over 256 copies lands within ~0.03 ulp. The first check shows the
    # measure can tell the two apart.
    assert rounding_error_in_ulps(nearest, exact).mean() > 0.15
    assert rounding_error_in_ulps(rounded, exact).mean() < 0.08
    # Copies differ: the random stream is not shared between sequences.
    assert (rounded != rounded[:1]).any()


def test_same_seed_rounds_alike_in_both_frameworks(sides, rng):
    torch_side, jax_side = sides
    arrays, dtypes, options = stochastic_case(rng, 64)
    torch_inputs = torch_side.native(arrays, dtypes)
    seed = int(rng.integers(2**32))
    _, t_state = torch_side.run_kernel(torch_inputs, **options, enable_stochastic_rounding=True,
                                       rounding_seed=seed)
    _, j_state = jax_side.run_kernel(share(jax_side.jax, torch_inputs), **options,
                                     enable_stochastic_rounding=True, rounding_seed=seed)
    _, other = jax_side.run_kernel(share(jax_side.jax, torch_inputs), **options,
                                   enable_stochastic_rounding=True, rounding_seed=seed ^ 1)
    t_state, j_state, other = t_state[:64], j_state[:64], other[:64]  # the updated slots
    # Same philox stream: equal bits except where the fp32 value differs by an ulp.
    assert np.mean(t_state == j_state) > 0.99
    assert np.mean(other == j_state) < 0.95, "a different seed must round differently"
