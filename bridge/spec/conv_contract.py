"""The argument contract of the causal depthwise conv1d of a Mamba-2 layer
(vLLM's ``causal_conv1d_fn`` for prefill and ``causal_conv1d_update`` for
decode), checked once for both frameworks, and the per-sequence plan that
both kernels follow.

Shapes (D channels = conv dim, W = width, S cache slots, L = state_len >=
W - 1, T tokens, Q sequences):

    prefill  x, out          (D, T)   token-major storage transposed, as vLLM passes it
    decode   x, out          (Q, D), or (T, D) with query_start_loc
    weight                   (D, W)
    bias                     (D,)
    conv_states / conv_state (S, D, L)   an SD cache (S, L, D) transposed, or a DS cache
    query_start_loc          (Q + 1,)
    cache_indices, has_initial_state, num_accepted_tokens   (Q,)
    cache_indices with prefix caching                       (Q, max_blocks), a block table
    conv_state_indices       (Q,) or (Q, C)   (2-D: column 0, or the columns that
                                               initial_state_idx / block_idx_last_scheduled_token pick)

Per sequence (tokens x_0 .. x_{n-1}, history h_0 .. h_{W-2} = the W - 1 inputs
before x_0, read from the cache slot at column ``offset``; zeros when the
prefill sequence has no initial state):

    out_t = act(bias + sum_k weight[:, k] * window[t + k]),  window = h ++ x
    new_state[i] = x[i - (R - n)]            for i >= R - n
                 = old_state[i + shift]      otherwise (0 without history)

with R the columns written: W - 1 in prefill (the last W - 1 inputs), L in
decode. Prefill reads the history only of sequences with
``has_initial_state`` (decode always), at ``cache_indices`` (the sequence
number when None). Prefix caching ("all" mode, prefill): ``cache_indices``
is a block table; the history is read at column ``initial_state_idx``, the
final state written at ``block_idx_last_scheduled_token``, and the state at
each multiple of ``block_size_to_align`` (in the sequence, which has
``num_computed_tokens`` before this call) at the columns from
``block_idx_first_scheduled_token`` on. Decode reads at column
``initial_state_idx`` and writes at ``block_idx_last_scheduled_token`` of a
2-D ``conv_state_indices`` (column 0 by default). In decode ``offset = 0`` and ``shift = n``; in speculative decoding
the state keeps every drafted input and ``offset = num_accepted - 1``,
``shift = num_accepted``. A sequence whose (read) slot is ``pad_slot_id`` is
skipped: its output and every cache slot stay untouched.

Unchecked contract (the kernels, whatever the index values): a sequence
whose ``query_start_loc`` range, slots (its own or its block boundaries'),
block-table columns, ``num_computed_tokens`` or ``num_accepted_tokens``
break the rules of ``check_conv_index_values`` is skipped, no cache slot
written for it, and its outputs (the tokens of its range clipped to
``[0, T)``) are NaN; no value makes a kernel read or write outside the
arrays given, and no negative value wraps around. Sequences sharing a slot
(collisions, refused by the checks) leave that slot's contents unspecified.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from bridge.spec.checks import as_int, dtype_name, expect_dtype, expect_shape, fail, shape_of
from bridge.spec.launch_config import clip_block
from bridge.spec.ssu_contract import NULL_BLOCK_ID  # noqa: F401  (re-exported default pad slot)
from bridge.spec.ssu_contract import check_num_accepted_tokens

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
INDEX_DTYPES = ("int32", "int64")
ACTIVATIONS = (None, "silu", "swish")
MAX_WIDTH = 8
# Prefix caching ("all" mode) in prefill: the block table's columns of each
# sequence's initial state, first and last scheduled token, and its computed
# tokens. The state at every block boundary crossed (a multiple of
# block_size_to_align in the sequence) goes to that block's column, the
# final state to the last scheduled token's.
PREFIX_CACHING_ARGS = ("block_idx_first_scheduled_token", "block_idx_last_scheduled_token",
                       "initial_state_idx", "num_computed_tokens")
INDEX_ARGS = ("query_start_loc", "cache_indices", "conv_state_indices", "num_accepted_tokens",
              *PREFIX_CACHING_ARGS)
# Tiles (tokens, channels) of both kernels: no tensor-core products, so any power of two.
PREFILL_BLOCK_T, DECODE_BLOCK_T, BLOCK_D = 32, 16, 64


@dataclasses.dataclass(frozen=True)
class ConvLayout:
    """Sizes of one conv call (hashable: a static argument of the Pallas kernel)."""

    dim: int
    width: int
    num_slots: int
    state_len: int
    num_tokens: int
    num_seqs: int
    index_columns: int  # columns of the cache-index array (1 when 1-D)
    silu: bool
    decode: bool

    @property
    def write_len(self) -> int:
        """State columns written per sequence: the last W - 1 inputs in
        prefill, the whole state in decode."""
        return self.state_len if self.decode else self.width - 1

    @property
    def max_accepted(self) -> int:
        """Largest ``num_accepted_tokens``: 1 + the drafted columns the state keeps."""
        return self.state_len - self.width + 2


@dataclasses.dataclass(frozen=True)
class ConvTiles:
    block_t: int  # tokens
    block_d: int  # channels
    block_r: int  # state columns written (a power of two >= write_len)
    splits: int  # programs per sequence and block of channels (``conv_token_splits``)


def conv_layout(num_tokens: int, weight, state, query_start_loc, indices, *, silu: bool,
                decode: bool) -> ConvLayout:
    """The sizes of a call from its (checked) arrays."""
    dim, width = shape_of(weight)
    index_shape = shape_of(indices) or ()
    num_seqs = num_tokens if query_start_loc is None else shape_of(query_start_loc)[0] - 1
    return ConvLayout(dim, width, state.shape[0], state.shape[2], num_tokens, num_seqs,
                      index_shape[1] if len(index_shape) == 2 else 1, silu, decode)


def conv_tiles(layout: ConvLayout, *, varlen: bool = True, max_query_len: int = -1) -> ConvTiles:
    """The tiles of one launch. A decode launch's token tile: 2 (the smallest)
    with one token per sequence (not ``varlen``), else enough for
    ``max_query_len`` tokens (-1: unknown), at most ``DECODE_BLOCK_T``."""
    block_t = PREFILL_BLOCK_T
    if layout.decode:
        wanted, block_t = (max_query_len if varlen and max_query_len > 0 else DECODE_BLOCK_T), 2
        while varlen and block_t < min(wanted, DECODE_BLOCK_T):
            block_t *= 2
    block_r = 2
    while block_r < layout.write_len:
        block_r *= 2
    # Split a sequence's token tiles over programs only where no tile but the
    # first reaches into the history (the first also writes the states).
    splits = (1 if layout.decode or block_t < layout.width - 1
              else conv_token_splits(layout.num_tokens, layout.num_seqs, block_t))
    return ConvTiles(block_t, clip_block(layout.dim, BLOCK_D), block_r, splits)


def _check_arrays(function: str, arrays: Mapping, activation) -> None:
    """Arrays (not lists), float / index / bool dtypes, a known activation."""
    for arg, value in arrays.items():
        if value is None:
            continue
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            fail(function, arg, f"must be an array (a tensor), got {type(value).__name__}")
        expected = (INDEX_DTYPES if arg in INDEX_ARGS else ("bool",) if arg == "has_initial_state"
                    else FLOAT_DTYPES)
        expect_dtype(function, arg, dtype_name(value), expected)
    if activation not in ACTIVATIONS:
        fail(function, "activation", f"is {activation!r}; supported: {ACTIVATIONS}")


def _check_weights(function: str, weight, bias, state_arg: str, state, dim: int) -> None:
    shape = shape_of(weight)
    if len(shape) != 2 or shape[0] != dim:
        fail(function, "weight", f"must be (dim={dim}, width), got shape {shape}")
    width = shape[1]
    if not 2 <= width <= MAX_WIDTH:
        fail(function, "weight", f"has width {width}; supported: 2 to {MAX_WIDTH}")
    if bias is not None:
        expect_shape(function, "bias", shape_of(bias), (dim,))
    shape = shape_of(state)
    if shape is None or len(shape) != 3 or shape[1] != dim or shape[2] < width - 1:
        fail(function, state_arg, f"must be (num_slots, dim={dim}, state_len >= width - 1 = "
                                  f"{width - 1}), got shape {shape}")


def _check_x(function: str, x, out, form: str) -> tuple[int, int]:
    """x and out 2-D of one shape ``form`` (e.g. '(dim, num_tokens)')."""
    shape = shape_of(x)
    if shape is None or len(shape) != 2:
        fail(function, "x", f"must be 2-D {form}, got shape {shape}")
    if out is not None:
        expect_shape(function, "out", shape_of(out), shape)
    return shape


def _check_per_seq(function: str, arrays: Mapping, num_seqs: int) -> None:
    for arg, value in arrays.items():
        if value is not None:
            expect_shape(function, arg, shape_of(value), (num_seqs,))


def _check_slot_per_seq(function: str, state_arg: str, state, indices, num_seqs: int) -> None:
    """Without cache indices sequence q uses slot q: the cache needs a slot each."""
    if indices is None and shape_of(state)[0] < num_seqs:
        fail(function, state_arg, f"has {shape_of(state)[0]} slots for {num_seqs} sequences "
                                  f"(without cache indices sequence q uses slot q)")


def check_conv_fn_args(*, x, weight, bias, conv_states, query_start_loc, cache_indices,
                       has_initial_state, block_idx_first_scheduled_token,
                       block_idx_last_scheduled_token, initial_state_idx, num_computed_tokens,
                       out, activation, pad_slot_id, block_size_to_align) -> ConvLayout:
    """Check ``causal_conv1d_fn``'s arguments (arrays of either framework);
    return the call's sizes. Raises ValueError naming the argument."""
    function = "causal_conv1d_fn"
    arrays = dict(x=x, weight=weight, bias=bias, conv_states=conv_states, out=out,
                  query_start_loc=query_start_loc, cache_indices=cache_indices,
                  has_initial_state=has_initial_state,
                  block_idx_first_scheduled_token=block_idx_first_scheduled_token,
                  block_idx_last_scheduled_token=block_idx_last_scheduled_token,
                  initial_state_idx=initial_state_idx, num_computed_tokens=num_computed_tokens)
    _check_arrays(function, arrays, activation)
    as_int(function, "pad_slot_id", pad_slot_id)
    as_int(function, "block_size_to_align", block_size_to_align, minimum=0)
    dim, num_tokens = _check_x(function, x, out, "(dim, num_tokens)")
    _check_weights(function, weight, bias, "conv_states", conv_states, dim)
    qsl = shape_of(query_start_loc)
    if qsl is None or len(qsl) != 1 or qsl[0] < 2:
        fail(function, "query_start_loc", f"must be 1-D of length num_seqs + 1 >= 2, got shape {qsl}")
    num_seqs = qsl[0] - 1
    _check_per_seq(function, {"has_initial_state": has_initial_state}, num_seqs)
    prefix = {arg: arrays[arg] for arg in PREFIX_CACHING_ARGS}
    given = [arg for arg, value in prefix.items() if value is not None]
    indices = shape_of(cache_indices)
    if given:
        if len(given) != len(PREFIX_CACHING_ARGS):
            missing = sorted(set(PREFIX_CACHING_ARGS) - set(given))
            fail(function, missing[0], f"is required with {given[0]} (prefix caching)")
        _check_per_seq(function, prefix, num_seqs)
        if indices is None or len(indices) != 2 or indices[0] != num_seqs:
            fail(function, "cache_indices", f"must be a block table ({num_seqs}, max_blocks) with "
                                            f"prefix caching, got shape {indices}")
        as_int(function, "block_size_to_align", block_size_to_align, minimum=1)
    else:
        _check_per_seq(function, {"cache_indices": cache_indices}, num_seqs)
    _check_slot_per_seq(function, "conv_states", conv_states, cache_indices, num_seqs)
    return conv_layout(num_tokens, weight, conv_states, query_start_loc, cache_indices,
                       silu=activation is not None, decode=False)


def check_conv_update_args(*, x, conv_state, weight, bias, conv_state_indices,
                           num_accepted_tokens, query_start_loc, initial_state_idx,
                           block_idx_last_scheduled_token, out, activation, pad_slot_id,
                           max_query_len) -> ConvLayout:
    """Check ``causal_conv1d_update``'s arguments; return the call's sizes."""
    function = "causal_conv1d_update"
    arrays = dict(x=x, conv_state=conv_state, weight=weight, bias=bias, out=out,
                  conv_state_indices=conv_state_indices, num_accepted_tokens=num_accepted_tokens,
                  query_start_loc=query_start_loc, initial_state_idx=initial_state_idx,
                  block_idx_last_scheduled_token=block_idx_last_scheduled_token)
    _check_arrays(function, arrays, activation)
    as_int(function, "pad_slot_id", pad_slot_id)
    as_int(function, "max_query_len", max_query_len, minimum=-1)
    num_tokens, dim = _check_x(function, x, out, "(batch, dim) or (num_tokens, dim)")
    _check_weights(function, weight, bias, "conv_state", conv_state, dim)
    qsl = shape_of(query_start_loc)
    if qsl is not None:
        if len(qsl) != 1 or qsl[0] < 1:
            fail(function, "query_start_loc", f"must be 1-D of length batch + 1, got shape {qsl}")
        num_seqs = qsl[0] - 1
    else:
        num_seqs = num_tokens
    indices = shape_of(conv_state_indices)
    if indices is not None:
        if len(indices) not in (1, 2) or indices[0] != num_seqs or (len(indices) == 2 and indices[1] < 1):
            fail(function, "conv_state_indices", f"has shape {indices}, expected ({num_seqs},) "
                                                 f"or ({num_seqs}, columns)")
    picks = dict(initial_state_idx=initial_state_idx,
                 block_idx_last_scheduled_token=block_idx_last_scheduled_token)
    _check_per_seq(function, dict(picks, num_accepted_tokens=num_accepted_tokens), num_seqs)
    for arg, value in picks.items():
        if value is not None and indices is None:
            fail(function, arg, "needs `conv_state_indices` (it picks one of its columns)")
    if num_accepted_tokens is not None and qsl is None:
        fail(function, "num_accepted_tokens", "needs `query_start_loc` (speculative decoding "
                                              "feeds several tokens per sequence)")
    _check_slot_per_seq(function, "conv_state", conv_state, conv_state_indices, num_seqs)
    return conv_layout(num_tokens, weight, conv_state, query_start_loc, conv_state_indices,
                       silu=activation is not None, decode=True)


def check_conv_index_values(function: str, layout: ConvLayout, values: Mapping[str, np.ndarray],
                            *, pad_slot_id: int) -> None:
    """Value checks on host copies (numpy, by public argument name) of the
    index arguments: what the kernels would skip and poison (see the
    unchecked contract above), and slots shared by two sequences."""
    num_seqs = layout.num_seqs
    qsl = values.get("query_start_loc")
    lengths = np.ones(num_seqs, np.int64)
    if qsl is not None:
        qsl = np.asarray(qsl, np.int64)
        if qsl[0] != 0 or qsl[-1] != layout.num_tokens or (np.diff(qsl) < 0).any():
            fail(function, "query_start_loc", f"must rise from 0 to the {layout.num_tokens} "
                                              f"tokens, got {qsl.tolist()[:8]}")
        lengths = np.diff(qsl)
    if values.get("num_accepted_tokens") is not None:
        # The history read starts at column accepted - 1 (the window must fit
        # the state), and the state kept shifts by accepted (at most the step's tokens).
        check_num_accepted_tokens(function, values["num_accepted_tokens"],
                                  np.minimum(layout.max_accepted, np.maximum(lengths, 1)))
    picks = {arg: np.zeros(num_seqs, np.int64) if values.get(arg) is None
             else np.asarray(values[arg], np.int64)
             for arg in ("initial_state_idx", "block_idx_last_scheduled_token",
                         "block_idx_first_scheduled_token")}
    for arg, cols in picks.items():
        if ((cols < 0) | (cols >= layout.index_columns)).any():
            fail(function, arg, f"must pick a column in [0, {layout.index_columns}) of the "
                                f"index array, got {cols.tolist()[:8]}")
    first, last = picks["block_idx_first_scheduled_token"], picks["block_idx_last_scheduled_token"]
    boundaries = values.get("block_idx_first_scheduled_token") is not None
    if boundaries and (first > last).any():
        fail(function, "block_idx_first_scheduled_token", "must not exceed "
                                                          "block_idx_last_scheduled_token")
    computed = values.get("num_computed_tokens")
    if computed is not None and (np.asarray(computed) < 0).any():
        fail(function, "num_computed_tokens", f"must be >= 0, got {np.asarray(computed).tolist()[:8]}")
    slot_arg = "conv_state_indices" if layout.decode else "cache_indices"
    if values.get(slot_arg) is None:
        return
    table = np.asarray(values[slot_arg], np.int64).reshape(num_seqs, layout.index_columns)
    rows = np.arange(num_seqs)
    read, write = table[rows, picks["initial_state_idx"]], table[rows, last]
    # Every slot a sequence touches: read, written, and the block boundaries' (prefix caching).
    touched = [[r, w, *(table[q, first[q]:last[q]] if boundaries else ())]
               for q, (r, w) in enumerate(zip(read, write))]
    used = np.array([s for row in touched for s in row], np.int64)
    bad = (used != pad_slot_id) & ((used < 0) | (used >= layout.num_slots))
    if bad.any():
        fail(function, slot_arg, f"holds slots outside [0, {layout.num_slots}) that are not "
                                 f"pad_slot_id={pad_slot_id}: {np.unique(used[bad]).tolist()[:8]}")
    owners: dict = {}
    for q, row in enumerate(touched):
        if read[q] != pad_slot_id:  # padding sequences touch nothing
            for slot in set(row) - {pad_slot_id}:
                owners.setdefault(int(slot), []).append(q)
    shared = {slot: seqs for slot, seqs in owners.items() if len(seqs) > 1}
    if shared:
        listed = ", ".join(f"slot {s} by sequences {q}" for s, q in sorted(shared.items())[:4])
        fail(function, slot_arg, f"gives one slot to several sequences ({listed}); each sequence "
                                 f"needs its own slots")


# Training (differentiable) form of ``causal_conv1d_fn``: x, weight, bias and
# the initial states read from ``conv_states`` (at ``cache_indices``, where
# ``has_initial_state``) get gradients, from ``out`` and from the new states
# (the cache with each sequence's slot rewritten: its columns < W - 1 hold the
# last W - 1 inputs, the history shifted in front of them). Not with prefix
# caching, nor into a given ``out``. Without ``conv_states`` every sequence
# starts from zero history and the new states are (num_seqs, dim, W - 1).


def stateless_states_shape(*, x, weight, query_start_loc, cache_indices, has_initial_state,
                           **prefix_caching) -> tuple[int, int, int]:
    """``conv_states=None``: the shape (num_seqs, dim, width - 1) of the states
    a call returns; refuses the arguments that need a cache."""
    function = "causal_conv1d_fn"
    for arg, value in dict(cache_indices=cache_indices, has_initial_state=has_initial_state,
                           **prefix_caching).items():
        if value is not None:
            fail(function, arg, "needs `conv_states` (without it every sequence starts from "
                                "zero history)")
    qsl, shape = shape_of(query_start_loc), shape_of(weight)
    if qsl is None or len(qsl) != 1 or qsl[0] < 2:
        fail(function, "query_start_loc", f"must be 1-D of length num_seqs + 1 >= 2, got shape {qsl}")
    if shape is None or len(shape) != 2 or shape[1] < 2:
        fail(function, "weight", f"must be (dim, width >= 2), got shape {shape}")
    return qsl[0] - 1, shape[0], shape[1] - 1


def check_conv_fn_grad(*, out, **prefix_caching) -> None:
    """The differentiable form: no prefix caching, no ``out`` to write into."""
    function = "causal_conv1d_fn"
    if out is not None:
        fail(function, "out", "is written in place, which cannot carry a gradient: leave it None "
                              "when inputs require grad")
    for arg, value in prefix_caching.items():
        if value is not None:
            fail(function, arg, "(prefix caching) is an inference feature: the gradient is "
                                "defined for the training form only (x, weight, bias, "
                                "conv_states, query_start_loc, cache_indices, has_initial_state)")


MAX_TOKEN_SPLITS = 32


def conv_token_splits(num_tokens: int, num_seqs: int, block_t: int) -> int:
    """Programs per sequence (and block of channels) of a prefill, forward
    and backward: each takes every ``splits``-th token tile of its sequence
    (tiles are independent: a tile recomputes the window it needs), so a few
    long sequences still fill the GPU. A power of two, from the mean length
    (the grid is sized from shapes alone, no host sync)."""
    tiles = -(-num_tokens // max(1, num_seqs * block_t))
    splits = 1
    while splits < min(tiles, MAX_TOKEN_SPLITS):
        splits *= 2
    return splits


def conv_bwd_block_w(width: int) -> int:
    """The backward's dweight tile over taps: a power of two >= width."""
    block = 2
    while block < width:
        block *= 2
    return block
