"""JAX-only behaviour of the chunked scan: under ``jax.jit`` (metadata
traced, so no host-side value checks) with ``out`` donated and written in
place, and with ``jax_enable_x64`` on. Everything else is in test_ssd.py,
for both frameworks."""

import numpy as np
import pytest

from ssd_cases import INDEX_ARGS, SsdCase, assert_ssd_close, make_ssd_inputs

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from frameworks import JaxSide, assert_close  # noqa: E402

STATIC = ("chunk_size", "dt_softplus", "dt_limit", "return_intermediate_states", "state_dtype")


@pytest.mark.parametrize("intermediate", [False, True])
def test_jit_with_donated_out(intermediate, rng):
    side = JaxSide()
    case = SsdCase(intermediate=intermediate)
    arrays, dtypes, options = make_ssd_inputs(case, rng)
    inputs = side.native(arrays, dtypes)
    want_out, want_states = side.ssd_reference(inputs, **options)
    call = jax.jit(side.impl.mamba_chunk_scan_combined_varlen, static_argnames=STATIC,
                   donate_argnames="out")
    poisoned = jnp.full(arrays["x"].shape, jnp.nan, jnp.float32) + 0  # an XLA-owned buffer
    inputs["out"] = poisoned
    out, states = call(**inputs, **dict(options, state_dtype=jnp.float32))
    assert poisoned.is_deleted(), "`out` was not donated"
    assert_ssd_close(side.numpy(out), want_out, "float32", "jitted out")
    assert_ssd_close(side.numpy(states), want_states, "float32", "jitted states")
    assert np.isfinite(side.numpy(out)).all()


# int32 under x64 (the case issue 17 reported) runs on the GPU; CI covers the path with int64.
@pytest.mark.parametrize("index_dtype", [pytest.param("int32", marks=pytest.mark.slow), "int64"])
def test_x64_mode(index_dtype, rng):
    """With ``jax_enable_x64`` on, int32 and int64 metadata, eager and under
    jit; an int64 ``seq_idx`` past 2^32 is out of range (NaN), not wrapped
    into range."""
    side = JaxSide()
    case = SsdCase(seqlens=(5, 20), nheads=2, ngroups=1)
    arrays, dtypes, options = make_ssd_inputs(case, rng)
    dtypes.update({k: index_dtype for k in INDEX_ARGS})
    options = dict(options, state_dtype=jnp.float32)
    with jax.enable_x64(True):
        inputs = side.native(arrays, dtypes)
        assert inputs["seq_idx"].dtype == index_dtype
        want_out, want_states = side.ssd_reference(inputs, **options)
        eager = side.impl.mamba_chunk_scan_combined_varlen(**inputs, **options)
        jitted = jax.jit(side.impl.mamba_chunk_scan_combined_varlen, static_argnames=STATIC)
        for what, (out, states) in (("eager", eager), ("jit", jitted(**inputs, **options))):
            assert_close(out, want_out, "float32", f"{what} out")
            assert_close(states, want_states, "float32", f"{what} states")
        if index_dtype == "int64":
            inputs["seq_idx"] = inputs["seq_idx"].at[2].set(2**32 + 1)
            out, states = jitted(**inputs, **options)
            want_out[21:] = np.nan
            assert_close(out, want_out, "float32", "out with a huge seq_idx")
