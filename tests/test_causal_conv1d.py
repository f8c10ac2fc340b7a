"""Causal depthwise conv1d in each framework: prefill (packed sequences,
with and without initial states, shorter than width - 1, padding) and
decode (plain, speculative, prefix-cache columns) vs the float64
references; long sequences split over programs; prefill then decode equals one longer prefill; Triton vs Pallas
on the same memory; in-place update under donation (JAX); bad input (the
checked path's errors, the unchecked path's skipped work and untouched
guard regions, slot collisions); x64 mode; no tokens; torch.compile tracing."""

import numpy as np
import pytest

from bridge.spec.conv_contract import PREFILL_BLOCK_T, conv_token_splits
from frameworks import JaxSide, TorchSide, assert_close

PAD = 0  # the null block: padding entries point at it
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
    assert_close(got_out, want_out, case["dtype"], f"{side.name} prefill out")
    assert_close(got_state, want_state, case["dtype"], f"{side.name} prefill conv state")
    assert np.isnan(got_state[PAD]).all(), "the padding slot was written"


def test_prefill_splits_long_sequences_over_programs(side, rng):
    """Sequences of several token tiles, spread over programs (every
    ``splits``-th tile each): outputs, states read and rewritten in place,
    the padding slot untouched."""
    seqlens = (100, 70, 2)  # the 70-token sequence resumes its state; the third is padding
    assert conv_token_splits(sum(seqlens), len(seqlens), PREFILL_BLOCK_T) == 2
    inputs = _fn_inputs(side, rng, seqlens=seqlens, width=4, dtype="float32", bias=True, layout="SD")
    want_out, want_state = side.conv_reference("causal_conv1d_fn", inputs, activation="silu")
    got_out, got_state = side.run_conv("causal_conv1d_fn", inputs, activation="silu")
    assert_close(got_out, want_out, "float32", f"{side.name} split prefill out")
    assert_close(got_state, want_state, "float32", f"{side.name} split prefill conv state")
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
    assert_close(got_out, want_out, case["dtype"], f"{side.name} decode out")
    assert_close(got_state, want_state, case["dtype"], f"{side.name} decode conv state")


def test_jax_padding_rows_are_zero_without_out(rng):
    """JAX without ``out`` (a fresh, uninitialised XLA buffer): the padding
    entries' rows are written as 0, in decode and prefill; the others as
    with a given ``out``."""
    side = JaxSide()
    for function, inputs, padding in [
            ("causal_conv1d_update", _update_inputs(side, rng, dtype="float32", spec=False, columns=False),
             np.arange(4) == 2),
            ("causal_conv1d_fn", _fn_inputs(side, rng, seqlens=(1, 2, 5, 3), width=4, dtype="float32",
                                            bias=True, layout="SD"), np.repeat(np.arange(4) == 2, (1, 2, 5, 3)))]:
        as_rows = (lambda out: out) if function == "causal_conv1d_update" else (lambda out: out.T)  # noqa: E731
        want = as_rows(side.run_conv(function, inputs, activation="silu")[0])
        got = as_rows(side.run_conv(function, {k: v for k, v in inputs.items() if k != "out"},
                                    activation="silu")[0])
        assert (got[padding] == 0).all(), f"{function}: padding rows"
        np.testing.assert_array_equal(got[~padding], want[~padding], err_msg=function)


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
    assert_close(got, full_out[:, :n], "float32", "prefill of n")
    got, _ = side.run_conv("causal_conv1d_update", dict(
        common, x=f32(x[n:n + 1]), conv_state=f32(state), conv_state_indices=i32(1), out=nan(1, dim)),
        activation="silu")
    assert_close(got[0], full_out[:, n], "float32", "decode after prefill")

    _, state = prefill(x[:n], width)
    # (tokens of the step, tokens accepted of the previous step, outputs that count)
    steps = [([x[n], junk[0]], 1, [n]), ([x[n + 1], x[n + 2]], 1, [n + 1, n + 2]),
             ([x[n + 3], junk[1]], 2, [n + 3])]
    for tokens, accepted, positions in steps:
        got, state = side.run_conv("causal_conv1d_update", dict(
            common, x=f32(tokens), conv_state=f32(state), conv_state_indices=i32(1),
            query_start_loc=i32(0, 2), num_accepted_tokens=i32(accepted), out=nan(2, dim)),
            activation="silu")
        assert_close(got[:len(positions)], full_out[:, positions].T, "float32", "speculative step")


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
    assert_close(t_out, j_out, dtype, f"{function}: triton vs pallas out")
    assert_close(t_state, j_state, dtype, f"{function}: triton vs pallas conv state")


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
    with pytest.raises(ValueError, match="`conv_states` has 2 slots for 3 sequences"):
        fn(cache_indices=None, conv_states=side.array(np.zeros((2, 24, 3)), "float32"))
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
    assert_close(got_out, want_out, "float32", f"{side.name} prefill out")
    assert_close(got_state, want_state, "float32", f"{side.name} block states")
    assert (last - first).sum() >= 4, "the case must cross several boundaries"
    with pytest.raises(ValueError, match="`block_size_to_align`"):
        side.run_conv("causal_conv1d_fn", inputs)


# --- Unchecked path: malformed indices touch nothing outside their own work ---

SENTINEL = -7.25  # exact in every float dtype
MARGIN = 2


def _guarded(side, array):
    """torch: ``array`` copied into the interior of a SENTINEL-filled buffer
    (an offset view with padded strides) -> (view, buffer). JAX has no views:
    (array, None), the slots a call must not touch are its guard."""
    if side.name != "torch":
        return array, None
    torch = side.torch
    buffer = torch.full([n + 2 * MARGIN for n in array.shape], SENTINEL, dtype=array.dtype,
                        device=array.device)
    view = buffer[tuple(slice(MARGIN, MARGIN + n) for n in array.shape)]
    view.copy_(array)
    return view, buffer


def _assert_guard_intact(buffer, what):
    torch = pytest.importorskip("torch")
    outside = torch.ones(buffer.shape, dtype=torch.bool, device=buffer.device)
    outside[tuple(slice(MARGIN, n - MARGIN) for n in buffer.shape)] = False
    bits = {2: torch.int16, 4: torch.int32}[buffer.element_size()]
    guard = buffer[outside]
    assert torch.equal(guard.view(bits), torch.full_like(guard, SENTINEL).view(bits)), \
        f"{what}: written outside the view"


def _run_unchecked(side, function, inputs, **options):
    """``function`` with the index checks off; the cache and ``out`` (filled
    with SENTINEL) interior views of guarded buffers on torch: (out, state) as
    float64 numpy, the guards asserted bitwise unchanged."""
    state_arg = "conv_states" if function == "causal_conv1d_fn" else "conv_state"
    inputs = dict(inputs, out=side.array(np.full(inputs["out"].shape, SENTINEL), "float32"))
    views, buffers = {}, {}
    for arg in (state_arg, "out"):
        views[arg], buffers[arg] = _guarded(side, inputs[arg])
    result = getattr(side.impl, function)(**dict(inputs, **views), validate_indices=False, **options)
    if side.name == "jax":
        return tuple(map(side.numpy, result))
    for arg, buffer in buffers.items():
        _assert_guard_intact(buffer, f"{function} {arg}")
    return side.numpy(views["out"]), side.numpy(views[state_arg])


def _assert_skipped(got, want, *, bad_rows, pad_rows, good_slots, initial, what):
    """Outputs (token-major rows): bad sequences' rows NaN, padding rows
    untouched (SENTINEL), the rest as ``want``; every slot outside
    ``good_slots`` bitwise as ``initial``."""
    (got_out, got_state), (want_out, want_state) = got, want
    want_out = want_out.copy()
    want_out[bad_rows] = np.nan
    want_out[pad_rows] = SENTINEL
    assert_close(got_out, want_out, "float32", f"{what} out")
    assert_close(got_state, want_state, "float32", f"{what} state")
    others = np.setdiff1d(np.arange(len(initial)), good_slots)
    np.testing.assert_array_equal(got_state[others], initial[others], err_msg=f"{what}: other slots")


def _index(side, values, dtype="int32"):
    return side.array(np.asarray(values), dtype)


def test_prefill_unchecked_bad_slots_skipped(side, rng):
    """Slots past the cache or negative (not the pad id) are skipped: NaN
    outputs, no slot written but the good sequences' own. Sequence 2 is padding."""
    lens = (3, 2, 5, 4, 1)
    inputs = _fn_inputs(side, rng, seqlens=lens, width=4, dtype="float32", bias=True, layout="SD")
    slots = side.numpy(inputs["cache_indices"]).astype(np.int64)
    bad = {0: 8 + 1, 3: -1}  # sequence -> slot (the cache has 8; both land in the guards)
    rows = np.split(np.arange(sum(lens)), np.cumsum(lens)[:-1])
    fixed = slots.copy()
    fixed[list(bad)] = PAD
    want = side.conv_reference("causal_conv1d_fn", dict(inputs, cache_indices=_index(side, fixed)))
    slots[list(bad)] = list(bad.values())
    got_out, got_state = _run_unchecked(side, "causal_conv1d_fn",
                                        dict(inputs, cache_indices=_index(side, slots)))
    _assert_skipped((got_out.T, got_state), (want[0].T, want[1]),
                    bad_rows=np.concatenate([rows[q] for q in bad]), pad_rows=rows[2],
                    good_slots=fixed[[1, 4]], initial=side.numpy(inputs["conv_states"]),
                    what=f"{side.name} prefill")


def test_prefill_unchecked_bad_query_start_loc_skipped(side, rng):
    """A sequence starting before token 0 or ending past the last token is
    skipped; its tokens clipped to [0, T) are NaN."""
    inputs = _fn_inputs(side, rng, seqlens=(3, 2, 1, 4), width=3, dtype="float32", bias=False,
                        layout="DS")  # sequence 2 is padding
    T = 10
    fixed = _index(side, [0, 3, 5, 6, T])
    slots = side.numpy(inputs["cache_indices"]).astype(np.int32)
    keep = slots.copy()
    keep[[0, 3]] = PAD
    want = side.conv_reference("causal_conv1d_fn", dict(inputs, query_start_loc=fixed,
                                                         cache_indices=_index(side, keep)))
    got_out, got_state = _run_unchecked(side, "causal_conv1d_fn",
                                        dict(inputs, query_start_loc=_index(side, [-4, 3, 5, 6, T + 40])))
    _assert_skipped((got_out.T, got_state), (want[0].T, want[1]), bad_rows=[0, 1, 2, 6, 7, 8, 9],
                    pad_rows=[5], good_slots=keep[[1]], initial=side.numpy(inputs["conv_states"]),
                    what=f"{side.name} prefill")


@pytest.mark.parametrize("spec", [True, False], ids=["accepted", "columns"])
def test_decode_unchecked_bad_indices_skipped(side, spec, rng):
    """num_accepted_tokens outside [1, 1 + drafted columns] and block-table
    columns outside the table are skipped: NaN rows, no slot written."""
    inputs = _update_inputs(side, rng, dtype="float32", spec=spec, columns=not spec)
    options = dict(activation="silu", max_query_len=3) if spec else dict(activation="silu")
    table = side.numpy(inputs["conv_state_indices"]).astype(np.int32)
    if spec:
        arg, good = "num_accepted_tokens", 1
        values = side.numpy(inputs[arg]).astype(np.int32)
        values[[0, 1]] = (0, 4)  # 3 = 1 + the two drafted columns at most
        per_seq = 3
    else:
        arg, good = "initial_state_idx", 0
        values = side.numpy(inputs[arg]).astype(np.int32)
        values[[0, 1]] = (3, -1)  # the table has 3 columns
        per_seq = 1
    fixed_values, fixed_table = values.copy(), table.copy()
    fixed_values[[0, 1]], fixed_table[[0, 1]] = good, PAD
    want = side.conv_reference("causal_conv1d_update", dict(
        inputs, conv_state_indices=_index(side, fixed_table), **{arg: _index(side, fixed_values)}),
        activation="silu")
    got = _run_unchecked(side, "causal_conv1d_update", dict(inputs, **{arg: _index(side, values)}),
                         **options)
    rows = np.arange(4 * per_seq).reshape(4, per_seq)
    written = (fixed_table[3] if spec else
               fixed_table[3, side.numpy(inputs["block_idx_last_scheduled_token"]).astype(int)[3]])
    _assert_skipped(got, want, bad_rows=rows[[0, 1]].ravel(), pad_rows=rows[2],
                    good_slots=np.ravel(written)[:1], initial=side.numpy(inputs["conv_state"]),
                    what=f"{side.name} decode")


# --- Checked path: collisions, argument types, the debug switch ---

def test_slot_shared_by_two_sequences_refused(side, rng):
    """Two prefills on one slot, or a decode writing the slot another one
    reads, are refused naming the slot; padding entries may repeat."""
    inputs = _fn_inputs(side, rng, seqlens=(2, 3, 1), width=4, dtype="float32", bias=True,
                        layout="DS")
    with pytest.raises(ValueError, match=r"`cache_indices`.*slot 5 by sequences \[0, 1\]"):
        side.run_conv("causal_conv1d_fn", dict(inputs, cache_indices=_index(side, [5, 5, 3])),
                      validate_indices=True)
    side.run_conv("causal_conv1d_fn", dict(inputs, cache_indices=_index(side, [PAD, PAD, 3])),
                  validate_indices=True)
    update = _update_inputs(side, rng, dtype="float32", spec=False, columns=True)
    chained = dict(update, conv_state_indices=_index(side, [[1, 2, 3], [2, 4, 5], [PAD] * 3, [6, 7, 8]]),
                   initial_state_idx=_index(side, [0, 0, 0, 0]),
                   block_idx_last_scheduled_token=_index(side, [1, 1, 0, 2]))
    with pytest.raises(ValueError, match=r"`conv_state_indices`.*slot 2 by sequences \[0, 1\]"):
        side.run_conv("causal_conv1d_update", chained, activation="silu", validate_indices=True)


def test_non_array_indices_and_pad_id_refused(side, rng):
    inputs = _fn_inputs(side, rng, seqlens=(2, 3, 1), width=4, dtype="float32", bias=True,
                        layout="DS")
    with pytest.raises(ValueError, match="`cache_indices` must be an array"):
        side.run_conv("causal_conv1d_fn", dict(inputs, cache_indices=[1, 2, 3]))
    for pad in (None, 2.5, True):
        with pytest.raises(ValueError, match="`pad_slot_id` must be an integer"):
            side.run_conv("causal_conv1d_fn", inputs, pad_slot_id=pad)
    side.run_conv("causal_conv1d_fn", inputs, pad_slot_id=np.int64(PAD))


def test_debug_mode_from_the_environment(side, rng, monkeypatch):
    """$MAMBA_TWIN_CHECK_INDICES=1 turns the host checks on (torch's default
    is off; JAX checks concrete values by default); ``validate_indices=False`` wins."""
    from bridge.spec.checks import CHECK_INDICES_ENV
    update = _update_inputs(side, rng, dtype="float32", spec=False, columns=False)
    bad = dict(update, conv_state_indices=_index(side, [1, 99, PAD, 2]))
    monkeypatch.setenv(CHECK_INDICES_ENV, "1")
    with pytest.raises(ValueError, match=r"`conv_state_indices` holds slots outside \[0, 14\).*\[99\]"):
        side.run_conv("causal_conv1d_update", bad)
    out, _ = side.run_conv("causal_conv1d_update", bad, validate_indices=False)
    assert np.isnan(out[1]).all() and not np.isnan(out[[0, 3]]).any()


@pytest.mark.parametrize("prefix", [False, True], ids=["slots", "prefix-caching"])
def test_jax_columns_form_reads_and_splits_in_place(prefix, rng):
    """``causal_conv1d_fn_columns`` (the JAX mixer's form): x read as a block
    of rows and columns of a wider array, the output split over arrays,
    equals ``causal_conv1d_fn`` on the slice (bitwise: the same kernel) and
    the float64 reference; refused under differentiation; bad rows,
    columns or splits refused by name."""
    side = JaxSide()
    jax, jnp = side.jax, side.jnp
    from jax_impl.causal_conv1d import causal_conv1d_fn_columns

    inputs = _fn_inputs(side, rng, seqlens=(1, 2, 5, 3, 37), width=4, dtype="float32", bias=True,
                        layout="SD")
    del inputs["out"]
    options = dict(activation="silu")
    if prefix:  # one block per sequence (block size 64): its last state written to column 0
        num = len(inputs["cache_indices"])
        zero = jnp.zeros(num, jnp.int32)
        inputs.update(cache_indices=inputs["cache_indices"][:, None], initial_state_idx=zero,
                      block_idx_first_scheduled_token=zero, block_idx_last_scheduled_token=zero,
                      num_computed_tokens=zero)
        options["block_size_to_align"] = 64
    x = inputs.pop("x")  # (dim, T)
    dim, tokens = x.shape
    source = jnp.asarray(rng.standard_normal((tokens + 5, dim + 11)), jnp.float32)
    source = source.at[2:2 + tokens, 7:7 + dim].set(x.T)
    want_out, want_state = side.run_conv("causal_conv1d_fn", dict(inputs, x=x), **options)
    *parts, state = causal_conv1d_fn_columns(source, (2, 2 + tokens), (7, 7 + dim), (5, 16),
                                                  **inputs, **options)
    assert [p.shape for p in parts] == [(tokens, 5), (tokens, 11), (tokens, dim - 16)]
    np.testing.assert_array_equal(np.concatenate([np.asarray(p) for p in parts], axis=1), want_out.T)
    np.testing.assert_array_equal(np.asarray(state), want_state)
    ref_out, _ = side.conv_reference("causal_conv1d_fn", dict(inputs, x=x), **options)
    padding = np.isnan(ref_out).all(axis=0)  # the reference leaves the padding sequence's rows NaN
    assert padding.sum() == 5 and (want_out[:, padding] == 0).all()
    assert_close(want_out[:, ~padding], ref_out[:, ~padding], "float32", "columns form out")

    loss = lambda s: causal_conv1d_fn_columns(s, (2, 2 + tokens), (7, 7 + dim), (5,),  # noqa: E731
                                                   **inputs, **options)[0].sum()
    with pytest.raises(ValueError, match="causal_conv1d_fn_columns.*inference-only"):
        jax.grad(loss)(source)
    for rows, columns, splits, message in [((0, tokens + 6), (7, 7 + dim), (5,), "rows"),
                                           ((2, 2 + tokens), (7, 7 + dim + 5), (5,), "columns"),
                                           ((2, 2 + tokens), (7, 7 + dim), (9, 5), "splits")]:
        with pytest.raises(ValueError, match=message):
            causal_conv1d_fn_columns(source, rows, columns, splits, **inputs, **options)


def test_no_tokens_is_a_no_op(side, rng):
    dim, width = 8, 4
    state = side.array(rng.standard_normal((3, dim, width - 1)), "float32")
    weight = side.array(rng.standard_normal((dim, width)), "float32")
    empty = side.array(np.zeros((0, dim)), "float32")
    out, new_state = side.run_conv("causal_conv1d_fn", dict(
        x=empty.T, weight=weight, conv_states=state, query_start_loc=_index(side, [0, 0]),
        cache_indices=_index(side, [1]), out=empty.T), validate_indices=True)
    assert out.shape == (dim, 0)
    np.testing.assert_array_equal(new_state, side.numpy(state))
    for qsl in (None, _index(side, [0])):
        out, new_state = side.run_conv("causal_conv1d_update", dict(
            x=empty, conv_state=state, weight=weight, query_start_loc=qsl,
            conv_state_indices=_index(side, np.zeros(0)), out=empty), validate_indices=True)
        assert out.shape == (0, dim)
        np.testing.assert_array_equal(new_state, side.numpy(state))


# int32 under x64 (the case issue 17 reported) runs on the GPU; CI covers the path with int64.
@pytest.mark.parametrize("index_dtype", [pytest.param("int32", marks=pytest.mark.slow), "int64"])
def test_jax_x64_mode(index_dtype, rng):
    """With jax_enable_x64 on, int32 and int64 indices work, eager and
    jitted; an int64 slot past the int32 range stays out of range (skipped),
    it does not wrap onto a real slot."""
    jax = pytest.importorskip("jax")
    side = JaxSide()
    with jax.enable_x64(True):
        inputs = _fn_inputs(side, rng, seqlens=(2, 3, 4), width=4, dtype="float32", bias=True,
                            layout="SD")
        inputs.update({k: inputs[k].astype(index_dtype) for k in ("query_start_loc", "cache_indices")})
        want_out, want_state = side.conv_reference("causal_conv1d_fn", inputs)
        prefill = jax.jit(lambda arrays: side.impl.causal_conv1d_fn(**arrays))
        for got_out, got_state in (side.run_conv("causal_conv1d_fn", inputs), prefill(inputs)):
            assert_close(side.numpy(got_out), want_out, "float32", f"x64 {index_dtype} prefill out")
            assert_close(side.numpy(got_state), want_state, "float32", f"x64 {index_dtype} prefill state")
        update = _update_inputs(side, rng, dtype="float32", spec=True, columns=False)
        update.update({k: update[k].astype(index_dtype)
                       for k in ("query_start_loc", "conv_state_indices", "num_accepted_tokens")})
        want = side.conv_reference("causal_conv1d_update", update, activation="silu")
        got = side.run_conv("causal_conv1d_update", update, activation="silu", max_query_len=3)
        for g, w, what in zip(got, want, ("out", "state")):
            assert_close(g, w, "float32", f"x64 {index_dtype} decode {what}")
        if index_dtype == "int64":
            slots = np.asarray(inputs["cache_indices"])
            wrapped = dict(inputs, cache_indices=side.jnp.asarray(
                np.where(np.arange(3) == 0, slots + 2**32, slots)))
            got_out, got_state = map(side.numpy, prefill(wrapped))
            assert np.isnan(got_out[:, :2]).all(), "the sequence on slot 2**32 + s is not poisoned"
            np.testing.assert_array_equal(got_state[slots[0]], side.numpy(inputs["conv_states"])[slots[0]])


def test_torch_ops_trace_without_graph_breaks(rng):
    """torch.compile(fullgraph=True) over causal_conv1d_fn, _update and
    rms_norm_gated: the host checks are skipped while tracing and the kernels
    are custom ops with fake implementations (backend aot_eager, so on the
    CPU; the compiled GPU run is tests/test_torch_compile.py). Matches eager,
    the conv state written in place."""
    torch = pytest.importorskip("torch")
    side = TorchSide()
    inputs = _fn_inputs(side, rng, seqlens=(2, 3, 1), width=4, dtype="float32", bias=True,
                        layout="SD")
    norm_weight = side.array(rng.standard_normal(24), "float32")

    def step(x, conv_states):
        conv = side.impl.causal_conv1d_fn(x, inputs["weight"], inputs["bias"], conv_states,
                                          inputs["query_start_loc"], inputs["cache_indices"],
                                          inputs["has_initial_state"])
        last = side.impl.causal_conv1d_update(conv.t()[:2].contiguous(), conv_states,
                                              inputs["weight"], activation="silu",
                                              conv_state_indices=inputs["cache_indices"][:2])
        return side.impl.rms_norm_gated(last, norm_weight, z=last, group_size=8)

    eager_state, compiled_state = inputs["conv_states"].clone(), inputs["conv_states"].clone()
    want = step(inputs["x"], eager_state)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(inputs["x"], compiled_state)
    assert not torch.isnan(want).any()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(compiled_state, eager_state, rtol=0, atol=0, equal_nan=True)
