"""Bad input gets a clear error naming the argument, and the cache is left as
it was (index values: in the debug mode, ``validate_indices=True``). Index
values that are not checked (torch by default, JAX under jit) never touch
memory outside the arrays given: no state written, NaN outputs."""

import numpy as np
import pytest

from frameworks import assert_close
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
    ("num_accepted_tokens", SPEC_CASE, _set("num_accepted_tokens", lambda a: a["num_accepted_tokens"] * 0)),
    ("num_accepted_tokens", CASE, _set("num_accepted_tokens", lambda a: np.ones(3, np.int64))),
    # Slot collisions between sequences (CASE's sources and destinations are disjoint).
    ("state_batch_indices", CASE, _set("state_batch_indices", lambda a: a["state_batch_indices"][[0, 0, 1]])),
    ("dst_state_batch_indices", CASE,
     _set("dst_state_batch_indices", lambda a: a["dst_state_batch_indices"][[0, 1, 1]])),
    ("dst_state_batch_indices", CASE,
     _set("dst_state_batch_indices", lambda a: np.roll(a["state_batch_indices"], 1))),
    ("dst_state_batch_indices", SPEC_CASE, _set("dst_state_batch_indices", lambda a: a["state_batch_indices"][:, :1])),
    ("state", CASE, _dtype("state", "int32")),
    ("x", CASE, _dtype("x", "int32")),
    ("state_batch_indices", CASE, _dtype("state_batch_indices", "float32")),
]


@pytest.mark.parametrize("arg,case,mutate", BAD_INPUTS,
                         ids=[f"{arg}-{i}" for i, (arg, _, _) in enumerate(BAD_INPUTS)])
def test_bad_input_names_the_argument(side, arg, case, mutate, rng):
    arrays, dtypes, options = make_inputs(case, rng)
    mutate(arrays, dtypes)
    for name in ("num_accepted_tokens", "dst_state_batch_indices"):
        dtypes.setdefault(name, "int32")
    inputs = side.native(arrays, dtypes)
    before = side.numpy(inputs["state"]) if dtypes["state"].startswith("float") else None
    with pytest.raises(ValueError, match=f"`{arg}`"):
        side.run_kernel(inputs, **options, validate_indices=True)
    if before is not None:
        np.testing.assert_array_equal(side.numpy(inputs["state"]), before)


def test_stochastic_rounding_needs_float16_state(side, rng):
    arrays, dtypes, options = make_inputs(CASE, rng)
    with pytest.raises(ValueError, match="`enable_stochastic_rounding`"):
        side.run_kernel(side.native(arrays, dtypes), **options, enable_stochastic_rounding=True,
                        rounding_seed=1)


@pytest.mark.parametrize("arg,value", [
    ("null_block_id", None), ("null_block_id", 2.5), ("rounding_seed", -1), ("rounding_seed", 2**32),
    ("rounding_seed", 1.5), ("cache_philox_rounds", -1),
])
def test_bad_option_names_the_argument(side, arg, value, rng):
    arrays, dtypes, options = make_inputs(SsuCase(state_dtype="float16"), rng)
    options.update({arg: value}, enable_stochastic_rounding=True)
    options.setdefault("rounding_seed", 7)
    with pytest.raises(ValueError, match=f"`{arg}`"):
        side.run_kernel(side.native(arrays, dtypes), **options)


def test_index_lists_are_refused_by_name(side, rng):
    arrays, dtypes, options = make_inputs(CASE, rng)
    inputs = side.native(arrays, dtypes)
    inputs["state_batch_indices"] = arrays["state_batch_indices"].tolist()
    with pytest.raises(ValueError, match="`state_batch_indices` must be an array"):
        side.impl.selective_state_update(**inputs, **options)


def test_no_tokens_is_a_no_op(side, rng):
    for case, cu_seqlens in ((CASE, None), (SPEC_CASE, np.zeros(1, np.int64))):
        arrays, dtypes, options = make_inputs(case, rng)
        per_token = ("x", "dt", "B", "C", "z", "out", "state_batch_indices",
                     "dst_state_batch_indices", "num_accepted_tokens")
        arrays = {k: (v[:0] if k in per_token else v) for k, v in arrays.items()}
        if cu_seqlens is not None:
            arrays["cu_seqlens"] = cu_seqlens
        inputs = side.native(arrays, dtypes)
        out, state = side.run_kernel(inputs, **options, validate_indices=True)
        assert out.shape == arrays["x"].shape
        np.testing.assert_array_equal(state, side.numpy(inputs["state"]))


def test_env_variable_turns_on_the_torch_index_checks(monkeypatch, rng):
    from bridge.spec.checks import CHECK_INDICES_ENV
    from frameworks import TorchSide
    side = TorchSide()
    arrays, dtypes, options = make_inputs(CASE, rng)
    arrays["state_batch_indices"][1] = 10_000
    inputs = side.native(arrays, dtypes)
    side.run_kernel(inputs, **options)  # unchecked by default: no error
    monkeypatch.setenv(CHECK_INDICES_ENV, "1")
    with pytest.raises(ValueError, match="`state_batch_indices` holds \\[10000\\]"):
        side.run_kernel(inputs, **options)


GUARD = 3  # rows of sentinel before and after the state and out the kernel sees
SENTINEL = 1234.5


def _run_unchecked(side, inputs, options):
    """The kernel on unchecked index values: torch (validate_indices=False)
    on interior views of sentinel-filled buffers, whose guard rows must stay
    bitwise the sentinel; JAX under jit. Returns (out, new_state) as numpy."""
    if side.name == "jax":
        out, state = side.jax.jit(lambda kw: side.impl.selective_state_update(**kw, **options))(inputs)
        return side.numpy(out), side.numpy(state)
    torch = side.torch
    guarded = {}
    for name in ("state", "out"):
        tensor = inputs[name]
        buffer = torch.full((tensor.shape[0] + 2 * GUARD, *tensor.shape[1:]), SENTINEL,
                            dtype=tensor.dtype, device=tensor.device)
        buffer[GUARD:-GUARD] = tensor
        guarded[name] = buffer
    views = dict(inputs, state=guarded["state"][GUARD:-GUARD], out=guarded["out"][GUARD:-GUARD])
    side.impl.selective_state_update(**views, **options, validate_indices=False)
    for buffer in guarded.values():
        guard = torch.cat([buffer[:GUARD], buffer[-GUARD:]]).cpu()
        assert (guard == SENTINEL).all(), "a write outside the tensors given"
    return side.numpy(views["out"]), side.numpy(views["state"])


def _spoil_cu_seqlens(arrays, Q):
    arrays["cu_seqlens"][Q - 1] = arrays["cu_seqlens"][Q] + 5  # past the tokens, and falling
    return [Q - 2, Q - 1]


def _spoil_accepted(arrays, Q):
    arrays["num_accepted_tokens"][[0, 1]] = [0, 99]
    return [0, 1]


def _spoil_slots(arrays, Q):
    num_slots = arrays["state"].shape[0]
    arrays["state_batch_indices"][0] = -7
    arrays["dst_state_batch_indices"][1] = num_slots + 3
    arrays["state_batch_indices"][2] = 2**31 - 1
    return [0, 1, 2]


SPOILED = [(SsuCase(spec=True, indices="plain", batch=4), _spoil_cu_seqlens),
           (SsuCase(spec=True, indices="plain", batch=3), _spoil_accepted),
           (SsuCase(indices="dst", batch=4), _spoil_slots)]


@pytest.mark.parametrize("case,spoil", SPOILED, ids=[f.__name__ for _, f in SPOILED])
def test_unchecked_bad_values_touch_nothing_outside_their_work(side, case, spoil, rng):
    """Malformed index values on the unchecked path: the bad sequences write
    no state and NaN outputs (inside [0, T)), the good ones are computed as
    if the bad ones were padding, and nothing outside the tensors changes."""
    arrays, dtypes, options = make_inputs(case, rng)
    arrays["out"] = np.zeros_like(arrays["out"])  # finite: poisoned outputs must show
    padded = {k: v.copy() for k, v in arrays.items()}
    bad = spoil(arrays, case.batch)
    got_out, got_state = _run_unchecked(side, side.native(arrays, dtypes), options)

    # The oracle: the valid call with the bad sequences as padding.
    padded["state_batch_indices"][bad] = case.null_block_id
    want_out, want_state = side.run_kernel(side.native(padded, dtypes), **options)
    T = len(arrays["x"])
    tokens = np.zeros(T, bool)  # the bad sequences' tokens inside [0, T)
    for q in bad:
        start, end = (arrays["cu_seqlens"][q:q + 2] if "cu_seqlens" in arrays else (q, q + 1))
        tokens[max(start, 0):min(end, T)] = True
    want_out[tokens] = np.nan
    assert tokens.any() and np.isfinite(want_out).any()
    np.testing.assert_array_equal(got_out, want_out)
    np.testing.assert_array_equal(got_state, want_state)  # bitwise: the same kernel wrote it


def test_jax_x64_mode(rng):
    """With jax_enable_x64 on: int32, int64 and no indices all run and match
    the reference; an int64 slot id past 2**32 is out of range, not wrapped."""
    from frameworks import JaxSide
    side = JaxSide()
    jax = side.jax
    with jax.enable_x64(True):
        for case, index_dtype in ((SsuCase(spec=True, indices="dst"), "int64"),
                                  (SsuCase(indices="plain"), "int32"), (SsuCase(indices="none"), None)):
            arrays, dtypes, options = make_inputs(case, rng)
            dtypes = {k: (index_dtype if v.startswith("int") else v) for k, v in dtypes.items()}
            inputs = side.native(arrays, dtypes)
            got_out, got_state = side.run_kernel(inputs, **options)
            want_out, want_state = side.run_reference(inputs, **options)
            assert_close(got_out, want_out, "float32", f"out, {case}")
            assert_close(got_state, want_state, "float32", f"state, {case}")
        arrays, dtypes, options = make_inputs(SsuCase(indices="plain"), rng)
        arrays["out"] = np.zeros_like(arrays["out"])
        wrapped = arrays["state_batch_indices"][0]
        arrays["state_batch_indices"][0] += 2**32
        dtypes["state_batch_indices"] = "int64"
        out, state = _run_unchecked(side, side.native(arrays, dtypes), options)
    assert np.isnan(out[0]).all() and np.isfinite(out[1:]).all()
    np.testing.assert_array_equal(state[wrapped], arrays["state"][wrapped].astype(np.float32))


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
