"""Bad input gets a clear error naming the argument, and the cache is left as
it was. Out-of-range indices that cannot be checked on the host (JAX under
jit, torch with validate_indices=False) never touch memory and give NaN."""

import numpy as np
import pytest

from ssu_cases import SsuCase, make_inputs

CASE = SsuCase(indices="dst")
SPEC_CASE = SsuCase(spec=True)


def _set(name, make):
    def mutate(arrays, dtypes):
        arrays[name] = make(arrays)
    return mutate


def _dtype(name, dtype):
    def mutate(arrays, dtypes):
        dtypes[name] = dtype
    return mutate


BAD_INPUTS = [
    ("x", CASE, _set("x", lambda a: a["x"][:, :, :-1])),
    ("dt", CASE, _set("dt", lambda a: a["dt"][:, :1])),
    ("A", CASE, _set("A", lambda a: a["A"][:-1])),
    ("B", CASE, _set("B", lambda a: np.concatenate([a["B"], a["B"][:, :1]], axis=1))),
    ("C", CASE, _set("C", lambda a: a["C"][:, :, :-1])),
    ("D", CASE, _set("D", lambda a: a["D"][:, :-1])),
    ("dt_bias", CASE, _set("dt_bias", lambda a: np.ones(7))),
    ("z", CASE, _set("z", lambda a: a["z"][:-1])),
    ("out", CASE, _set("out", lambda a: a["out"][:-1])),
    ("state", CASE, _set("state", lambda a: a["state"][None])),
    ("state_batch_indices", CASE,
     _set("state_batch_indices", lambda a: np.where(np.arange(3) == 1, 10_000, a["state_batch_indices"]))),
    ("state_batch_indices", CASE, _set("state_batch_indices", lambda a: a["state_batch_indices"][:1])),
    ("dst_state_batch_indices", CASE,
     _set("dst_state_batch_indices", lambda a: np.where(np.arange(3) == 0, -5, a["dst_state_batch_indices"]))),
    ("cu_seqlens", SPEC_CASE, _set("cu_seqlens", lambda a: a["cu_seqlens"] + 1)),
    ("num_accepted_tokens", SPEC_CASE, _set("num_accepted_tokens", lambda a: a["num_accepted_tokens"] + 3)),
    ("num_accepted_tokens", CASE, _set("num_accepted_tokens", lambda a: np.ones(3, np.int64))),
    ("state", CASE, _dtype("state", "int32")),
    ("x", CASE, _dtype("x", "int32")),
    ("state_batch_indices", CASE, _dtype("state_batch_indices", "float32")),
]


@pytest.mark.parametrize("arg,case,mutate", BAD_INPUTS,
                         ids=[f"{arg}-{i}" for i, (arg, _, _) in enumerate(BAD_INPUTS)])
def test_bad_input_names_the_argument(side, arg, case, mutate, rng):
    arrays, dtypes, options = make_inputs(case, rng)
    mutate(arrays, dtypes)
    dtypes.setdefault("num_accepted_tokens", "int32")
    inputs = side.native(arrays, dtypes)
    before = side.numpy(inputs["state"]) if dtypes["state"].startswith("float") else None
    with pytest.raises(ValueError, match=f"`{arg}`"):
        side.run_kernel(inputs, **options)
    if before is not None:
        np.testing.assert_array_equal(side.numpy(inputs["state"]), before)


def test_stochastic_rounding_needs_float16_state(side, rng):
    arrays, dtypes, options = make_inputs(CASE, rng)
    with pytest.raises(ValueError, match="`enable_stochastic_rounding`"):
        side.run_kernel(side.native(arrays, dtypes), **options, enable_stochastic_rounding=True,
                        rounding_seed=1)


def test_unchecked_bad_indices_give_nan_and_leave_the_cache(side, rng):
    """Indices the host cannot see: the kernel skips the state write and
    writes NaN, never a plausible wrong value or a write out of bounds."""
    arrays, dtypes, options = make_inputs(SsuCase(indices="dst"), rng)
    arrays["dst_state_batch_indices"][1] = arrays["state"].shape[0] + 3
    arrays["state_batch_indices"][2] = -7
    inputs = side.native(arrays, dtypes)
    before = side.numpy(inputs["state"])
    if side.name == "torch":
        out = side.impl.selective_state_update(**inputs, **options, validate_indices=False)
        state = side.numpy(inputs["state"])
    else:
        jax = side.jax
        out, state = jax.jit(lambda kw: side.impl.selective_state_update(**kw, **options))(inputs)
        state = side.numpy(state)
    out = side.numpy(out)
    assert np.isnan(out[1]).all() and np.isnan(out[2]).all()
    assert np.isfinite(out[0]).all()
    changed = ~np.isclose(state, before, equal_nan=True).all(axis=(1, 2, 3))
    assert np.flatnonzero(changed).tolist() == [arrays["dst_state_batch_indices"][0]]


def test_torch_tensors_on_different_devices():
    torch = pytest.importorskip("torch")
    from frameworks import TorchSide
    side = TorchSide()
    arrays, dtypes, options = make_inputs(CASE, np.random.default_rng())
    inputs = side.native(arrays, dtypes)
    inputs["C"] = inputs["C"].to("meta")
    with pytest.raises(ValueError, match="`C`"):
        side.impl.selective_state_update(**inputs, **options)
    del torch


def test_jax_stochastic_rounding_needs_a_seed():
    from frameworks import JaxSide
    side = JaxSide()
    arrays, dtypes, options = make_inputs(SsuCase(state_dtype="float16"), np.random.default_rng())
    with pytest.raises(ValueError, match="`rounding_seed`"):
        side.impl.selective_state_update(**side.native(arrays, dtypes), **options,
                                         enable_stochastic_rounding=True)


def test_jax_donated_state_is_updated_in_place(rng):
    from frameworks import JaxSide
    side = JaxSide()
    jax = side.jax
    arrays, dtypes, options = make_inputs(SsuCase(indices="plain"), rng)
    inputs = side.native(arrays, dtypes)
    want_out, want_state = side.run_reference(inputs, **options)
    # An XLA-owned buffer: on CPU, jnp.asarray may alias the numpy array it
    # came from, and XLA never donates memory it does not own.
    state = jax.jit(lambda a: a + 0)(inputs.pop("state"))
    pointer = state.unsafe_buffer_pointer()
    step = jax.jit(lambda s, kw: side.impl.selective_state_update(s, **kw, **options),
                   donate_argnums=0)
    out, new_state = step(state, inputs)
    assert new_state.unsafe_buffer_pointer() == pointer
    assert state.is_deleted()
    np.testing.assert_allclose(side.numpy(new_state), want_state, rtol=1e-5, atol=1e-5)


def test_triton_grid_limit_on_sequences_names_x():
    """More sequences than CUDA's grid z axis holds: a clear error, not a launch failure."""
    torch = pytest.importorskip("torch")
    torch_impl = pytest.importorskip("torch_impl")
    from torch_impl.selective_state_update import MAX_GRID_Z

    num_seqs, nheads, dim, dstate = MAX_GRID_Z + 1, 1, 1, 16
    zeros = lambda *shape: torch.zeros(shape, device=torch_impl.platform.default_device())  # noqa: E731
    state, B = zeros(num_seqs, nheads, dim, dstate), zeros(num_seqs, 1, dstate)
    with pytest.raises(ValueError, match="`x`"):
        torch_impl.selective_state_update(state, zeros(num_seqs, nheads, dim), zeros(num_seqs, nheads),
                                          zeros(nheads), B, B)
    assert not state.any()
