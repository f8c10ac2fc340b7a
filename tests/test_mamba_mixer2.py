"""The Mamba-2 mixer in each framework vs the float64 numpy mixer
(prefill-only, decode-only and mixed batches with padding requests and
padding tokens; weights from a safetensors checkpoint the test writes), the
PyTorch and Flax mixers on the same weights, sequences continued across
frameworks on one shared cache, and bad configs."""

import dataclasses
import importlib
import re

import numpy as np
import pytest

import bridge
from bridge.spec.mixer_metadata import build_mamba2_metadata
from bridge.spec.mixer_sharding import MixerDims
from bridge.spec.ssd_contract import chunk_metadata
from frameworks import JaxSide, TorchSide
from mixer_reference import mixer_ref, random_weights

CONFIG = dict(hidden_size=16, ssm_state_size=16, conv_kernel_size=4, intermediate_size=32,
              use_conv_bias=True, use_bias=True, n_groups=2, num_heads=4, head_dim=8,
              rms_norm_eps=1e-5, chunk_size=16)
DIMS = MixerDims(32, 2, 4, 8, 16)
WIDTH, NUM_BLOCKS, PAD = 4, 8, 0
PREFIX = "backbone.layers.0.mixer."


def _new_mixer(side, **changes):
    """A mixer on the side's device (torch modules start on the CPU)."""
    mixer = side.impl.MambaMixer2(**dict(CONFIG, **changes))
    return mixer.to(side.device) if side.name == "torch" else mixer


def _new_cache(mixer):
    """A torch-owned shared cache on the device the kernels run on."""
    return bridge.MambaStateCache(mixer.get_state_shape(), "float32", NUM_BLOCKS,
                                  device=str(TorchSide().device))


def _mixer(side, weights, tmp_path=None):
    mixer = _new_mixer(side)
    if tmp_path is None:
        mixer.load_weights(weights)
    else:  # through a safetensors file with a model's key prefix
        from safetensors.numpy import save_file
        path = str(tmp_path / "mixer.safetensors")
        save_file({PREFIX + k: v.astype(np.float32) for k, v in weights.items()}, path)
        mixer.load_safetensors(path, prefix=PREFIX)
    return mixer


def _cache(mixer, rng):
    """A torch-owned shared cache with random states; the null block poisoned."""
    cache = _new_cache(mixer)
    for name in ("conv", "ssm"):
        values = rng.standard_normal(tuple(cache.torch(name).shape))
        values[PAD] = np.nan
        cache.torch(name).copy_(TorchSide().array(values, "float32"))
    return cache


BATCHES = {  # (query_lens, num_computed_tokens, slots, num_decodes, padding tokens)
    "prefill": ([5, 20, 1], [0, 7, 4], [1, 2, 4], 0, 0),
    "decode": ([1, 1, 1], [3, 9, 2], [3, PAD, 5], 3, 2),
    "mixed": ([1, 1, 5, 20, 1], [6, 2, 0, 7, 4], [PAD, 3, 1, 2, 4], 2, 3),
}


@pytest.mark.parametrize("batch", list(BATCHES))
def test_mixer_matches_float64_reference(side, batch, rng, tmp_path):
    query_lens, computed, slots, num_decodes, padding = BATCHES[batch]
    weights = random_weights(rng, DIMS, CONFIG["hidden_size"], WIDTH, use_bias=True)
    mixer = _mixer(side, weights, tmp_path if batch == "mixed" else None)
    cache = _cache(mixer, rng)
    conv_before, ssm_before = (TorchSide().numpy(cache.torch(n)) for n in ("conv", "ssm"))
    metadata = build_mamba2_metadata(query_lens, computed, slots, num_decodes, CONFIG["chunk_size"],
                                     padding=np.array(slots) == PAD)
    tokens = sum(query_lens) + padding
    hidden = rng.standard_normal((tokens, CONFIG["hidden_size"]))
    got = side.run_mixer(mixer, hidden, cache, metadata)

    conv_after, ssm_after = (TorchSide().numpy(cache.torch(n)) for n in ("conv", "ssm"))
    cu = np.concatenate([[0], np.cumsum(query_lens)])
    want_conv, want_ssm = conv_before.copy(), ssm_before.copy()
    for q, slot in enumerate(slots):
        if slot == PAD:
            continue
        resumed = computed[q] > 0
        out, conv_final, ssm_final = mixer_ref(
            weights, DIMS, hidden[cu[q]:cu[q + 1]], [0, query_lens[q]], CONFIG["rms_norm_eps"],
            [conv_before[slot, :WIDTH - 1] if resumed else None],
            [ssm_before[slot] if resumed else None])
        np.testing.assert_allclose(got[cu[q]:cu[q + 1]], out, rtol=0, atol=2e-5 * np.abs(out).max(),
                                   err_msg=f"{side.name} {batch}: request {q}")
        want_conv[slot, :WIDTH - 1], want_ssm[slot] = conv_final[0], ssm_final[0]
    np.testing.assert_allclose(conv_after, want_conv, rtol=0, atol=1e-5, err_msg="conv states")
    np.testing.assert_allclose(ssm_after, want_ssm, rtol=0, atol=2e-5 * np.nanmax(np.abs(want_ssm)),
                               err_msg="ssm states")  # NaN in the null block stays NaN
    assert np.isfinite(got[:sum(query_lens)][np.repeat(np.array(slots) != PAD, query_lens)]).all()
    # Padding requests' and padding tokens' rows: the scan output 0, so out_proj's bias alone.
    unused = np.concatenate([np.repeat(np.array(slots) == PAD, query_lens), np.ones(padding, bool)])
    np.testing.assert_allclose(got[unused], np.broadcast_to(weights["out_proj.bias"], got[unused].shape),
                               rtol=0, atol=1e-6, err_msg=f"{side.name} {batch}: padding rows")


@pytest.mark.filterwarnings("ignore::bridge.dlpack.BridgeCopyWarning")
def test_torch_and_flax_mixers_agree_and_continue_each_other(rng):
    """Same weights (the Flax mixer loads the torch mixer's, zero-copy where
    it can): prefill in one framework and decode in the other on one shared
    cache equals the whole sequence prefilled in one framework."""
    torch_side, jax_side = TorchSide(), JaxSide()
    torch_mixer, flax_mixer = _new_mixer(torch_side), _new_mixer(jax_side)
    flax_mixer.load_weights(torch_mixer.checkpoint_weights())
    n, m = 9, 3
    hidden = rng.standard_normal((n + m, CONFIG["hidden_size"]))
    whole = build_mamba2_metadata([n + m], [0], [1], 0, CONFIG["chunk_size"])
    want = torch_side.run_mixer(torch_mixer, hidden, _cache(torch_mixer, rng), whole)

    for first, second in ((torch_side, jax_side), (jax_side, torch_side)):
        mixers = {"torch": torch_mixer, "jax": flax_mixer}
        cache = _cache(torch_mixer, rng)
        prefill = build_mamba2_metadata([n], [0], [1], 0, CONFIG["chunk_size"])
        got = [first.run_mixer(mixers[first.name], hidden[:n], cache, prefill)]
        for t in range(n, n + m):
            decode = build_mamba2_metadata([1], [t], [1], 1, CONFIG["chunk_size"])
            got.append(second.run_mixer(mixers[second.name], hidden[t:t + 1], cache, decode))
        np.testing.assert_allclose(np.concatenate(got), want, rtol=0, atol=2e-5 * np.abs(want).max(),
                                   err_msg=f"prefill in {first.name}, decode in {second.name}")


def test_bad_configs_and_checkpoints_raise(side, rng):
    with pytest.raises(ValueError, match="`intermediate_size`"):
        side.impl.MambaMixer2(**dict(CONFIG, intermediate_size=40))
    with pytest.raises(ValueError, match="`n_groups`"):
        side.impl.MambaMixer2(**dict(CONFIG, n_groups=3))
    mixer = _new_mixer(side)
    weights = random_weights(rng, DIMS, CONFIG["hidden_size"], WIDTH, use_bias=True)
    with pytest.raises(ValueError, match="`dt_bias`"):
        mixer.load_weights(dict(weights, dt_bias=np.zeros(5)))
    with pytest.raises(ValueError, match="`norm.weight`"):
        mixer.load_weights({k: v for k, v in weights.items() if k != "norm.weight"})


def test_speculative_decoding_matches_reference(side, rng):
    """num_spec = 1: each decode request feeds 2 tokens, every token's SSM
    state goes to its own slot, the conv state keeps the drafted inputs.
    Step 2 continues request 0 after both tokens were accepted and request
    1 after only the first; a third request is padding."""
    weights = random_weights(rng, DIMS, CONFIG["hidden_size"], WIDTH, use_bias=True)
    mixer = _new_mixer(side, num_spec=1)
    mixer.load_weights(weights)
    cache = _cache(mixer, rng)
    conv_before, ssm_before = (TorchSide().numpy(cache.torch(n)) for n in ("conv", "ssm"))
    slots = np.array([[1, 2], [3, 4], [PAD, PAD]])
    hidden = rng.standard_normal((2, 6, CONFIG["hidden_size"]))  # (step, tokens)
    got = []
    for step, accepted in enumerate(([1, 1, 1], [2, 1, 1])):
        metadata = build_mamba2_metadata([2, 2, 2], [5, 5, 5], slots, 3, CONFIG["chunk_size"],
                                         num_accepted_tokens=accepted, padding=[False, False, True])
        got.append(side.run_mixer(mixer, hidden[step], cache, metadata))

    def reference(q, tokens):
        return mixer_ref(weights, DIMS, tokens, [0, len(tokens)], CONFIG["rms_norm_eps"],
                         [conv_before[slots[q, 0], :WIDTH - 1]], [ssm_before[slots[q, 0]]])[0]

    for q, kept in ((0, [0, 1]), (1, [0])):  # tokens of step 1 that step 2 builds on
        first = hidden[0, 2 * q:2 * q + 2]
        want = reference(q, np.concatenate([first[kept], hidden[1, 2 * q:2 * q + 2]]))
        tol = 2e-5 * np.abs(want).max()
        np.testing.assert_allclose(got[0][2 * q:2 * q + 2], reference(q, first), rtol=0, atol=tol,
                                   err_msg=f"{side.name}: step 1, request {q}")
        np.testing.assert_allclose(got[1][2 * q:2 * q + 2], want[-2:], rtol=0, atol=tol,
                                   err_msg=f"{side.name}: step 2, request {q}")
    assert np.isnan(TorchSide().numpy(cache.torch("ssm"))[PAD]).all(), "the null block was written"


@pytest.mark.slow(side="jax")
def test_prefix_caching_all_mode_matches_reference(side, rng):
    """mamba_block_size = chunk_size = 16, block tables per request. Request
    A: prefill 21 tokens, resume with 13 more (reading the partial block,
    crossing the boundary at 32), then decode 1; request B: prefill 5, decode
    2, batched with A. Every output equals the float64 mixer over the whole
    sequence, and block k of A holds the state after token 16 (k + 1) (the
    last block: after the last token)."""
    block = CONFIG["chunk_size"]
    weights = random_weights(rng, DIMS, CONFIG["hidden_size"], WIDTH, use_bias=True)
    mixer = _new_mixer(side)
    mixer.load_weights(weights)
    cache = _new_cache(mixer)
    tables = {"A": [1, 2, 3], "B": [4, 5, 6]}
    tokens = {"A": rng.standard_normal((35, CONFIG["hidden_size"])),
              "B": rng.standard_normal((7, CONFIG["hidden_size"]))}
    done = {"A": 0, "B": 0}
    got = {"A": [], "B": []}
    steps = [[("A", 21), ("B", 5)], [("B", 1), ("A", 13)], [("A", 1), ("B", 1)]]  # decodes first
    for step in steps:
        num_decodes = sum(1 for name, n in step if n == 1 and done[name] > 0)
        metadata = build_mamba2_metadata([n for _, n in step], [done[name] for name, _ in step],
                                         [tables[name] for name, _ in step], num_decodes, block,
                                         mamba_block_size=block)
        hidden = np.concatenate([tokens[name][done[name]:done[name] + n] for name, n in step])
        out = side.run_mixer(mixer, hidden, cache, metadata)
        start = 0
        for name, n in step:
            got[name].append(out[start:start + n])
            start += n
            done[name] += n

    conv, ssm = (TorchSide().numpy(cache.torch(n)) for n in ("conv", "ssm"))
    for name in ("A", "B"):
        want, _, _ = mixer_ref(weights, DIMS, tokens[name], [0, done[name]], CONFIG["rms_norm_eps"])
        np.testing.assert_allclose(np.concatenate(got[name]), want, rtol=0,
                                   atol=2e-5 * np.abs(want).max(), err_msg=f"{side.name}: request {name}")
    for k, length in enumerate([16, 32, 35]):
        _, want_conv, want_ssm = mixer_ref(weights, DIMS, tokens["A"][:length], [0, length],
                                           CONFIG["rms_norm_eps"])
        slot = tables["A"][k]
        np.testing.assert_allclose(conv[slot, :WIDTH - 1], want_conv[0], rtol=0, atol=1e-5,
                                   err_msg=f"{side.name}: conv state of block {k}")
        np.testing.assert_allclose(ssm[slot], want_ssm[0], rtol=0, atol=2e-5 * np.abs(want_ssm).max(),
                                   err_msg=f"{side.name}: ssm state of block {k}")


def _cache_numpy(cache):
    return [TorchSide().numpy(cache.torch(n)).copy() for n in ("conv", "ssm")]


def _checking(side, mixer, value=True):
    """The mixer with its host value checks switched on (or off)."""
    mixer.validate_indices = value
    return mixer


MIXED = build_mamba2_metadata([1, 1, 5, 20], [6, 2, 0, 7], [5, 3, 1, 2], 2, CONFIG["chunk_size"])
BAD_CALLS = {  # name: (metadata changes, hidden rows, the error names)
    "prefill slot past the cache": (dict(state_indices_tensor_p=np.array([1, NUM_BLOCKS], np.int32)), 27,
                                    "metadata.state_indices_tensor_p"),
    "negative decode slot": (dict(state_indices_tensor_d=np.array([5, -1], np.int32)), 27,
                             "metadata.state_indices_tensor_d"),
    "two decodes on one slot": (dict(state_indices_tensor_d=np.array([3, 3], np.int32)), 27,
                                "metadata.state_indices_tensor_d"),
    "a decode and a prefill on one slot": (dict(state_indices_tensor_p=np.array([5, 2], np.int32)), 27,
                                           "metadata.state_indices_tensor_p"),
    "fewer tokens than scheduled": ({}, 26, "hidden_states"),
    "another chunk size": (dict(chunk_size=32), 27, "metadata.chunk_size"),
    "float slots": (dict(state_indices_tensor_p=np.array([1, 2], np.float32)), 27,
                    "metadata.state_indices_tensor_p"),
    "chunks past the tokens": (dict(cu_chunk_seqlen_p=MIXED.cu_chunk_seqlen_p + 1), 27,
                               "metadata.cu_chunk_seqlen_p"),
}


@pytest.mark.parametrize("bad", list(BAD_CALLS))
def test_a_refused_call_leaves_every_cache_slot_unchanged(side, bad, rng):
    """Checked mode: everything is checked before the first write; the error
    names the metadata field (or argument) the caller passed."""
    changes, tokens, name = BAD_CALLS[bad]
    mixer = _checking(side, _new_mixer(side))
    cache = _cache(mixer, rng)
    before = _cache_numpy(cache)
    metadata = dataclasses.replace(MIXED, **changes)
    with pytest.raises(ValueError, match=f"MambaMixer2: `{re.escape(name)}`"):
        side.run_mixer(mixer, rng.standard_normal((tokens, CONFIG["hidden_size"])), cache, metadata)
    for got, want in zip(_cache_numpy(cache), before):
        np.testing.assert_array_equal(got, want)  # NaN in the null block compares equal


def test_unchecked_slots_outside_the_cache_touch_no_other_slot(side, rng):
    """Unchecked mode: a decode on slot -1 (no wraparound to the last slot)
    and a prefill past the cache are skipped, with NaN outputs; the other
    requests run as usual and every unscheduled slot is bitwise unchanged."""
    mixer = _checking(side, _new_mixer(side), False)
    cache = _cache(mixer, rng)
    before = _cache_numpy(cache)
    metadata = dataclasses.replace(MIXED, state_indices_tensor_d=np.array([-1, 3], np.int32),
                                   state_indices_tensor_p=np.array([NUM_BLOCKS + 2, 2], np.int32))
    out = side.run_mixer(mixer, rng.standard_normal((27, CONFIG["hidden_size"])), cache, metadata)
    assert np.isnan(out[0]).all() and np.isnan(out[2:7]).all(), "skipped requests must give NaN"
    assert np.isfinite(out[1]).all() and np.isfinite(out[7:27]).all()
    untouched = [s for s in range(NUM_BLOCKS) if s not in (3, 2)]
    for got, want in zip(_cache_numpy(cache), before):
        np.testing.assert_array_equal(got[untouched], want[untouched])


@pytest.mark.parametrize("rows", [False, True])
def test_scatter_states_skips_padding_and_out_of_range_slots(side, rows, rng):
    """-1 and past-the-end slots and the null block are never written (the
    cache is an interior view of a larger buffer whose guard rows must stay
    as they were); an out-of-range source row writes NaN."""
    module = importlib.import_module(f"{side.impl.__name__}.mamba_mixer2")
    buffer = rng.standard_normal((8, 2, 3, 4)).astype(np.float32)
    states = rng.standard_normal((5, 2, 3, 4)).astype(np.float32)
    slots = np.array([-1, PAD, 6, 2, 4], np.int32)
    source = np.array([0, 1, 2, 4, 7], np.int32) if rows else None
    native = side.array(buffer, "float32")
    args = [native[1:7], side.array(slots, "int32"), side.array(states, "float32")]
    args.append(None if source is None else side.array(source, "int32"))
    result = module._scatter_states(*args)
    got = side.numpy(native) if result is None else np.concatenate(
        [buffer[:1], side.numpy(result), buffer[7:]])
    want = buffer.astype(np.float64)
    want[1 + 2] = states[4 if rows else 3]
    want[1 + 4] = np.nan if rows else states[4]
    np.testing.assert_array_equal(got, want)


def test_block_table_columns_outside_the_table_pick_no_slot(side):
    """Prefix caching: a column past either end of a block table gives slot
    -1 (skipped by every kernel), never a wrapped or clamped entry."""
    module = importlib.import_module(f"{side.impl.__name__}.mamba_mixer2")
    table = side.array(np.array([[4, 5, 6], [7, 8, 9], [1, 2, 3]], np.int32), "int32")
    picked = module._pick(table, side.array(np.array([-1, 3, 1], np.int32), "int32"))
    np.testing.assert_array_equal(side.numpy(picked), [-1, -1, 2])


def test_build_metadata_refuses_the_null_block_for_a_real_request():
    with pytest.raises(ValueError, match=r"requests \[1\] use the null block"):
        build_mamba2_metadata([1, 1], [3, 3], [2, PAD], 2, CONFIG["chunk_size"])
    build_mamba2_metadata([1, 1], [3, 3], [2, PAD], 2, CONFIG["chunk_size"], padding=[False, True])
    with pytest.raises(ValueError, match=r"requests \[0\] use the null block"):  # a block it spans
        build_mamba2_metadata([20], [0], [[PAD, 3]], 0, 16, mamba_block_size=16)


def test_complex_checkpoint_tensors_are_refused(side, rng):
    mixer = _new_mixer(side)
    weights = random_weights(rng, DIMS, CONFIG["hidden_size"], WIDTH, use_bias=True)
    with pytest.raises(ValueError, match="`D` is complex"):
        mixer.load_weights(dict(weights, D=weights["D"].astype(np.complex64)))


def test_jitted_step_takes_the_metadata_and_reuses_one_compilation(rng):
    """Two prefill batches with the same counts and chunk count but other
    lengths: one trace of a jitted function of the metadata (a pytree whose
    counts are static), and no new compilation of forward_on_cache's step."""
    from jax_impl.mamba_mixer2 import _jitted_step
    jax_side = JaxSide()
    mixer = _new_mixer(jax_side)
    cache = _cache(mixer, rng)
    traces, compilations = [], []
    step = jax_side.jax.jit(lambda meta: traces.append(1) or meta.query_start_loc_p[1:] * 2)
    for lens in ([3, 22], [6, 19]):  # 1 + 2 chunks of 16 either way
        metadata = build_mamba2_metadata(lens, [0, 0], [1, 2], 0, CONFIG["chunk_size"])
        np.testing.assert_array_equal(step(metadata), np.cumsum(lens) * 2)
        out = jax_side.run_mixer(mixer, rng.standard_normal((25, CONFIG["hidden_size"])), cache, metadata)
        assert np.isfinite(out).all()
        compilations.append(_jitted_step._cache_size())
    assert len(traces) == 1
    assert compilations[1] == compilations[0]
    chunks = chunk_metadata(np.array([0, 5, 30]), CONFIG["chunk_size"])
    assert len(jax_side.jax.tree_util.tree_leaves(chunks)) == 3  # the chunk metadata: a pytree too


def _torch_decode_inputs(rng, mixer, cache, batch, slots):
    torch_side = TorchSide()
    metadata = build_mamba2_metadata([1] * batch, [4] * batch, slots, batch, CONFIG["chunk_size"],
                                     padding=np.array(slots) == PAD)
    hidden = torch_side.array(rng.standard_normal((batch, CONFIG["hidden_size"])), "float32")
    return hidden, metadata


# Speculative decoding with prefix caching: a decode (two tokens of its
# previous step, in block 1, accepted) and a prefill, on block tables.
SPEC_PREFIX = build_mamba2_metadata([3, 5], [21, 0], [[PAD, 1, 2, 3], [4, 5, 6, 7]], 1, CONFIG["chunk_size"],
                                    num_accepted_tokens=[2], mamba_block_size=CONFIG["chunk_size"],
                                    prev_last_scheduled_idx=[1, -1])
SYNC_FREE = {"mixed": ({}, MIXED, 27), "spec_prefix": (dict(num_spec=2), SPEC_PREFIX, 8)}


@pytest.mark.parametrize("batch", list(SYNC_FREE))
def test_torch_forward_on_device_metadata_makes_no_host_copy_or_sync(batch, rng):
    """Metadata moved once (metadata_to_device): forward creates no tensor
    from host data and calls no op that syncs (item, nonzero, masked
    indexing), so a CUDA graph can capture it."""
    torch_side = TorchSide()
    torch = torch_side.torch
    from torch.utils._python_dispatch import TorchDispatchMode

    forbidden = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                 torch.ops.aten.masked_select.default, torch.ops.aten.lift_fresh.default}

    class NoHostWork(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            assert func not in forbidden, f"forward called {func}"
            return func(*args, **(kwargs or {}))

    changes, metadata, tokens = SYNC_FREE[batch]
    mixer = _new_mixer(torch_side, **changes)
    cache, reference = _cache(mixer, rng), _new_cache(mixer)
    _copy_cache(cache, reference)
    hidden = torch_side.array(rng.standard_normal((tokens, CONFIG["hidden_size"])), "float32")
    on_device = torch_side.impl.metadata_to_device(metadata, hidden.device)
    with torch.no_grad():
        want = mixer(hidden, reference, metadata)
        with NoHostWork():
            got = mixer(hidden, cache, on_device)
    assert torch.equal(got, want)
    with pytest.raises(AssertionError, match="lift_fresh"), torch.no_grad(), NoHostWork():
        mixer(hidden, cache, metadata)  # numpy metadata: copied in every call


def _copy_cache(source, target):
    for name in ("conv", "ssm"):
        target.torch(name).copy_(source.torch(name))


def test_captured_decode_step_matches_forward(rng):
    """CapturedDecodeStep (a CUDA graph on a GPU; on the CPU the same static
    buffers run eagerly): steps with other slots and inputs equal plain
    forward calls, padding requests included; the warm-up writes nothing."""
    torch_side = TorchSide()
    torch = torch_side.torch
    mixer = _new_mixer(torch_side)
    cache, reference = _cache(mixer, rng), _new_cache(mixer)
    _copy_cache(cache, reference)
    before = _cache_numpy(cache)
    step = torch_side.impl.CapturedDecodeStep(mixer, cache, batch_size=3)
    for got, want in zip(_cache_numpy(cache), before):
        np.testing.assert_array_equal(got, want)
    for slots in ([1, 4, PAD], [6, PAD, 2], [1, 4, 6]):
        hidden, metadata = _torch_decode_inputs(rng, mixer, cache, 3, slots)
        with torch.no_grad():
            want = torch_side.numpy(mixer(hidden, reference, metadata))
        got = torch_side.numpy(step.run(hidden, metadata))
        real = np.array(slots) != PAD
        np.testing.assert_allclose(got[real], want[real], rtol=0, atol=1e-6 * np.abs(want).max())
        for got_state, want_state in zip(_cache_numpy(cache), _cache_numpy(reference)):
            np.testing.assert_array_equal(got_state, want_state)
    _, two = _torch_decode_inputs(rng, mixer, cache, 2, [1, 4])
    with pytest.raises(ValueError, match="CapturedDecodeStep.run: `metadata` must be a decode batch of 3"):
        step.run(hidden, two)


def test_no_tokens_is_a_no_op(side, rng):
    mixer = _new_mixer(side)
    cache = _cache(mixer, rng)
    before = _cache_numpy(cache)
    metadata = build_mamba2_metadata([], [], np.zeros((0,), np.int32), 0, CONFIG["chunk_size"])
    assert side.run_mixer(mixer, np.zeros((0, CONFIG["hidden_size"])), cache, metadata).shape == (
        0, CONFIG["hidden_size"])
    for got, want in zip(_cache_numpy(cache), before):
        np.testing.assert_array_equal(got, want)


X64_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
import jax.numpy as jnp
import jax_impl
from bridge.spec.mixer_metadata import build_mamba2_metadata
from test_mamba_mixer2 import CONFIG
mixer = jax_impl.MambaMixer2(**CONFIG)
conv_shape, ssm_shape = mixer.get_state_shape()
rng = np.random.default_rng({seed})
conv = jnp.asarray(rng.standard_normal((4, *conv_shape)), jnp.float32)
ssm = jnp.asarray(rng.standard_normal((4, *ssm_shape)), jnp.float32)
hidden = jnp.asarray(rng.standard_normal((6, CONFIG["hidden_size"])), jnp.float32)
outs = []
for dtype in (np.int32, np.int64):
    metadata = build_mamba2_metadata([1, 5], [3, 2], [1, 2], 1, CONFIG["chunk_size"]).map_arrays(
        lambda a: a.astype(dtype) if a.dtype.kind == "i" else a)
    outs.append(np.asarray(jax.jit(mixer.__call__)(hidden, conv, ssm, metadata)[0]))
assert outs[0].dtype == np.float32 and np.isfinite(outs[0]).all(), outs[0]
np.testing.assert_array_equal(outs[0], outs[1])
"""


@pytest.mark.slow
def test_flax_mixer_runs_with_x64_on_int32_and_int64_metadata(rng):
    """jax_enable_x64 (a process-wide flag: in a subprocess), jitted with
    int32 and with int64 metadata: the same finite float32 outputs."""
    pytest.importorskip("jax")
    import os
    import subprocess
    import sys
    tests = os.path.dirname(os.path.abspath(__file__))
    script = X64_SCRIPT.format(tests=tests, seed=int(rng.integers(1 << 31)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=os.path.dirname(tests), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
