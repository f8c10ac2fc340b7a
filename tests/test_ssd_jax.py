"""JAX-only behaviour of the chunked scan: under ``jax.jit`` (metadata
traced, so no host-side value checks) with ``out`` donated and written in
place. Everything else is in test_ssd.py, for both frameworks."""

import numpy as np
import pytest

from ssd_cases import SsdCase, assert_ssd_close, make_ssd_inputs

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from frameworks import JaxSide  # noqa: E402


@pytest.mark.parametrize("intermediate", [False, True])
def test_jit_with_donated_out(intermediate, rng):
    side = JaxSide()
    case = SsdCase(intermediate=intermediate)
    arrays, dtypes, options = make_ssd_inputs(case, rng)
    inputs = side.native(arrays, dtypes)
    want_out, want_states = side.ssd_references(inputs, **options)["chunked"]
    static = ("chunk_size", "dt_softplus", "dt_limit", "return_intermediate_states", "state_dtype")
    call = jax.jit(side.impl.mamba_chunk_scan_combined_varlen, static_argnames=static,
                   donate_argnames="out")
    poisoned = jnp.full(arrays["x"].shape, jnp.nan, jnp.float32) + 0  # an XLA-owned buffer
    inputs["out"] = poisoned
    out, states = call(**inputs, **dict(options, state_dtype=jnp.float32))
    assert poisoned.is_deleted(), "`out` was not donated"
    assert_ssd_close(side.numpy(out), want_out, "float32", "jitted out")
    assert_ssd_close(side.numpy(states), want_states, "float32", "jitted states")
    assert np.isfinite(side.numpy(out)).all()
