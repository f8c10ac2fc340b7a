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
decode. In decode ``offset = 0`` and ``shift = n``; in speculative decoding
the state keeps every drafted input and ``offset = num_accepted - 1``,
``shift = num_accepted``. A sequence whose slot is ``pad_slot_id`` is
skipped: its output and every cache slot stay untouched.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np

from bridge.spec.ssu_contract import NULL_BLOCK_ID  # noqa: F401  (re-exported default pad slot)

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
# Tiles (tokens, channels) of both kernels: no tensor-core products, so any power of two.
PREFILL_BLOCK_T, DECODE_BLOCK_T, BLOCK_D = 32, 16, 64

Shape = Optional[Sequence[int]]


@dataclasses.dataclass(frozen=True)
class ConvLayout:
    """Sizes of one conv call."""

    dim: int
    width: int
    num_slots: int
    state_len: int
    num_tokens: int
    num_seqs: int
    index_columns: int  # columns of the cache-index array (1 when 1-D)
    silu: bool


def _fail(function: str, arg: str, message: str):
    raise ValueError(f"{function}: `{arg}` {message}")


def _check_common(function: str, shapes, dtypes, activation, dim: int) -> tuple[int, int, int]:
    weight = shapes.get("weight")
    if weight is None or len(weight) != 2 or weight[0] != dim:
        _fail(function, "weight", f"must be (dim={dim}, width), got shape {weight}")
    width = weight[1]
    if not 2 <= width <= MAX_WIDTH:
        _fail(function, "weight", f"has width {width}; supported: 2 to {MAX_WIDTH}")
    if shapes.get("bias") is not None and tuple(shapes["bias"]) != (dim,):
        _fail(function, "bias", f"has shape {tuple(shapes['bias'])}, expected ({dim},)")
    state_name = "conv_states" if "conv_states" in shapes else "conv_state"
    state = shapes.get(state_name)
    if state is None or len(state) != 3 or state[1] != dim or state[2] < width - 1:
        _fail(function, state_name, f"must be (num_slots, dim={dim}, state_len >= width - 1 = "
                                    f"{width - 1}), got shape {state}")
    if activation not in ACTIVATIONS:
        _fail(function, "activation", f"is {activation!r}; supported: {ACTIVATIONS}")
    for arg in ("x", "weight", "bias", state_name, "out"):
        if dtypes.get(arg) is not None and dtypes[arg] not in FLOAT_DTYPES:
            _fail(function, arg, f"has dtype {dtypes[arg]}; supported: {', '.join(FLOAT_DTYPES)}")
    for arg in ("query_start_loc", "cache_indices", "conv_state_indices", "num_accepted_tokens",
                *PREFIX_CACHING_ARGS):
        if dtypes.get(arg) is not None and dtypes[arg] not in INDEX_DTYPES:
            _fail(function, arg, f"has dtype {dtypes[arg]}; supported: {', '.join(INDEX_DTYPES)}")
    if dtypes.get("has_initial_state") not in (None, "bool"):
        _fail(function, "has_initial_state", f"has dtype {dtypes['has_initial_state']}; expected bool")
    return width, state[0], state[2]


def _expect_seq(function: str, shapes, arg: str, num_seqs: int) -> None:
    if shapes.get(arg) is not None and tuple(shapes[arg]) != (num_seqs,):
        _fail(function, arg, f"has shape {tuple(shapes[arg])}, expected ({num_seqs},)")


def check_conv_fn_args(shapes: Mapping[str, Shape], dtypes: Mapping[str, Optional[str]], *,
                       activation, block_size_to_align: int = 0) -> ConvLayout:
    """Check ``causal_conv1d_fn``'s arguments (shape tuples / dtype names or
    None by name); return the call's sizes. Raises ValueError naming the argument."""
    function = "causal_conv1d_fn"
    x = shapes.get("x")
    if x is None or len(x) != 2:
        _fail(function, "x", f"must be 2-D (dim, num_tokens), got shape {x}")
    dim, num_tokens = x
    width, num_slots, state_len = _check_common(function, shapes, dtypes, activation, dim)
    qsl = shapes.get("query_start_loc")
    if qsl is None or len(qsl) != 1 or qsl[0] < 2:
        _fail(function, "query_start_loc", f"must be 1-D of length num_seqs + 1 >= 2, got shape {qsl}")
    num_seqs = qsl[0] - 1
    _expect_seq(function, shapes, "has_initial_state", num_seqs)
    prefix_args = [a for a in PREFIX_CACHING_ARGS if shapes.get(a) is not None]
    indices = shapes.get("cache_indices")
    columns = 1
    if prefix_args:
        if len(prefix_args) != len(PREFIX_CACHING_ARGS):
            missing = sorted(set(PREFIX_CACHING_ARGS) - set(prefix_args))
            _fail(function, missing[0], f"is required with {prefix_args[0]} (prefix caching)")
        for arg in PREFIX_CACHING_ARGS:
            _expect_seq(function, shapes, arg, num_seqs)
        if indices is None or len(indices) != 2 or indices[0] != num_seqs:
            _fail(function, "cache_indices", f"must be a block table ({num_seqs}, max_blocks) with "
                                             f"prefix caching, got shape {indices}")
        columns = indices[1]
        if not isinstance(block_size_to_align, int) or block_size_to_align < 1:
            _fail(function, "block_size_to_align", f"must be the mamba block size (>= 1) with prefix "
                                                   f"caching, got {block_size_to_align!r}")
    elif indices is not None:
        _expect_seq(function, shapes, "cache_indices", num_seqs)
    if shapes.get("out") is not None and tuple(shapes["out"]) != (dim, num_tokens):
        _fail(function, "out", f"has shape {tuple(shapes['out'])}, expected {(dim, num_tokens)}")
    return ConvLayout(dim, width, num_slots, state_len, num_tokens, num_seqs, columns,
                      activation is not None)


def check_conv_update_args(shapes: Mapping[str, Shape], dtypes: Mapping[str, Optional[str]], *,
                           activation) -> ConvLayout:
    """Check ``causal_conv1d_update``'s arguments; return the call's sizes."""
    function = "causal_conv1d_update"
    x = shapes.get("x")
    if x is None or len(x) != 2:
        _fail(function, "x", f"must be 2-D (batch, dim) or (num_tokens, dim), got shape {x}")
    num_tokens, dim = x
    width, num_slots, state_len = _check_common(function, shapes, dtypes, activation, dim)
    qsl = shapes.get("query_start_loc")
    if qsl is not None:
        if len(qsl) != 1 or qsl[0] < 1:
            _fail(function, "query_start_loc", f"must be 1-D of length batch + 1, got shape {qsl}")
        num_seqs = qsl[0] - 1
    else:
        num_seqs = num_tokens
    indices = shapes.get("conv_state_indices")
    columns = 1
    if indices is not None:
        if len(indices) not in (1, 2) or indices[0] != num_seqs or (len(indices) == 2 and indices[1] < 1):
            _fail(function, "conv_state_indices", f"has shape {tuple(indices)}, expected ({num_seqs},) "
                                                  f"or ({num_seqs}, columns)")
        columns = indices[1] if len(indices) == 2 else 1
    for arg in ("num_accepted_tokens", "initial_state_idx", "block_idx_last_scheduled_token"):
        _expect_seq(function, shapes, arg, num_seqs)
        if shapes.get(arg) is not None and arg != "num_accepted_tokens" and indices is None:
            _fail(function, arg, "needs `conv_state_indices` (it picks one of its columns)")
    if shapes.get("num_accepted_tokens") is not None and qsl is None:
        _fail(function, "num_accepted_tokens", "needs `query_start_loc` (speculative decoding "
                                               "feeds several tokens per sequence)")
    if shapes.get("out") is not None and tuple(shapes["out"]) != tuple(x):
        _fail(function, "out", f"has shape {tuple(shapes['out'])}, expected {tuple(x)}")
    return ConvLayout(dim, width, num_slots, state_len, num_tokens, num_seqs, columns,
                      activation is not None)


def decode_block_t(varlen: bool, max_query_len: int) -> int:
    """Token tile of a decode launch: one token per sequence without
    ``query_start_loc`` (2, the smallest tile), else enough for
    ``max_query_len`` tokens (-1: unknown), at most ``DECODE_BLOCK_T``."""
    if not varlen:
        return 2
    wanted, tile = (max_query_len if max_query_len > 0 else DECODE_BLOCK_T), 2
    while tile < min(wanted, DECODE_BLOCK_T):
        tile *= 2
    return tile


def check_conv_index_values(function: str, layout: ConvLayout, *, pad_slot_id: int,
                            query_start_loc=None, slot_indices=None, slot_arg="cache_indices",
                            num_accepted_tokens=None, columns=None) -> None:
    """Value checks on host copies (numpy) of the index arguments: a kernel
    given bad indices would read or write out of bounds. ``columns`` maps the
    names of column-picking arguments to their values."""
    if query_start_loc is not None:
        qsl = np.asarray(query_start_loc, dtype=np.int64)
        if qsl[0] != 0 or qsl[-1] != layout.num_tokens or (np.diff(qsl) < 0).any():
            _fail(function, "query_start_loc", f"must rise from 0 to the {layout.num_tokens} "
                                               f"tokens, got {qsl.tolist()[:8]}")
        lengths = np.diff(qsl)
        if num_accepted_tokens is not None:
            accepted = np.asarray(num_accepted_tokens, dtype=np.int64)
            if ((accepted < 1) | (accepted > np.maximum(lengths, 1))).any():
                _fail(function, "num_accepted_tokens", f"must lie in [1, tokens of the sequence], "
                                                       f"got {accepted.tolist()[:8]}")
            # The state window starts at num_accepted - 1 and must fit the cache columns.
            if (accepted - 1 + layout.width - 1 > layout.state_len).any():
                _fail(function, "num_accepted_tokens", f"reads past state_len={layout.state_len}")
    if slot_indices is not None:
        slots = np.asarray(slot_indices, dtype=np.int64)
        bad = (slots != pad_slot_id) & ((slots < 0) | (slots >= layout.num_slots))
        if bad.any():
            _fail(function, slot_arg, f"holds slots outside [0, {layout.num_slots}) that are not "
                                      f"pad_slot_id={pad_slot_id}: {slots[bad].tolist()[:8]}")
    for arg, values in (columns or {}).items():
        if values is not None:
            cols = np.asarray(values, dtype=np.int64)
            if ((cols < 0) | (cols >= layout.index_columns)).any():
                _fail(function, arg, f"must pick a column in [0, {layout.index_columns}) of the "
                                     f"index array, got {cols.tolist()[:8]}")
    first = (columns or {}).get("block_idx_first_scheduled_token")
    last = (columns or {}).get("block_idx_last_scheduled_token")
    if first is not None and last is not None and (np.asarray(first) > np.asarray(last)).any():
        _fail(function, "block_idx_first_scheduled_token", "must not exceed "
                                                           "block_idx_last_scheduled_token")
