"""The argument contract of the chunked scan (SSD prefill), vLLM's
``mamba_chunk_scan_combined_varlen``, checked once for both frameworks, and
the chunk metadata that its caller builds.

Shapes (T tokens of Q packed sequences, K chunks, H heads, P = headdim,
N = dstate, G groups):

    x, z, out            (T, H, P)
    dt                   (T, H)
    A, dt_bias           (H,)
    D                    (H,) or (H, P)
    B, C                 (T, G, N)
    initial_states       (Q, H, P, N)
    cu_seqlens           (Q + 1,)   sequence q owns tokens cu_seqlens[q]:cu_seqlens[q+1]
    cu_chunk_seqlens     (K + 1,)   chunk c owns tokens cu_chunk_seqlens[c]:cu_chunk_seqlens[c+1]
    seq_idx              (K,)       the sequence that chunk c belongs to
    last_chunk_indices   (Q,)       the last chunk of sequence q
    result               (Q, H, P, N), or (K, H, P, N) with return_intermediate_states

A chunk holds at most ``chunk_size`` tokens and never spans two sequences.
``chunk_metadata`` builds the three chunk arrays the way vLLM's scheduler
does, including prefill that resumes a sequence whose first tokens were
already computed (its first chunk is shortened so that later chunk ends fall
on multiples of ``chunk_size`` in the sequence: those are the states that
prefix caching stores).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from bridge.spec import checks

OP = "mamba_chunk_scan_combined_varlen"
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
INDEX_DTYPES = ("int32", "int64")
MIN_CHUNK_SIZE = 16  # the smallest tile a tensor-core product takes
FLOAT_ARGS = ("x", "dt", "A", "B", "C", "D", "dt_bias", "z", "out", "initial_states")
INDEX_ARGS = ("cu_seqlens", "cu_chunk_seqlens", "seq_idx", "last_chunk_indices")


@dataclasses.dataclass(frozen=True)
class SsdLayout:
    """Sizes of one chunked-scan call."""

    num_tokens: int
    nheads: int
    headdim: int
    ngroups: int
    dstate: int
    num_seqs: int
    num_chunks: int
    chunk_size: int
    D_per_head: bool  # D given as (H,) rather than (H, P)

    @property
    def heads_per_group(self) -> int:
        return self.nheads // self.ngroups


@dataclasses.dataclass(frozen=True)
class ChunkMetadata:
    """int32 numpy arrays: ``cu_chunk_seqlens (K+1,)``, ``seq_idx (K,)``,
    ``last_chunk_indices (Q,)``."""

    cu_chunk_seqlens: np.ndarray
    seq_idx: np.ndarray
    last_chunk_indices: np.ndarray


def _fail(arg: str, message: str):
    checks.fail(OP, arg, message)


def _shape(arg: str, array) -> Optional[tuple[int, ...]]:
    if array is not None and not hasattr(array, "shape"):
        _fail(arg, f"must be an array, got {type(array).__name__}")
    return checks.shape_of(array)


def _rank(arg: str, shape, ndim: int, names: str) -> tuple[int, ...]:
    if shape is None or len(shape) != ndim:
        _fail(arg, f"must be {ndim}-D ({names}), got shape {shape}")
    return shape


REQUIRED_ARGS = ("x", "dt", "A", "B", "C") + INDEX_ARGS


def check_ssd_args(*, x, dt, A, B, C, cu_seqlens, cu_chunk_seqlens, seq_idx, last_chunk_indices,
                   out=None, D=None, z=None, dt_bias=None, initial_states=None, chunk_size,
                   dt_limit=(0.0, float("inf")), state_dtype: Optional[str] = None,
                   remember: bool = True) -> SsdLayout:
    """Check every shape and dtype (read from the arrays; None for an absent
    one) and the options; return the call's sizes. ``state_dtype`` is a
    dtype name. Raises ValueError naming the argument. A signature (shapes,
    dtypes, options) that passed is remembered (unless ``remember`` is
    False, as while torch.compile traces): a loop pays the checks once."""
    arrays = (x, dt, A, B, C, D, dt_bias, z, out, initial_states, cu_seqlens, cu_chunk_seqlens, seq_idx,
              last_chunk_indices)
    key = _signature(arrays, chunk_size, dt_limit, state_dtype) if remember else None
    layout = None if key is None else _CHECKED.get(key)
    if layout is None:
        layout = _check_ssd_args(
            x=x, dt=dt, A=A, B=B, C=C, cu_seqlens=cu_seqlens, cu_chunk_seqlens=cu_chunk_seqlens,
            seq_idx=seq_idx, last_chunk_indices=last_chunk_indices, out=out, D=D, z=z, dt_bias=dt_bias,
            initial_states=initial_states, chunk_size=chunk_size, dt_limit=dt_limit, state_dtype=state_dtype)
        if key is not None:
            if len(_CHECKED) >= MAX_CHECKED:
                _CHECKED.clear()
            _CHECKED[key] = layout
    return layout


_CHECKED: dict = {}
MAX_CHECKED = 1024


def _signature(arrays, chunk_size, dt_limit, state_dtype) -> Optional[tuple]:
    """What the checks depend on, hashable; None for what is not (not arrays,
    an unhashable option), which is then checked every time."""
    try:
        key = (checks.array_signature(arrays), chunk_size, type(chunk_size), tuple(dt_limit), state_dtype)
        hash(key)
    except (AttributeError, TypeError):
        return None
    return key


def _check_ssd_args(*, x, dt, A, B, C, cu_seqlens, cu_chunk_seqlens, seq_idx, last_chunk_indices,
                    out, D, z, dt_bias, initial_states, chunk_size, dt_limit, state_dtype) -> SsdLayout:
    arrays = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, z=z, out=out,
                  initial_states=initial_states, cu_seqlens=cu_seqlens,
                  cu_chunk_seqlens=cu_chunk_seqlens, seq_idx=seq_idx,
                  last_chunk_indices=last_chunk_indices)
    shape = {arg: _shape(arg, array) for arg, array in arrays.items()}
    chunk_size = checks.as_int(OP, "chunk_size", chunk_size, minimum=MIN_CHUNK_SIZE)
    if chunk_size & (chunk_size - 1):
        _fail("chunk_size", f"must be a power of two >= {MIN_CHUNK_SIZE}, got {chunk_size}")
    T, H, P = _rank("x", shape["x"], 3, "num_tokens, nheads, headdim")
    _, G, N = _rank("B", shape["B"], 3, "num_tokens, ngroups, dstate")
    if G < 1 or H % G:
        _fail("B", f"has ngroups={G}, which must divide nheads={H}")
    Q = _rank("cu_seqlens", shape["cu_seqlens"], 1, "num_seqs + 1")[0] - 1
    K = _rank("cu_chunk_seqlens", shape["cu_chunk_seqlens"], 1, "num_chunks + 1")[0] - 1
    for arg, count in (("cu_seqlens", Q), ("cu_chunk_seqlens", K)):
        if count < 0:
            _fail(arg, "must hold at least one offset (0), got none")
    allowed_shapes = dict(
        B=[(T, G, N)], C=[(T, G, N)], dt=[(T, H)], A=[(H,)], dt_bias=[(H,)], D=[(H,), (H, P)],
        z=[(T, H, P)], out=[(T, H, P)], seq_idx=[(K,)], last_chunk_indices=[(Q,)],
        initial_states=[(Q, H, P, N)])
    for arg, allowed in allowed_shapes.items():
        if shape[arg] is not None or arg in REQUIRED_ARGS:
            checks.expect_shape(OP, arg, shape[arg], *allowed)

    dtype = {arg: checks.dtype_name(array) for arg, array in arrays.items()}
    for arg in FLOAT_ARGS:
        checks.expect_dtype(OP, arg, dtype[arg], FLOAT_DTYPES)
    for arg in INDEX_ARGS:
        checks.expect_dtype(OP, arg, dtype[arg], INDEX_DTYPES)
    if dtype["C"] != dtype["B"]:
        _fail("C", f"has dtype {dtype['C']} but `B` has {dtype['B']}")
    if state_dtype is not None:
        checks.expect_dtype(OP, "state_dtype", state_dtype, FLOAT_DTYPES)
    try:
        low, high = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        _fail("dt_limit", f"must be a pair (low, high), got {dt_limit!r}")
    if not low <= high:
        _fail("dt_limit", f"must have low <= high, got {dt_limit!r}")

    return SsdLayout(num_tokens=T, nheads=H, headdim=P, ngroups=G, dstate=N, num_seqs=Q,
                     num_chunks=K, chunk_size=chunk_size,
                     D_per_head=shape["D"] is not None and len(shape["D"]) == 1)


def check_chunk_metadata_values(layout: SsdLayout, *, cu_seqlens, cu_chunk_seqlens, seq_idx,
                                last_chunk_indices) -> None:
    """Value checks on host copies (numpy arrays) of the metadata: a kernel
    given inconsistent metadata would mix sequences or read out of bounds."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    if cu[0] != 0 or cu[-1] != layout.num_tokens:
        _fail("cu_seqlens", f"must run from 0 to the {layout.num_tokens} tokens, got {_head(cu)}")
    if (np.diff(cu) < 1).any():
        _fail("cu_seqlens", f"must rise strictly (no empty sequence in a prefill), got {_head(cu)}")
    chunks = np.asarray(cu_chunk_seqlens, dtype=np.int64)
    if chunks[0] != 0 or chunks[-1] != layout.num_tokens:
        _fail("cu_chunk_seqlens", f"must run from 0 to the {layout.num_tokens} tokens, got {_head(chunks)}")
    lengths = np.diff(chunks)
    if (lengths < 1).any() or (lengths > layout.chunk_size).any():
        _fail("cu_chunk_seqlens", f"gives chunk lengths outside [1, chunk_size={layout.chunk_size}]: "
                                  f"{_head(lengths)}")
    seqs = np.asarray(seq_idx, dtype=np.int64)
    if (seqs < 0).any() or (seqs >= layout.num_seqs).any():
        _fail("seq_idx", f"must hold sequence numbers in [0, {layout.num_seqs}), got {_head(seqs)}")
    # Each chunk must lie inside the sequence that seq_idx names.
    if ((chunks[:-1] < cu[seqs]) | (chunks[1:] > cu[seqs + 1])).any():
        _fail("seq_idx", "names, for some chunk, a sequence that does not contain it "
                         "(or cu_chunk_seqlens lets a chunk span two sequences)")
    last = np.asarray(last_chunk_indices, dtype=np.int64)
    expected_last = np.searchsorted(chunks, cu[1:]) - 1
    if not np.array_equal(last, expected_last):
        _fail("last_chunk_indices", f"must be {_head(expected_last)} for these chunks, got {_head(last)}")


def _head(values, n: int = 8) -> list:
    values = np.asarray(values).tolist()
    return values if len(values) <= n else values[:n] + ["..."]


def chunk_metadata(cu_seqlens, chunk_size: int, num_computed_tokens=None) -> ChunkMetadata:
    """Chunk boundaries for packed sequences.

    ``cu_seqlens (Q+1,)``: the new tokens of each sequence. ``num_computed_tokens
    (Q,)``, for prefill that resumes a sequence: the tokens of it already in the
    cache; a sequence whose computed part does not end on a multiple of
    ``chunk_size`` gets a short first chunk that reaches the next multiple.
    """
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    if cu.ndim != 1 or len(cu) < 2 or cu[0] != 0 or (np.diff(cu) < 1).any():
        raise ValueError(f"chunk_metadata: `cu_seqlens` must rise strictly from 0, got {_head(cu)}")
    chunk_size = checks.as_int("chunk_metadata", "chunk_size", chunk_size, minimum=1)
    num_seqs = len(cu) - 1
    computed = (np.zeros(num_seqs, np.int64) if num_computed_tokens is None
                else np.asarray(num_computed_tokens, dtype=np.int64))
    if computed.shape != (num_seqs,) or (computed < 0).any():
        raise ValueError(f"chunk_metadata: `num_computed_tokens` must be ({num_seqs},) and >= 0, "
                         f"got {_head(computed)}")
    bounds, seq_idx, last = [0], [], []
    for seq in range(num_seqs):
        remaining = int(cu[seq + 1] - cu[seq])
        offset = int(computed[seq]) % chunk_size
        first = min(chunk_size - offset, remaining) if offset else min(chunk_size, remaining)
        lengths = [first] + [chunk_size] * ((remaining - first) // chunk_size)
        if sum(lengths) < remaining:
            lengths.append(remaining - sum(lengths))
        for length in lengths:
            bounds.append(bounds[-1] + length)
            seq_idx.append(seq)
        last.append(len(seq_idx) - 1)
    as_i32 = lambda v: np.asarray(v, dtype=np.int32)  # noqa: E731
    return ChunkMetadata(as_i32(bounds), as_i32(seq_idx), as_i32(last))


def max_num_chunks(num_tokens: int, num_seqs: int, chunk_size: int) -> int:
    """Upper bound on K for any packing of num_seqs sequences in num_tokens."""
    return math.ceil(num_tokens / chunk_size) + num_seqs


def batched_sequences(batch: int, seqlen: int, seq_idx=None):
    """The batched form ``(batch, seqlen, ...)`` as packed sequences.

    Without ``seq_idx`` each row is one sequence; with ``seq_idx (batch,
    seqlen)`` (non-decreasing along a row) a row splits wherever it changes.
    Returns ``(cu_seqlens (Q+1,), first_seq_of_row (batch,), last_seq_of_row
    (batch,))`` as int32 numpy arrays.
    """
    if seq_idx is None:
        starts = np.arange(batch + 1, dtype=np.int64) * seqlen
        rows = np.arange(batch, dtype=np.int32)
        return starts.astype(np.int32), rows, rows
    ids = np.asarray(seq_idx)
    if ids.shape != (batch, seqlen):
        raise ValueError(f"mamba_chunk_scan_combined: `seq_idx` has shape {ids.shape}, "
                         f"expected {(batch, seqlen)}")
    if (np.diff(ids, axis=1) < 0).any():
        raise ValueError("mamba_chunk_scan_combined: `seq_idx` must not decrease along a row")
    is_start = np.ones((batch, seqlen), dtype=bool)
    is_start[:, 1:] = ids[:, 1:] != ids[:, :-1]
    starts = np.flatnonzero(is_start.ravel())
    cu = np.append(starts, batch * seqlen).astype(np.int32)
    seqs_per_row = is_start.sum(axis=1)
    last = (np.cumsum(seqs_per_row) - 1).astype(np.int32)
    first = (last - seqs_per_row + 1).astype(np.int32)
    return cu, first, last
