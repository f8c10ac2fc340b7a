"""Causal depthwise conv1d in each framework: prefill (packed sequences,
with and without initial states, shorter than width - 1, padding) and
decode (plain, speculative, prefix-cache columns) vs the float64
references; prefill then decode equals one longer prefill; Triton vs Pallas
on the same memory; in-place update under donation (JAX); bad input."""

import numpy as np
import pytest

from frameworks import JaxSide, TorchSide

PAD = 0  # the null block: padding entries point at it
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def _close(got, want, dtype, what, mask=None):
    """Within the dtype's tolerance relative to the largest |value|; NaN where
    ``want`` is NaN (poison left in place), nowhere else."""
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN pattern")
    scale = np.nanmax(np.abs(want)) if np.isfinite(want).any() else 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE[dtype] * scale, err_msg=what)


def _state(rng, num_slots, dim, state_len):
    """(S, D, L) values, NaN in the padding slot: a kernel that touches it
    leaves no NaN there or spreads NaN elsewhere."""
    values = rng.standard_normal((num_slots, dim, state_len))
    values[PAD] = np.nan
    return values


def _as_layout(side, values, dtype, layout):
    """(S, D, L) numpy -> native (S, D, L): a DS array, or an SD array transposed."""
    if layout == "DS":
        return side.array(values, dtype)
    stored = side.array(np.ascontiguousarray(values.transpose(0, 2, 1)), dtype)
    return stored.transpose(1, 2) if side.name == "torch" else stored.swapaxes(1, 2)


def _fn_inputs(side, rng, *, seqlens, width, dtype, bias, layout, num_slots=8, dim=24):
    """Packed sequences: every second one has an initial state, the one at
    position 2 is padding; the state columns past width - 1 must stay."""
    Q = len(seqlens)
    qsl = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
    slots = rng.permutation(np.arange(1, num_slots))[:Q].astype(np.int32)
    slots[2] = PAD
    state = _state(rng, num_slots, dim, width - 1 + 2)
    arrays = {"x": rng.standard_normal((int(qsl[-1]), dim)),
              "weight": rng.standard_normal((dim, width)) * 0.5,
              "query_start_loc": qsl, "cache_indices": slots,
              "has_initial_state": np.arange(Q) % 2 == 1}
    inputs = {k: side.array(v, "int32" if v.dtype == np.int32 else ("bool" if v.dtype == bool else dtype))
              for k, v in arrays.items()}
    # x as vLLM passes it: (dim, T), a transposed token-major buffer.
    inputs["x"] = inputs["x"].T
    inputs["out"] = side.array(np.full((dim, int(qsl[-1])), np.nan), dtype)
    inputs["bias"] = side.array(rng.standard_normal(dim), dtype) if bias else None
    inputs["conv_states"] = _as_layout(side, state, dtype, layout)
    return inputs


FN_CASES = [
    dict(width=4, dtype="float32", bias=True, silu=True, layout="SD"),
    dict(width=2, dtype="float32", bias=False, silu=False, layout="DS"),
    dict(width=3, dtype="bfloat16", bias=True, silu=True, layout="SD"),
]


@pytest.mark.parametrize("case", FN_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_prefill_matches_reference(side, case, rng):
    inputs = _fn_inputs(side, rng, seqlens=(1, 2, 5, 3, 37), width=case["width"],
                        dtype=case["dtype"], bias=case["bias"], layout=case["layout"])
    options = dict(activation="silu" if case["silu"] else None)
    want_out, want_state = side.conv_reference("causal_conv1d_fn", inputs, **options)
    got_out, got_state = side.run_conv("causal_conv1d_fn", inputs, **options)
    _close(got_out, want_out, case["dtype"], f"{side.name} prefill out")
    _close(got_state, want_state, case["dtype"], f"{side.name} prefill conv state")
    assert np.isnan(got_state[PAD]).all(), "the padding slot was written"


def _update_inputs(side, rng, *, dtype, spec, columns, dim=24, width=4, num_slots=14):
    """Decode batch of 4 sequences, the third padding; with ``spec`` 3 tokens
    per sequence (num_spec = 2) and a state holding num_spec extra columns;
    with ``columns`` prefix caching's read and write columns of 3 per sequence."""
    num_spec = 2 if spec else 0
    batch, index_columns = 4, (3 if spec or columns else 1)
    slots = rng.permutation(np.arange(1, num_slots))[:batch * index_columns].astype(np.int32)
    slots = slots.reshape(batch, index_columns)
    slots[2, :] = PAD
    state = _state(rng, num_slots, dim, width - 1 + num_spec)
    tokens = batch * (1 + num_spec)
    inputs = {"x": side.array(rng.standard_normal((tokens, dim)), dtype),
              "conv_state": _as_layout(side, state, dtype, "SD"),
              "weight": side.array(rng.standard_normal((dim, width)) * 0.5, dtype),
              "bias": side.array(rng.standard_normal(dim), dtype),
              "conv_state_indices": side.array(slots if index_columns > 1 else slots[:, 0], "int32"),
              "out": side.array(np.full((tokens, dim), np.nan), dtype)}
    if spec:
        inputs["query_start_loc"] = side.array(np.arange(batch + 1, dtype=np.int32) * 3, "int32")
        inputs["num_accepted_tokens"] = side.array(rng.integers(1, 4, batch).astype(np.int32), "int32")
    if columns:
        inputs["initial_state_idx"] = side.array(rng.integers(0, 3, batch).astype(np.int32), "int32")
        inputs["block_idx_last_scheduled_token"] = side.array(
            rng.integers(0, 3, batch).astype(np.int32), "int32")
    return inputs


UPDATE_CASES = [dict(dtype="float32", spec=False, columns=False),
                dict(dtype="float32", spec=True, columns=False),
                dict(dtype="bfloat16", spec=False, columns=True)]


@pytest.mark.parametrize("case", UPDATE_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_decode_matches_reference(side, case, rng):
    inputs = _update_inputs(side, rng, **case)
    options = dict(activation="silu")
    if case["spec"]:
        options["max_query_len"] = 3
    want_out, want_state = side.conv_reference("causal_conv1d_update", inputs,
                                               **{k: v for k, v in options.items() if k != "max_query_len"})
    got_out, got_state = side.run_conv("causal_conv1d_update", inputs, **options)
    _close(got_out, want_out, case["dtype"], f"{side.name} decode out")
    _close(got_state, want_state, case["dtype"], f"{side.name} decode conv state")


def test_prefill_then_decode_equals_longer_prefill(side, rng):
    """Prefill n < width - 1 tokens (the state keeps part of the zero
    history), then decode: plainly on a (W-1)-column state, and
    speculatively (2 tokens a step, num_spec = 1) on a W-column state. Every
    accepted token's output equals one prefill over all of them."""
    dim, width, n = 16, 4, 2
    x, junk = rng.standard_normal((n + 4, dim)), rng.standard_normal((2, dim))
    weight, bias = rng.standard_normal((dim, width)), rng.standard_normal(dim)
    common = dict(weight=side.array(weight, "float32"), bias=side.array(bias, "float32"))
    f32 = lambda a: side.array(np.asarray(a, np.float64), "float32")  # noqa: E731
    i32 = lambda *v: side.array(np.array(v, np.int32), "int32")  # noqa: E731
    nan = lambda *shape: f32(np.full(shape, np.nan))  # noqa: E731

    def prefill(tokens, state_len):
        return side.run_conv("causal_conv1d_fn", dict(
            common, x=f32(tokens).T, conv_states=f32(np.zeros((2, dim, state_len))),
            query_start_loc=i32(0, len(tokens)), cache_indices=i32(1), out=nan(dim, len(tokens))))

    full_out, _ = prefill(x, width - 1)
    got, state = prefill(x[:n], width - 1)
    np.testing.assert_allclose(got, full_out[:, :n], atol=1e-5)
    got, _ = side.run_conv("causal_conv1d_update", dict(
        common, x=f32(x[n:n + 1]), conv_state=f32(state), conv_state_indices=i32(1), out=nan(1, dim)),
        activation="silu")
    np.testing.assert_allclose(got[0], full_out[:, n], atol=1e-5)

    _, state = prefill(x[:n], width)
    # (tokens of the step, tokens accepted of the previous step, outputs that count)
    steps = [([x[n], junk[0]], 1, [n]), ([x[n + 1], x[n + 2]], 1, [n + 1, n + 2]),
             ([x[n + 3], junk[1]], 2, [n + 3])]
    for tokens, accepted, positions in steps:
        got, state = side.run_conv("causal_conv1d_update", dict(
            common, x=f32(tokens), conv_state=f32(state), conv_state_indices=i32(1),
            query_start_loc=i32(0, 2), num_accepted_tokens=i32(accepted), out=nan(2, dim)),
            activation="silu")
        np.testing.assert_allclose(got[:len(positions)], full_out[:, positions].T, atol=1e-5)


# Small CPU tensors may sit off XLA's alignment; those few are copied.
@pytest.mark.filterwarnings("ignore::bridge.dlpack.BridgeCopyWarning")
@pytest.mark.parametrize("function", ["causal_conv1d_fn", "causal_conv1d_update"])
def test_triton_matches_pallas(function, rng):
    """Both kernels on the very same torch memory (shared through the bridge)."""
    import bridge
    torch_side, jax_side = TorchSide(), JaxSide()
    if function == "causal_conv1d_fn":
        inputs = _fn_inputs(torch_side, rng, seqlens=(3, 1, 6, 20), width=4, dtype="bfloat16",
                            bias=True, layout="DS")
    else:
        inputs = _update_inputs(torch_side, rng, dtype="float32", spec=True, columns=False)
    tokens_first = function == "causal_conv1d_fn"  # x, out: (dim, T) views of (T, dim) buffers
    shared = {k: (None if v is None else bridge.to_jax(v.T if tokens_first and k in ("x", "out") else v,
                                                       copy_ok=True))
              for k, v in inputs.items()}
    if tokens_first:
        shared.update(x=shared["x"].T, out=shared["out"].T)
    t_out, t_state = torch_side.run_conv(function, inputs, activation="silu")
    j_out, j_state = jax_side.run_conv(function, shared, activation="silu")
    dtype = "bfloat16" if function == "causal_conv1d_fn" else "float32"
    _close(t_out, j_out, dtype, f"{function}: triton vs pallas out")
    _close(t_state, j_state, dtype, f"{function}: triton vs pallas conv state")


def test_jax_state_updated_in_place_under_donation(rng):
    """jit + donation: the new conv state lives in the donated buffer (an
    SD cache handed over transposed)."""
    jax_side = JaxSide()
    jax, jnp, impl = jax_side.jax, jax_side.jnp, jax_side.impl
    dim, width = 16, 4
    cache = jnp.zeros((3, width - 1, dim)) + 1.0  # SD, XLA-owned

    def update(cache, x, weight, slots):
        out, state = impl.causal_conv1d_update(x, cache.swapaxes(1, 2), weight,
                                               conv_state_indices=slots, activation="silu")
        return out, state.swapaxes(1, 2)

    step, donated = jax.jit(update), jax.jit(update, donate_argnums=0)
    pointer = cache.unsafe_buffer_pointer()
    x = jnp.asarray(rng.standard_normal((2, dim)), jnp.float32)
    weight = jnp.asarray(rng.standard_normal((dim, width)), jnp.float32)
    want_out, want_cache = step(cache, x, weight, jnp.array([1, 2], jnp.int32))
    out, new_cache = donated(cache, x, weight, jnp.array([1, 2], jnp.int32))
    assert new_cache.unsafe_buffer_pointer() == pointer
    np.testing.assert_array_equal(np.asarray(new_cache), np.asarray(want_cache))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want_out))


def test_bad_input_raises_naming_the_argument(side, rng):
    inputs = _fn_inputs(side, rng, seqlens=(3, 4, 2), width=4, dtype="float32", bias=True,
                        layout="DS")
    fn = lambda **changes: side.run_conv("causal_conv1d_fn", dict(inputs, **changes),  # noqa: E731
                                         validate_indices=True)
    with pytest.raises(ValueError, match="`weight`"):
        fn(weight=side.array(np.zeros((23, 4)), "float32"))
    with pytest.raises(ValueError, match="`weight`"):
        fn(weight=side.array(np.zeros((24, 9)), "float32"))
    with pytest.raises(ValueError, match="`conv_states`"):
        fn(conv_states=side.array(np.zeros((8, 24, 2)), "float32"))
    with pytest.raises(ValueError, match="`cache_indices`"):
        fn(cache_indices=side.array(np.array([1, 2], np.int32), "int32"))
    with pytest.raises(ValueError, match="`cache_indices`"):
        fn(cache_indices=side.array(np.array([1, 2, 99], np.int32), "int32"))
    with pytest.raises(ValueError, match="`query_start_loc`"):
        fn(query_start_loc=side.array(np.array([0, 3, 2, 9], np.int32), "int32"))
    with pytest.raises(ValueError, match="`activation`"):
        side.run_conv("causal_conv1d_fn", inputs, activation="relu")
    update = _update_inputs(side, rng, dtype="float32", spec=False, columns=False)
    with pytest.raises(ValueError, match="`num_accepted_tokens`"):
        side.run_conv("causal_conv1d_update", dict(update, num_accepted_tokens=update["conv_state_indices"]),
                      validate_indices=True)
    with pytest.raises(ValueError, match="`bias`"):
        side.run_conv("causal_conv1d_update", dict(update, bias=side.array(np.zeros(5), "float32")))


def test_prefill_writes_block_boundary_states(side, rng):
    """Prefix caching: a block table per sequence; the history comes from the
    block of the last computed token, the state at every block boundary
    crossed goes to that block, the final state to the last block."""
    from bridge.spec.mixer_metadata import prefix_block_indices
    dim, width, block_size = 16, 4, 4
    lens, computed = np.array([9, 7, 2, 3]), np.array([0, 5, 3, 2])
    last_computed, first, last = prefix_block_indices(computed, lens, block_size)
    table = (1 + np.arange(4 * 5).reshape(4, 5)).astype(np.int32)  # 5 blocks each, distinct slots
    table[3] = PAD  # a padding sequence
    state = _state(rng, 1 + table.size, dim, width - 1)
    qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    i32 = lambda a: side.array(np.asarray(a, np.int32), "int32")  # noqa: E731
    inputs = dict(x=side.array(rng.standard_normal((qsl[-1], dim)), "float32").T,
                  weight=side.array(rng.standard_normal((dim, width)), "float32"), bias=None,
                  conv_states=side.array(state, "float32"), query_start_loc=i32(qsl),
                  cache_indices=i32(table), has_initial_state=side.array(computed > 0, "bool"),
                  block_idx_first_scheduled_token=i32(first), block_idx_last_scheduled_token=i32(last),
                  initial_state_idx=i32(last_computed), num_computed_tokens=i32(computed),
                  out=side.array(np.full((dim, qsl[-1]), np.nan), "float32"))
    want_out, want_state = side.conv_reference("causal_conv1d_fn", inputs, block_size_to_align=block_size)
    got_out, got_state = side.run_conv("causal_conv1d_fn", inputs, block_size_to_align=block_size)
    _close(got_out, want_out, "float32", f"{side.name} prefill out")
    _close(got_state, want_state, "float32", f"{side.name} block states")
    assert (last - first).sum() >= 4, "the case must cross several boundaries"
    with pytest.raises(ValueError, match="`block_size_to_align`"):
        side.run_conv("causal_conv1d_fn", inputs)
