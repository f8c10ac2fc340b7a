"""The chunked scan (SSD prefill) in each framework: kernel vs the float64
reference (token by token; the package's chunked plain-ops form in float64
must agree with it), prefill vs decode,
split prefill vs one-shot, the batched form, bad input (checked), malformed
metadata (unchecked: bounds-safe, NaN-poisoned), T = 0."""

import numpy as np
import pytest

from bridge.spec.checks import CHECK_INDICES_ENV
from bridge.spec.ssd_contract import SsdLayout, batched_sequences, check_chunk_metadata_values, chunk_metadata
from frameworks import assert_close
from ssd_cases import CASES, CI_JAX_CASES, INDEX_ARGS, SsdCase, assert_ssd_close, ci_subset, make_ssd_inputs


@pytest.mark.parametrize("case", ci_subset(CASES, CI_JAX_CASES, side="jax"), ids=str)
def test_kernel_matches_float64_references(side, case, rng):
    arrays, dtypes, options = make_ssd_inputs(case, rng)
    inputs = side.native(arrays, dtypes)
    want_out, want_states = side.ssd_reference(inputs, **options)
    # The chunked plain-ops form (a benchmark baseline, and JAX's gradient reference) agrees.
    chunked_out, chunked_states = side.plain_ops_ssd(inputs, **options)
    assert_close(chunked_out, want_out, "float64", "plain-ops out", tol=1e-10)
    assert_close(chunked_states, want_states, "float64", "plain-ops states", tol=1e-10)

    got_out, got_states = side.run_ssd(inputs, **options)
    assert_ssd_close(got_out, want_out, case.input_dtype, f"{side.name} out, {case}")
    state_tolerance = max(case.input_dtype, case.state_dtype, key=lambda d: SSD_ORDER.index(d))
    assert_ssd_close(got_states, want_states, state_tolerance, f"{side.name} states, {case}")


SSD_ORDER = ["float32", "float16", "bfloat16"]  # loosest tolerance last


def _token_rows(native, rows):
    """The given token rows of every per-token input, as native arrays."""
    return {k: v[rows] for k, v in native.items()}


@pytest.mark.slow(side="jax")
def test_prefill_matches_decode(side, rng):
    """The chunked scan over two sequences equals selective_state_update run
    token by token from the same initial states."""
    case = SsdCase(seqlens=(19, 19), D="head")
    arrays, dtypes, options = make_ssd_inputs(case, rng)
    inputs = side.native(arrays, dtypes)
    prefill_out, prefill_final = side.run_ssd(inputs, **options)

    per_token = {k: inputs[k] for k in ("x", "dt", "B", "C", "z")}
    state = inputs["initial_states"]
    starts = arrays["cu_seqlens"][:-1]
    decode_out = np.full(prefill_out.shape, np.nan)
    for t in range(case.seqlens[0]):
        step = _token_rows(per_token, starts + t)
        out = side.zeros_like(step["x"])
        out, state = side.decode_step(state, **step, out=out, A=inputs["A"], D=inputs["D"],
                                      dt_bias=inputs["dt_bias"], dt_softplus=True)
        decode_out[starts + t] = side.numpy(out)
    assert_ssd_close(prefill_out, decode_out, "float32", f"{side.name} prefill vs decode outputs")
    assert_ssd_close(prefill_final, side.numpy(state), "float32", f"{side.name} prefill vs decode states")


def _chunk_ends(cu_seqlens, cu_chunk_seqlens, seq_idx, computed):
    """(sequence, position in the sequence) at the end of every chunk."""
    starts = np.asarray(cu_seqlens)[np.asarray(seq_idx)]
    return [(int(s), int(end - start + c)) for s, end, start, c in zip(
        seq_idx, cu_chunk_seqlens[1:], starts, np.asarray(computed)[np.asarray(seq_idx)])]


def test_split_prefill_equals_one_shot(side, rng):
    """Prefill in two parts (the second resuming from the first's states,
    with resumed chunk metadata) equals one-shot prefill: outputs, final
    states, and the states at every chunk end the two runs share (the
    block-aligned states that prefix caching stores)."""
    full = SsdCase(seqlens=(23, 40, 5), intermediate=True, initial_states=False)
    arrays, dtypes, options = make_ssd_inputs(full, rng)
    inputs = side.native(arrays, dtypes)
    one_out, one_states = side.run_ssd(inputs, **options)

    first_lengths = np.array([7, 21, 5])
    rest_lengths = np.array(full.seqlens)[:2] - first_lengths[:2]
    cu = arrays["cu_seqlens"]
    first_rows = np.concatenate([np.arange(cu[q], cu[q] + n) for q, n in enumerate(first_lengths)])
    rest_rows = np.setdiff1d(np.arange(cu[-1]), first_rows)

    def part(rows, lengths, computed, initial_states):
        cu_part = np.concatenate([[0], np.cumsum(lengths)])
        metadata = chunk_metadata(cu_part, full.chunk_size, computed)
        part_arrays = {k: arrays[k][rows] for k in ("x", "dt", "B", "C", "z")}
        part_arrays.update(A=arrays["A"], D=arrays["D"], dt_bias=arrays["dt_bias"],
                           cu_seqlens=cu_part, cu_chunk_seqlens=metadata.cu_chunk_seqlens,
                           seq_idx=metadata.seq_idx, last_chunk_indices=metadata.last_chunk_indices,
                           out=np.full((len(rows),) + arrays["x"].shape[1:], np.nan))
        part_inputs = side.native(part_arrays, {k: dtypes.get(k, "int32") for k in part_arrays})
        if initial_states is not None:
            part_inputs["initial_states"] = initial_states
        out, states = side.run_ssd(part_inputs, **options)
        return out, states, metadata

    first_out, first_states, first_meta = part(first_rows, first_lengths, None, None)
    final_first = first_states[first_meta.last_chunk_indices]
    # The third sequence ends in the first part; the second part resumes the other two.
    resumed = side.native({"s": final_first[:2]}, {"s": "float32"})["s"]
    rest_out, rest_states, rest_meta = part(rest_rows, rest_lengths, first_lengths[:2], resumed)

    assert_ssd_close(first_out, one_out[first_rows], "float32", "first part outputs")
    assert_ssd_close(rest_out, one_out[rest_rows], "float32", "resumed part outputs")
    one_meta = {k: arrays[k] for k in ("cu_chunk_seqlens", "seq_idx")}
    one_ends = dict(zip(_chunk_ends(cu, one_meta["cu_chunk_seqlens"], one_meta["seq_idx"],
                                    np.zeros(3, int)), one_states))
    rest_cu = np.concatenate([[0], np.cumsum(rest_lengths)])
    rest_ends = _chunk_ends(rest_cu, rest_meta.cu_chunk_seqlens, rest_meta.seq_idx, first_lengths[:2])
    shared = [(key, state) for key, state in zip(rest_ends, rest_states) if key in one_ends]
    # Resumed chunks end on multiples of chunk_size, as the one-shot run's do.
    assert len(shared) == len(rest_ends), (rest_ends, list(one_ends))
    for key, state in shared:
        assert_ssd_close(state, one_ends[key], "float32", f"state at chunk end {key}")
    assert_ssd_close(final_first[2], one_states[arrays["last_chunk_indices"][2]], "float32",
                     "final state of the sequence done in the first part")


@pytest.mark.parametrize("with_seq_idx", [False, True])
def test_batched_form(side, with_seq_idx, rng):
    """``mamba_chunk_scan_combined`` (batch, seqlen, ...) equals the float64
    recurrence over the sequences its rows (and seq_idx) define."""
    batch, seqlen, chunk = 2, 37, 16
    case = SsdCase(seqlens=(seqlen,) * batch, chunk_size=chunk)
    arrays, dtypes, _ = make_ssd_inputs(case, rng)
    seq_idx = (np.stack([np.repeat([0, 1], [10, 27]), np.full(seqlen, 2)]) if with_seq_idx else None)
    cu, first, last = batched_sequences(batch, seqlen, seq_idx)
    inputs = side.native(arrays, dtypes)
    initial_states = side.native({"s": arrays["initial_states"]}, {"s": "float32"})["s"]
    varlen_initial = np.zeros((len(cu) - 1,) + arrays["initial_states"].shape[1:])
    varlen_initial[first] = arrays["initial_states"]

    batched = {k: inputs[k].reshape((batch, seqlen) + tuple(inputs[k].shape[1:]))
               for k in ("x", "dt", "B", "C", "z")}
    out, final = side.impl.mamba_chunk_scan_combined(
        **batched, A=inputs["A"], chunk_size=chunk, D=inputs["D"], dt_bias=inputs["dt_bias"],
        initial_states=initial_states, dt_softplus=True, return_final_states=True,
        seq_idx=side.native({"s": seq_idx}, {"s": "int32"})["s"] if with_seq_idx else None)
    reference_inputs = dict(inputs, cu_seqlens=side.native({"c": cu}, {"c": "int32"})["c"],
                            initial_states=side.native({"s": varlen_initial}, {"s": "float32"})["s"])
    want_out, want_final = side.ssd_reference(reference_inputs, dt_softplus=True)
    assert_ssd_close(side.numpy(out).reshape(want_out.shape), want_out, "float32", "batched out")
    assert_ssd_close(side.numpy(final), want_final[last], "float32", "batched final states")


def _replace(name, make):
    def mutate(arrays, dtypes, options):
        arrays[name] = make(arrays)
    return mutate


def _option(name, value):
    def mutate(arrays, dtypes, options):
        options[name] = value
    return mutate


def _dtype(name, dtype):
    def mutate(arrays, dtypes, options):
        dtypes[name] = dtype
    return mutate


BAD_INPUTS = [
    ("x", _replace("x", lambda a: a["x"][:, 0])),
    ("dt", _replace("dt", lambda a: a["dt"][:, :1])),
    ("A", _replace("A", lambda a: a["A"][:-1])),
    ("B", _replace("B", lambda a: np.concatenate([a["B"], a["B"][:, :1]], axis=1))),
    ("C", _replace("C", lambda a: a["C"][:, :, :-1])),
    ("C", _dtype("C", "bfloat16")),
    ("D", _replace("D", lambda a: np.ones(7))),
    ("z", _replace("z", lambda a: a["z"][:-1])),
    ("dt_bias", _replace("dt_bias", lambda a: a["dt_bias"][:-1])),
    ("initial_states", _replace("initial_states", lambda a: a["initial_states"][:-1])),
    ("out", _replace("out", lambda a: a["out"][:, :-1])),
    ("cu_seqlens", _replace("cu_seqlens", lambda a: a["cu_seqlens"] + np.r_[0, 0, 0, 0, 0, 1])),
    ("cu_seqlens", _replace("cu_seqlens", lambda a: np.r_[0, 1, 1, 32, 49, 89])),
    ("cu_seqlens", _dtype("cu_seqlens", "float32")),
    ("cu_chunk_seqlens", _replace("cu_chunk_seqlens",
                                  lambda a: np.r_[0, 1, 16, 32, 48, 49, 70, 86, 89])),
    ("seq_idx", _replace("seq_idx", lambda a: np.roll(a["seq_idx"], 1))),
    ("seq_idx", _replace("seq_idx", lambda a: a["seq_idx"][:-1])),
    ("last_chunk_indices", _replace("last_chunk_indices", lambda a: a["last_chunk_indices"] - 1)),
    ("chunk_size", _option("chunk_size", 24)),
    ("dt_limit", _option("dt_limit", (1.0, 0.5))),
    ("state_dtype", _option("state_dtype", "int32")),
]


@pytest.mark.parametrize("arg,mutate", BAD_INPUTS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BAD_INPUTS)])
def test_bad_input_names_the_argument(side, arg, mutate, rng):
    """Shapes, dtypes and options always; metadata values in the debug mode."""
    arrays, dtypes, options = make_ssd_inputs(SsdCase(), rng)
    mutate(arrays, dtypes, options)
    inputs = side.native(arrays, dtypes)
    with pytest.raises(ValueError, match=f"`{arg}`"):
        side.run_ssd(inputs, **options, validate_metadata=True)


def test_debug_mode_from_the_environment(side, rng, monkeypatch):
    """``$MAMBA_TWIN_CHECK_INDICES=1`` turns the metadata value checks on
    (torch's default is off; JAX checks concrete values by default)."""
    arrays, dtypes, options = make_ssd_inputs(SsdCase(seqlens=(5, 20), nheads=2, ngroups=1), rng)
    arrays["seq_idx"] = np.array([0, 1, 7])
    inputs = side.native(arrays, dtypes)
    monkeypatch.setenv(CHECK_INDICES_ENV, "1")
    with pytest.raises(ValueError, match="`seq_idx` must hold sequence numbers in \\[0, 2\\)"):
        side.run_ssd(inputs, **options)


def test_index_lists_are_refused_by_name(side, rng):
    arrays, dtypes, options = make_ssd_inputs(SsdCase(seqlens=(5,), nheads=2, ngroups=1), rng)
    inputs = dict(side.native(arrays, dtypes), seq_idx=arrays["seq_idx"].tolist())
    with pytest.raises(ValueError, match="`seq_idx` must be an array, got list"):
        side.run_ssd(inputs, **options)


# Malformed metadata on the unchecked path, for seqlens (5, 20) and chunk 16:
# well formed, cu_chunk_seqlens [0, 5, 21, 25], seq_idx [0, 1, 1],
# last_chunk_indices [0, 2]. Each case: the replaced metadata, the token rows
# whose outputs must be NaN, the final-state rows that must be NaN, and the
# rows that must be finite (a state, but not the well-formed one).
MALFORMED = {
    "seq_idx past num_seqs": (dict(seq_idx=[0, 1, 7]), (21, 25), [], [1]),
    "negative seq_idx": (dict(seq_idx=[0, 1, -1]), (21, 25), [], [1]),
    "seq_idx skips a sequence": (dict(seq_idx=[0, 2, 2]), (5, 25), [1], []),
    "cu_chunk_seqlens past T": (dict(cu_chunk_seqlens=[0, 5, 21, 40]), (21, 25), [1], []),
    "negative cu_chunk_seqlens": (dict(cu_chunk_seqlens=[-4, 5, 21, 25]), (0, 5), [0], []),
    "chunk longer than chunk_size": (dict(cu_chunk_seqlens=[0, 5, 25, 25]), (5, 25), [1], []),
    "non-monotone cu_chunk_seqlens": (dict(cu_chunk_seqlens=[0, 21, 5, 25]), (0, 25), [0, 1], []),
    "last_chunk_indices out of range": (dict(last_chunk_indices=[0, 9]), (0, 0), [], []),
}
SLOW_MALFORMED = ("negative seq_idx", "negative cu_chunk_seqlens", "chunk longer than chunk_size")
SENTINEL = 1234.5


def _guarded(torch, tensor, pad=3):
    """``tensor`` copied into the interior of a larger buffer filled with a
    sentinel (rows before and after, a column on each side): ``(view, guard)``,
    ``guard()`` asserting every element outside the view bitwise unchanged."""
    T, H, P = tensor.shape
    buffer = torch.full((T + 2 * pad, H, P + 2), SENTINEL, dtype=tensor.dtype, device=tensor.device)
    view = buffer[pad:pad + T, :, 1:P + 1]
    view.copy_(tensor)
    outside = torch.ones(buffer.shape, dtype=torch.bool, device=tensor.device)
    outside[pad:pad + T, :, 1:P + 1] = False

    def guard():
        assert torch.equal(buffer[outside], torch.full_like(buffer[outside], SENTINEL)), \
            "a write landed outside `out`"
    return view, guard


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_MALFORMED else [])
                                  for n in MALFORMED])
def test_malformed_metadata_stays_in_bounds(side, name, rng):
    """Unchecked path: no write outside `out` (torch: guard regions around an
    interior view), NaN exactly where the unchecked contract says, the
    well-formed reference everywhere else."""
    replaced, nan_tokens, nan_rows, other_rows = MALFORMED[name]
    case = SsdCase(seqlens=(5, 20), nheads=2, ngroups=1)
    arrays, dtypes, options = make_ssd_inputs(case, rng)
    inputs = side.native(arrays, dtypes)
    want_out, want_states = side.ssd_reference(inputs, **options)
    inputs.update(side.native({k: np.asarray(v) for k, v in replaced.items()},
                              {k: "int32" for k in replaced}))
    guard = lambda: None  # noqa: E731
    if side.name == "torch":
        inputs["out"], guard = _guarded(side.torch, inputs["out"])
    options = dict(options, state_dtype=None)
    result = side.impl.mamba_chunk_scan_combined_varlen(**inputs, **options, validate_metadata=False)
    out, states = (inputs["out"], result) if side.name == "torch" else result
    guard()

    want_out[slice(*nan_tokens)] = np.nan
    want_states[nan_rows] = np.nan
    states = side.numpy(states)
    assert np.isfinite(states[other_rows]).all(), f"{name}: rows {other_rows} should hold a state"
    states[other_rows] = want_states[other_rows]
    assert_close(side.numpy(out), want_out, "float32", f"{side.name} out, {name}")
    assert_close(states, want_states, "float32", f"{side.name} states, {name}")


@pytest.mark.parametrize("intermediate", [False, True])
def test_no_tokens_is_a_no_op(side, intermediate):
    """T = 0 (no sequences, no chunks): nothing runs, empty results."""
    H, P, N = 2, 16, 16
    floats = {"x": (0, H, P), "dt": (0, H), "A": (H,), "B": (0, 1, N), "C": (0, 1, N),
              "out": (0, H, P)}
    arrays = {k: np.zeros(shape) for k, shape in floats.items()}
    arrays.update(cu_seqlens=np.zeros(1), cu_chunk_seqlens=np.zeros(1), seq_idx=np.zeros(0),
                  last_chunk_indices=np.zeros(0))
    inputs = side.native(arrays, {k: "float32" if k in floats else "int32" for k in arrays})
    out, states = side.run_ssd(inputs, chunk_size=16, return_intermediate_states=intermediate,
                               state_dtype="float32", validate_metadata=True)
    assert out.shape == (0, H, P) and states.shape == (0, H, P, N)


def test_integer_like_chunk_size(side, rng):
    case = SsdCase(seqlens=(5, 20), nheads=2, ngroups=1)
    arrays, dtypes, options = make_ssd_inputs(case, rng)
    inputs = side.native(arrays, dtypes)
    want_out, want_states = side.ssd_reference(inputs, **options)
    out, states = side.run_ssd(inputs, **dict(options, chunk_size=np.int64(16)))
    assert_close(out, want_out, "float32", "out")
    assert_close(states, want_states, "float32", "states")
    with pytest.raises(ValueError, match="`chunk_size` must be an integer"):
        side.run_ssd(inputs, **dict(options, chunk_size=16.0))


def test_chunk_metadata_resumes_on_chunk_multiples(rng):
    seqlens = rng.integers(1, 100, size=6)
    computed = rng.integers(0, 80, size=6)
    cu = np.concatenate([[0], np.cumsum(seqlens)])
    chunk = 16
    metadata = chunk_metadata(cu, chunk, computed)
    layout = SsdLayout(num_tokens=int(cu[-1]), nheads=1, headdim=1, ngroups=1, dstate=1,
                       num_seqs=6, num_chunks=len(metadata.seq_idx), chunk_size=chunk, D_per_head=True)
    check_chunk_metadata_values(layout, **{k: getattr(metadata, k) if k != "cu_seqlens" else cu
                                          for k in INDEX_ARGS})
    for (seq, position), last in zip(_chunk_ends(cu, metadata.cu_chunk_seqlens, metadata.seq_idx, computed),
                                     np.isin(np.arange(len(metadata.seq_idx)), metadata.last_chunk_indices)):
        # Every chunk but a sequence's last ends on a multiple of chunk_size.
        assert last or position % chunk == 0, (seq, position)
    assert chunk_metadata([0, 5, 40, 41], 16, [0, 7, 32]).cu_chunk_seqlens.tolist() == [0, 5, 14, 30, 40, 41]


def test_torch_compile_fullgraph(rng):
    """The public torch function traces without graph breaks (no host sync or
    numpy while compiling: the stages are one custom op) and matches the
    reference. On the CPU the graph runs through aot_eager (inductor cannot
    call the interpreter's kernels); on a GPU through inductor."""
    from frameworks import TorchSide
    side = TorchSide()
    torch = side.torch
    arrays, dtypes, options = make_ssd_inputs(SsdCase(seqlens=(5, 20), nheads=2, ngroups=1), rng)
    inputs = side.native(arrays, dtypes)
    want_out, want_states = side.ssd_reference(inputs, **options)
    options = dict(options, state_dtype=torch.float32)

    def scan(inputs):
        return side.impl.mamba_chunk_scan_combined_varlen(**inputs, **options)

    backend = "inductor" if side.device.type == "cuda" else "aot_eager"
    states = torch.compile(scan, fullgraph=True, backend=backend)(inputs)
    assert_close(inputs["out"], want_out, "float32", "compiled out")
    assert_close(states, want_states, "float32", "compiled states")
