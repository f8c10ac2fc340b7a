"""Each framework's kernel against the float64 reference, over every
option of the contract (see ssu_cases.CASES)."""

import numpy as np
import pytest

from frameworks import assert_close
from ssu_cases import CASES, SsuCase, make_inputs


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_float64_reference(side, case, rng):
    arrays, dtypes, options = make_inputs(case, rng)
    inputs = side.native(arrays, dtypes)
    want_out, want_state = side.run_reference(inputs, **options)
    got_out, got_state = side.run_kernel(inputs, **options)
    assert_close(got_out, want_out, case.input_dtype, f"{side.name} out, {case}")
    assert_close(got_state, want_state, case.state_dtype, f"{side.name} state, {case}")
    # The case really exercised something: some outputs were written.
    assert np.isfinite(got_out).any()
    if case.indices == "padding":
        assert np.isnan(got_out).any(), "padding rows must stay untouched (NaN-poisoned)"


def test_plain_ops_backend_matches_the_reference(side, rng):
    """The package's plain-ops backend (torch ``reference``, JAX ``xla``) in
    float64 agrees with the float64 reference to float64 precision on one
    rich case (spec decoding, groups, z, D)."""
    arrays, dtypes, options = make_inputs(CASES[23], rng)
    dtypes = {k: ("float32" if v.startswith("float") else v) for k, v in dtypes.items()}
    inputs = side.native(arrays, dtypes)
    want_out, want_state = side.run_reference(inputs, **options)
    got_out, got_state = side.plain_ops_ssu(inputs, **options)
    assert_close(got_out, want_out, "float64", "out")
    assert_close(got_state, want_state, "float64", "state")


def test_reference_matches_closed_form_single_step(side, rng):
    """An oracle independent of the reference: one token per sequence, no
    indices, so every slot q < batch is updated from itself in one step."""
    case = CASES[0].__class__(indices="none", ngroups=2)
    arrays, dtypes, options = make_inputs(case, rng)
    dtypes = {k: "float32" for k in dtypes}
    a = {k: side.numpy(v) for k, v in side.native(arrays, dtypes).items()}
    dt = np.logaddexp(0, a["dt"] + a["dt_bias"])[..., None]                 # (T, H, 1)
    B = np.repeat(a["B"], 2, axis=1)[:, :, None, :]                       # (T, H, 1, N)
    C = np.repeat(a["C"], 2, axis=1)[:, :, None, :]
    T = a["x"].shape[0]
    h = a["state"][:T] * np.exp(a["A"][:, None, None] * dt[..., None]) + (dt * a["x"])[..., None] * B
    y = (h * C).sum(-1) + a["D"] * a["x"]
    y = y * a["z"] / (1 + np.exp(-a["z"]))
    out, state = side.run_reference(side.native(arrays, dtypes), **options)
    np.testing.assert_allclose(out, y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state[:T], h, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(state[T:], a["state"][T:])


@pytest.mark.parametrize("case", [SsuCase(), SsuCase(null_block_id=-1, state_dtype="bfloat16",
                                                     input_dtype="bfloat16", four_d=False, ngroups=1,
                                                     per_head=False)], ids=str)
def test_without_out_padding_rows_are_zeros(side, case, rng):
    """``out`` not given: a padding sequence's rows are zeros (the JAX kernel
    writes them itself, no zero buffer is filled first), the other rows
    what a given ``out`` gets."""
    arrays, dtypes, options = make_inputs(case, rng)
    inputs = side.native(arrays, dtypes)
    want_out, want_state = side.run_kernel(inputs, **options)  # out given, NaN-poisoned
    given = {k: (v.clone() if side.name == "torch" else v) for k, v in inputs.items() if k != "out"}
    result = side.impl.selective_state_update(**given, **options)
    got_out, got_state = (result, given["state"]) if side.name == "torch" else result
    padding = np.isnan(want_out)
    assert padding.any() and (~padding).any(), "the case has padding and real rows"
    np.testing.assert_array_equal(side.numpy(got_out)[padding], 0)
    np.testing.assert_array_equal(side.numpy(got_out)[~padding], want_out[~padding])
    np.testing.assert_array_equal(side.numpy(got_state), want_state)
