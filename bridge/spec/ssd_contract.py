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
from typing import Mapping, Optional, Sequence

import numpy as np

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
INDEX_DTYPES = ("int32", "int64")
MIN_CHUNK_SIZE = 16  # the smallest tile a tensor-core product takes

Shape = Optional[Sequence[int]]


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
    raise ValueError(f"mamba_chunk_scan_combined_varlen: `{arg}` {message}")


def _expect(arg: str, shape: Shape, *allowed: tuple[int, ...]) -> None:
    if shape is None:
        _fail(arg, "is required")
    if tuple(shape) not in allowed:
        _fail(arg, f"has shape {tuple(shape)}, expected {' or '.join(str(a) for a in allowed)}")


def check_ssd_args(shapes: Mapping[str, Shape], dtypes: Mapping[str, Optional[str]], *,
                   chunk_size: int, dt_limit=(0.0, float("inf")),
                   state_dtype: Optional[str] = None) -> SsdLayout:
    """Check every shape and dtype; return the call's sizes. ``shapes`` and
    ``dtypes`` map argument names to a shape tuple / dtype name, or None for
    an argument that was not given. Raises ValueError naming the argument."""
    if not isinstance(chunk_size, int) or chunk_size < MIN_CHUNK_SIZE or chunk_size & (chunk_size - 1):
        _fail("chunk_size", f"must be a power of two >= {MIN_CHUNK_SIZE}, got {chunk_size!r}")
    x = shapes.get("x")
    if x is None or len(x) != 3:
        _fail("x", f"must be 3-D (num_tokens, nheads, headdim), got shape {x}")
    T, H, P = x
    B = shapes.get("B")
    if B is None or len(B) != 3:
        _fail("B", f"must be 3-D (num_tokens, ngroups, dstate), got shape {B}")
    G, N = B[1], B[2]
    _expect("B", B, (T, G, N))
    if G < 1 or H % G:
        _fail("B", f"has ngroups={G}, which must divide nheads={H}")
    _expect("C", shapes.get("C"), (T, G, N))
    _expect("dt", shapes.get("dt"), (T, H))
    _expect("A", shapes.get("A"), (H,))
    if shapes.get("dt_bias") is not None:
        _expect("dt_bias", shapes["dt_bias"], (H,))
    D = shapes.get("D")
    if D is not None:
        _expect("D", D, (H,), (H, P))
    for arg in ("z", "out"):
        if shapes.get(arg) is not None:
            _expect(arg, shapes[arg], (T, H, P))

    cu_seqlens = shapes.get("cu_seqlens")
    if cu_seqlens is None or len(cu_seqlens) != 1 or cu_seqlens[0] < 2:
        _fail("cu_seqlens", f"must be 1-D of length num_seqs + 1 >= 2, got shape {cu_seqlens}")
    Q = cu_seqlens[0] - 1
    cu_chunks = shapes.get("cu_chunk_seqlens")
    if cu_chunks is None or len(cu_chunks) != 1 or cu_chunks[0] < 2:
        _fail("cu_chunk_seqlens", f"must be 1-D of length num_chunks + 1 >= 2, got shape {cu_chunks}")
    K = cu_chunks[0] - 1
    _expect("seq_idx", shapes.get("seq_idx"), (K,))
    _expect("last_chunk_indices", shapes.get("last_chunk_indices"), (Q,))
    if shapes.get("initial_states") is not None:
        _expect("initial_states", shapes["initial_states"], (Q, H, P, N))

    for arg in ("x", "dt", "A", "B", "C", "D", "dt_bias", "z", "out", "initial_states"):
        dtype = dtypes.get(arg)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            _fail(arg, f"has dtype {dtype}; supported: {', '.join(FLOAT_DTYPES)}")
    for arg in ("cu_seqlens", "cu_chunk_seqlens", "seq_idx", "last_chunk_indices"):
        dtype = dtypes.get(arg)
        if dtype is not None and dtype not in INDEX_DTYPES:
            _fail(arg, f"has dtype {dtype}; supported: {', '.join(INDEX_DTYPES)}")
    if dtypes.get("B") is not None and dtypes.get("C") != dtypes["B"]:
        _fail("C", f"has dtype {dtypes.get('C')} but `B` has {dtypes['B']}")
    if state_dtype is not None and state_dtype not in FLOAT_DTYPES:
        _fail("state_dtype", f"is {state_dtype}; supported: {', '.join(FLOAT_DTYPES)}")
    try:
        low, high = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        _fail("dt_limit", f"must be a pair (low, high), got {dt_limit!r}")
    if not low <= high:
        _fail("dt_limit", f"must have low <= high, got {dt_limit!r}")

    return SsdLayout(num_tokens=T, nheads=H, headdim=P, ngroups=G, dstate=N, num_seqs=Q,
                     num_chunks=K, chunk_size=chunk_size,
                     D_per_head=D is not None and len(D) == 1)


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
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_metadata: `chunk_size` must be a positive int, got {chunk_size!r}")
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
