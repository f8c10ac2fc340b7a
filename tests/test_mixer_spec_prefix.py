"""Speculative decoding together with prefix caching ("all" mode) in both
mixers: decodes of 1 + num_spec tokens on block tables (per-token SSM
states written to the columns after the last scheduled block, continued
from the previous step's at num_accepted_tokens) next to prefills with
prefix caching, against the float64 mixer token by token; the two
frameworks taking turns on one shared cache; the accepted state copied out
with the copy specs equal to a plain prefill of the accepted tokens; and
bad metadata refused by field name before any write."""

import dataclasses
import re

import numpy as np
import pytest

import bridge
from bridge.spec.copy_spec import get_conv_copy_spec, get_temporal_copy_spec
from bridge.spec.mixer_metadata import build_mamba2_metadata
from frameworks import JaxSide, TorchSide
from mixer_reference import conv_state_ref, mixer_ref, random_weights
from test_mamba_mixer2 import CONFIG, DIMS, PAD, WIDTH

NUM_SPEC, BLOCK, NUM_BLOCKS = 2, CONFIG["chunk_size"], 20
SPEC_WIDTH, STATE_LEN = 1 + NUM_SPEC, WIDTH - 1 + NUM_SPEC
TABLES = {"A": [1, 2, 3, 4, 5], "B": [6, 7, 8, 9, 10], "C": [11, 12, 13, 14, 15], PAD: [PAD] * 5}
SPARE = {"A": (16, 17), "B": (18, 19)}  # (copy of the accepted state, plain prefill)
# Per step: decodes (request, num_accepted_tokens of its previous step) first,
# then prefills (request, tokens). B's decode in step 3 reads block 1 (its
# previous step's last scheduled block) while its last computed token lies in block 0.
STEPS = [dict(decode=[], prefill=[("A", 21), ("B", 14)]),
         dict(decode=[("A", 1), ("B", 1), (PAD, 1)], prefill=[("C", 20)]),
         dict(decode=[("A", 2), ("B", 1)], prefill=[("C", 13)]),
         dict(decode=[("A", 3), ("B", 2), ("C", 1)], prefill=[])]
FINAL_ACCEPTED = {"A": 1, "B": 3}


def _mixer(side, weights, **changes):
    mixer = side.impl.MambaMixer2(**{**CONFIG, "num_spec": NUM_SPEC, **changes})
    mixer = mixer.to(side.device) if side.name == "torch" else mixer
    mixer.load_weights(weights)
    return mixer


def _cache(mixer, rng):
    """A torch-owned shared cache of random states, the null block NaN."""
    cache = bridge.MambaStateCache(mixer.get_state_shape(), "float32", NUM_BLOCKS,
                                   device=str(TorchSide().device))
    for name in ("conv", "ssm"):
        values = rng.standard_normal(tuple(cache.torch(name).shape))
        values[PAD] = np.nan
        cache.torch(name).copy_(TorchSide().array(values, "float32"))
    return cache


def _states(cache):
    return {name: TorchSide().numpy(cache.torch(name)).copy() for name in ("conv", "ssm")}


class Requests:
    """The float64 side of a schedule: per request the accepted inputs, the
    previous step's drafted inputs and last scheduled block, and the
    outputs of the accepted tokens."""

    def __init__(self, weights, rng):
        self.weights, self.rng = weights, rng
        self.accepted = {name: np.zeros((0, CONFIG["hidden_size"])) for name in "ABC"}
        self.accepted_out = {name: np.zeros((0, CONFIG["hidden_size"])) for name in "ABC"}
        self.pending = {name: None for name in "ABC"}  # (inputs, outputs) of its last spec decode
        self.prev_block = {name: -1 for name in "ABC"}

    def accept(self, name, count):
        if self.pending[name] is not None:
            inputs, outputs = self.pending[name]
            self.accepted[name] = np.concatenate([self.accepted[name], inputs[:count]])
            self.accepted_out[name] = np.concatenate([self.accepted_out[name], outputs[:count]])
        self.pending[name] = None

    def metadata(self, step):
        """This step's requests (name, tokens, computed, is_decode) and metadata."""
        requests = []
        for name, accepted in step["decode"]:
            if name != PAD:
                self.accept(name, accepted)
            computed = 1 if name == PAD else len(self.accepted[name])
            requests.append((name, SPEC_WIDTH, computed, True))
        requests += [(name, n, len(self.accepted[name]), False) for name, n in step["prefill"]]
        metadata = build_mamba2_metadata(
            [n for _, n, _, _ in requests], [c for _, _, c, _ in requests],
            [TABLES[name] for name, *_ in requests], len(step["decode"]), BLOCK,
            num_accepted_tokens=[a for _, a in step["decode"]], mamba_block_size=BLOCK,
            padding=[name == PAD for name, *_ in requests],
            prev_last_scheduled_idx=[-1 if name == PAD else self.prev_block[name]
                                     for name, *_ in requests])
        return requests, metadata

    def check_step(self, side_name, k, requests, metadata, hidden, out, before, after):
        """Outputs and the states of every block written vs the float64
        mixer over each whole sequence; every other slot bitwise unchanged."""
        want = {name: arr.copy() for name, arr in before.items()}
        written_rows = {"conv": {}, "ssm": set()}  # conv: slot -> rows written
        last_blocks = metadata.block_idx_last_scheduled_token
        start = 0
        for r, (name, n, computed, decode) in enumerate(requests):
            tokens, rows = hidden[start:start + n], slice(start, start + n)
            start += n
            if name == PAD:
                continue
            sequence = np.concatenate([self.accepted[name], tokens])
            ref_out, _, ref_states = mixer_ref(self.weights, DIMS, sequence, [0, len(sequence)],
                                               CONFIG["rms_norm_eps"], every_token=True)
            np.testing.assert_allclose(out[rows], ref_out[-n:], rtol=0, atol=2e-5 * np.abs(ref_out).max(),
                                       err_msg=f"{side_name} step {k}: outputs of request {name}")
            table, last = TABLES[name], int(last_blocks[r])
            if decode:  # the state after each token to its own block; the conv state keeps them all
                blocks = {table[last + t]: computed + t for t in range(n)}
                conv_blocks = {table[last]: (len(sequence), STATE_LEN)}
                self.pending[name], self.prev_block[name] = (tokens, out[rows]), last
            else:  # the state at every block boundary crossed, and the last
                ends = [(b + 1) * BLOCK - 1 for b in range(computed // BLOCK, last)] + [len(sequence) - 1]
                blocks = {table[b]: end for b, end in zip(range(computed // BLOCK, last + 1), ends)}
                conv_blocks = {slot: (end + 1, WIDTH - 1) for slot, end in blocks.items()}
                self.accepted[name], self.accepted_out[name] = sequence, np.concatenate(
                    [self.accepted_out[name], out[rows]])
            for slot, token in blocks.items():
                want["ssm"][slot] = ref_states[token]
                written_rows["ssm"].add(slot)
            for slot, (length, rows_written) in conv_blocks.items():
                want["conv"][slot, :rows_written] = conv_state_ref(self.weights, DIMS, sequence[:length],
                                                                   rows_written)
                written_rows["conv"][slot] = rows_written
        for name in ("conv", "ssm"):
            scale = np.nanmax(np.abs(want[name]))
            np.testing.assert_allclose(after[name], want[name], rtol=0, atol=2e-5 * scale,
                                       err_msg=f"{side_name} step {k}: {name} states")
        # Bitwise: slots not scheduled, and the conv rows a prefill leaves (it writes W - 1).
        untouched = [s for s in range(NUM_BLOCKS) if s not in written_rows["ssm"]]
        np.testing.assert_array_equal(after["ssm"][untouched], before["ssm"][untouched])
        for slot in range(NUM_BLOCKS):
            rows_written = written_rows["conv"].get(slot, 0)
            np.testing.assert_array_equal(after["conv"][slot, rows_written:],
                                          before["conv"][slot, rows_written:],
                                          err_msg=f"step {k}: conv slot {slot} beyond row {rows_written}")


def _run_schedule(sides, weights, rng):
    """STEPS on one shared cache, step k run by ``sides[k]``, each checked
    against float64; returns the float64 bookkeeping and the cache."""
    mixers = {side.name: _mixer(side, weights) for side in set(sides)}
    cache = _cache(next(iter(mixers.values())), rng)
    requests = Requests(weights, rng)
    for k, (step, side) in enumerate(zip(STEPS, sides)):
        step_requests, metadata = requests.metadata(step)
        padding_tokens = 2
        hidden = rng.standard_normal((metadata.num_actual_tokens + padding_tokens, CONFIG["hidden_size"]))
        before = _states(cache)
        out = side.run_mixer(mixers[side.name], hidden, cache, metadata)
        requests.check_step(side.name, k, step_requests, metadata, hidden, out, before, _states(cache))
    return requests, cache, mixers


def _continuation_equals_plain_prefill(side, requests, cache, mixer):
    """The accepted state, copied out of the last step's blocks with the copy
    specs (vLLM's mamba_utils), equals a plain prefill of the accepted
    tokens; so do the accepted tokens' outputs."""
    for name, accepted in FINAL_ACCEPTED.items():
        requests.accept(name, accepted)
        copy_slot, prefill_slot = SPARE[name]
        row, last = TABLES[name], requests.prev_block[name]
        cache.copy_blocks("conv", [get_conv_copy_spec(cache.torch("conv"), row, last, accepted)], [copy_slot])
        cache.copy_blocks("ssm", [get_temporal_copy_spec(cache.torch("ssm"), row, last, accepted)],
                          [copy_slot])
        tokens = requests.accepted[name]
        plain = build_mamba2_metadata([len(tokens)], [0], [prefill_slot], 0, BLOCK)
        out = side.run_mixer(mixer, tokens, cache, plain)
        np.testing.assert_allclose(requests.accepted_out[name], out, rtol=0, atol=2e-5 * np.abs(out).max(),
                                   err_msg=f"{side.name}: accepted outputs of {name}")
        states = _states(cache)
        np.testing.assert_allclose(states["ssm"][copy_slot], states["ssm"][prefill_slot], rtol=0,
                                   atol=2e-5 * np.abs(states["ssm"][prefill_slot]).max())
        np.testing.assert_allclose(states["conv"][copy_slot, :WIDTH - 1],
                                   states["conv"][prefill_slot, :WIDTH - 1], rtol=0, atol=1e-5)


@pytest.mark.slow(side="jax")
def test_spec_decode_with_prefix_caching_matches_float64(side, rng):
    weights = random_weights(rng, DIMS, CONFIG["hidden_size"], WIDTH, use_bias=True)
    requests, cache, mixers = _run_schedule([side] * len(STEPS), weights, rng)
    _continuation_equals_plain_prefill(side, requests, cache, mixers[side.name])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::bridge.dlpack.BridgeCopyWarning")
def test_torch_and_flax_take_turns_on_one_cache(rng):
    """Each step in the other framework than the last, on one shared
    cache: every step still matches float64, so each framework continues the
    other's per-token states and block writes."""
    weights = random_weights(rng, DIMS, CONFIG["hidden_size"], WIDTH, use_bias=True)
    torch_side, jax_side = TorchSide(), JaxSide()
    _run_schedule([torch_side, jax_side] * (len(STEPS) // 2), weights, rng)


# A spec + prefix-caching batch: decodes A (previous step's block 1, two
# tokens accepted) and B (after a prefill), then a prefill C crossing block 0.
BATCH = build_mamba2_metadata([3, 3, 20], [21, 14, 0], [TABLES["A"], TABLES["B"], TABLES["C"]], 2, BLOCK,
                              num_accepted_tokens=[2, 1], mamba_block_size=BLOCK,
                              prev_last_scheduled_idx=[1, -1, -1])
WRITTEN = {2, 3, 4, 7, 8, 9, 11, 12}  # A: columns 1-3, B: 1-3, C: 0-1
BAD_BATCHES = {  # name: (metadata changes, mixer changes, the field the error names)
    "no previous-step blocks": (dict(block_idx_last_scheduled_token_prev_step=None), {},
                                "metadata.block_idx_last_scheduled_token_prev_step"),
    "previous-step block without room for its tokens": (
        dict(block_idx_last_scheduled_token_prev_step=np.array([3, 0, 0], np.int32)), {},
        "metadata.block_idx_last_scheduled_token_prev_step"),
    "last scheduled block without room for its tokens": (
        dict(block_idx_last_scheduled_token=np.array([3, 1, 1], np.int32)), {},
        "metadata.block_idx_last_scheduled_token"),
    "more accepted than scheduled": (dict(num_accepted_tokens=np.array([4, 1], np.int32)), {},
                                     "metadata.num_accepted_tokens"),
    "two decodes write one slot": (dict(state_indices_tensor_d=np.array(
        [TABLES["A"], [6, 7, 3, 9, 10]], np.int32)), {}, "metadata.state_indices_tensor_d"),
    "a prefill writes a decode's token state": (dict(state_indices_tensor_p=np.array(
        [[4, 12, 13, 14, 15]], np.int32)), {}, "metadata.state_indices_tensor_p"),
    "a decode reads what a prefill writes": (dict(state_indices_tensor_p=np.array(
        [[6, 12, 13, 14, 15]], np.int32)), {}, "metadata.state_indices_tensor_d"),
    "a mixer with another num_spec": ({}, dict(num_spec=1), "metadata.num_decode_tokens"),
}


@pytest.mark.parametrize("bad", list(BAD_BATCHES))
def test_bad_spec_prefix_metadata_is_refused_before_any_write(side, bad, rng):
    changes, mixer_changes, name = BAD_BATCHES[bad]
    weights = random_weights(rng, DIMS, CONFIG["hidden_size"], WIDTH, use_bias=True)
    mixer = _mixer(side, weights, **mixer_changes)
    mixer.validate_indices = True
    cache = _cache(mixer, rng)
    before = _states(cache)
    with pytest.raises(ValueError, match=f"MambaMixer2: `{re.escape(name)}`"):
        side.run_mixer(mixer, rng.standard_normal((26, CONFIG["hidden_size"])), cache,
                       dataclasses.replace(BATCH, **changes))
    for state, after in _states(cache).items():
        np.testing.assert_array_equal(after, before[state])


@pytest.mark.slow(side="jax")
def test_unchecked_block_columns_outside_the_table_touch_nothing(side, rng):
    """Unchecked: a decode whose previous-step column lies past its block
    table is skipped (NaN outputs, none of its blocks written); the others
    run, and no slot they do not schedule changes."""
    weights = random_weights(rng, DIMS, CONFIG["hidden_size"], WIDTH, use_bias=True)
    mixer = _mixer(side, weights)
    mixer.validate_indices = False
    cache = _cache(mixer, rng)
    before = _states(cache)
    metadata = dataclasses.replace(BATCH, block_idx_last_scheduled_token_prev_step=np.array(
        [7, 0, 0], np.int32))
    out = side.run_mixer(mixer, rng.standard_normal((26, CONFIG["hidden_size"])), cache, metadata)
    assert np.isnan(out[:3]).all() and np.isfinite(out[3:]).all()
    untouched = [s for s in range(NUM_BLOCKS) if s not in WRITTEN - {2, 3, 4}]
    for state, after in _states(cache).items():
        np.testing.assert_array_equal(after[untouched], before[state][untouched])


def test_build_refuses_bad_spec_prefix_batches():
    build = lambda lens, computed, tables, **kw: build_mamba2_metadata(  # noqa: E731
        lens, computed, tables, 1, BLOCK, num_accepted_tokens=[1], **kw)
    with pytest.raises(ValueError, match="`prev_last_scheduled_idx` belongs to speculative decoding with"):
        build([3], [21], [[1, 2, 3]], prev_last_scheduled_idx=[1])
    with pytest.raises(ValueError, match=r"`prev_last_scheduled_idx` must be integer \(1,\)"):
        build([3], [21], [TABLES["A"]], mamba_block_size=BLOCK, prev_last_scheduled_idx=[1, 1])
    with pytest.raises(ValueError, match="3 columns, requests reach column 3"):  # per-token blocks 1-3
        build([3], [21], [[1, 2, 3]], mamba_block_size=BLOCK)
    with pytest.raises(ValueError, match="3 columns, requests reach column 4"):  # the previous step's 2-4
        build([3], [21], [[1, 2, 3]], mamba_block_size=BLOCK, prev_last_scheduled_idx=[2])
    with pytest.raises(ValueError, match=r"decode requests must have 3 tokens each"):
        build_mamba2_metadata([3, 2], [21, 4], [TABLES["A"], TABLES["B"]], 2, BLOCK,
                              num_accepted_tokens=[1, 1], mamba_block_size=BLOCK)
    with pytest.raises(ValueError, match=r"requests \[0\] use the null block"):  # a per-token block
        build([3], [21], [[1, 2, PAD, 4, 5]], mamba_block_size=BLOCK)
    metadata = build([3], [21], [[PAD, 2, 3, 4, PAD]], mamba_block_size=BLOCK)  # columns 1-3 only
    np.testing.assert_array_equal(metadata.block_idx_last_scheduled_token_prev_step, [1])
