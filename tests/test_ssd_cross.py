"""Triton against Pallas on the very same inputs: the torch tensors are
shared with JAX through the bridge (no copy), so both chunked scans read
identical bits."""

import pytest

from frameworks import JaxSide, TorchSide
from ssd_cases import CI_CROSS_CASES, CROSS_CASES, assert_ssd_close, ci_subset, make_ssd_inputs


@pytest.fixture(scope="module")
def sides():
    return TorchSide(), JaxSide()


# Small CPU tensors (A, D, indices) may sit off XLA's 64-byte alignment; those few are copied.
@pytest.mark.filterwarnings("ignore::bridge.dlpack.BridgeCopyWarning")
@pytest.mark.parametrize("case", ci_subset(CROSS_CASES, CI_CROSS_CASES), ids=str)
def test_triton_matches_pallas(sides, case, rng):
    import bridge
    torch_side, jax_side = sides
    arrays, dtypes, options = make_ssd_inputs(case, rng)
    torch_inputs = torch_side.native(arrays, dtypes)
    jax_inputs = {k: bridge.to_jax(v, copy_ok=True) for k, v in torch_inputs.items()}
    assert jax_inputs["x"].unsafe_buffer_pointer() == torch_inputs["x"].data_ptr()
    t_out, t_states = torch_side.run_ssd(torch_inputs, **options)
    j_out, j_states = jax_side.run_ssd(jax_inputs, **options)
    assert_ssd_close(t_out, j_out, case.input_dtype, f"triton vs pallas out, {case}")
    assert_ssd_close(t_states, j_states, max(case.input_dtype, case.state_dtype, key=_looseness),
                     f"triton vs pallas states, {case}")


def _looseness(dtype):
    return ["float32", "float16", "bfloat16"].index(dtype)
