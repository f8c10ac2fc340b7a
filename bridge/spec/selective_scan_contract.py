"""The argument contract of ``selective_scan_fn`` (Mamba-1 prefill, vLLM's
``mamba_ssm``), checked once for both frameworks.

Shapes (S cache slots, Q sequences, T packed tokens, G groups, N = dstate):

    varlen (query_start_loc given)       batched
    u, delta, z  (dim, T)                (Q, dim, seqlen)
    B, C         (G, N, T) | (N, T)      (Q, G, N, seqlen) | (Q, N, seqlen)
    A (dim, N); D, delta_bias (dim,); ssm_states (S, dim, N) | (S, H, dim // H, N)
    query_start_loc (Q + 1,); has_initial_state (Q,) bool
    cache_indices (Q,), or with prefix caching ("APC") a block table (Q, max_positions)
    block_idx_first_scheduled_token, block_idx_last_scheduled_token, initial_state_idx (Q,)
    cu_chunk_seqlen (K + 1,), last_chunk_indices (Q,)

Per sequence and channel d (group g = d // (dim // G)), from the state h
read at the sequence's slot when ``has_initial_state`` (else zeros), for
each token t with ``dt = softplus?(delta[d, t] + delta_bias[d])``:

    h[d] = exp(dt * A[d]) * h[d] + dt * u[d, t] * B[g, :, t]
    y[d, t] = h[d] @ C[g, :, t] + D[d] * u[d, t], then * silu(z[d, t]) when z is given

The output goes into ``z`` when given, else into ``delta`` (vLLM's in-place
contract; the other inputs are not written); the final state into the slot.
A sequence whose slot (the initial-state column with APC) is
``null_block_id`` is padding: its outputs and states are left untouched.

Prefix caching (APC, ``block_idx_first_scheduled_token`` given): row q of
``cache_indices`` is the sequence's block table. The initial state is read at
column ``initial_state_idx[q]``; the state after each token that completes a
block of ``block_size`` positions (other than the last token) goes to the
next column from ``block_idx_first_scheduled_token[q]`` on, and the final
state to column ``block_idx_last_scheduled_token[q]``. The first scheduled
token sits at offset ``block_size - c`` of its block when the sequence's
first chunk (``cu_chunk_seqlen`` / ``last_chunk_indices``, which vLLM's
builder aligns to blocks) holds ``c < block_size`` tokens and the sequence
has more than one chunk, else at offset 0; the chunk metadata is used for
nothing else. So ``last == first + (offset + seqlen - 1) // block_size``.
Null entries of the table at boundary columns are not written.

Unchecked values (torch by default, JAX under jit) never make a kernel touch
memory outside the arrays it was given: a sequence whose token range leaves
``[0, T]``, whose columns or chunk indices leave their tables, or whose slots
leave ``[0, S)`` (other than null entries) writes no state and NaN outputs
(for its tokens inside ``[0, T)``). Sequences sharing slots give an
unspecified result; the checked path refuses them.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from bridge.spec import checks

OP = "selective_scan_fn"
NULL_BLOCK_ID = 0  # vLLM's null cache block: entries equal to it are padding
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
INDEX_DTYPES = ("int32", "int64")
FLOAT_ARGS = ("u", "ssm_states", "delta", "A", "B", "C", "D", "z", "delta_bias")
INDEX_ARGS = ("query_start_loc", "cache_indices", "has_initial_state",
              "block_idx_first_scheduled_token", "block_idx_last_scheduled_token",
              "initial_state_idx", "cu_chunk_seqlen", "last_chunk_indices")
ARGS = FLOAT_ARGS + INDEX_ARGS
APC_ARGS = ("block_idx_first_scheduled_token", "block_idx_last_scheduled_token", "initial_state_idx")


@dataclasses.dataclass(frozen=True)
class ScanLayout:
    """Sizes of one call."""

    varlen: bool
    num_seqs: int
    num_tokens: int  # T (varlen) or seqlen (batched)
    dim: int
    dstate: int
    ngroups: int
    num_slots: int
    apc: bool
    index_columns: int  # columns of cache_indices (1 when 1-D or absent)
    num_chunks: int  # K: chunks in cu_chunk_seqlen (0 when absent)

    @property
    def channels_per_group(self) -> int:
        return self.dim // self.ngroups


@dataclasses.dataclass(frozen=True)
class ScanTiles:
    """The tiles of one launch (the same in both kernels)."""

    block_d: int  # channels per program; never spanning two groups
    block_n: int  # dstate, padded to a power of two
    block_t: int  # tokens per tile (aligned to multiples of block_t)
    num_warps: int
    even: bool  # dim a multiple of block_d and dstate == block_n: tiles inside a sequence load unmasked


# One thread per channel (block_d = 32 * num_warps): the state's dstate row
# and a tile's tokens stay in the thread's registers (Triton kernel). block_t
# 4 keeps the (block_t, dstate) B and C tile every thread holds within the
# register file at dstate 16 (8 spills on sm_90).
MAX_BLOCK_D, MIN_BLOCK_D, BLOCK_T, WARP = 128, 8, 4, 32
MIN_PROGRAMS = 1024  # fewer channels per program until the GPU has this many


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def scan_tiles(layout: ScanLayout) -> ScanTiles:
    """One program per (block of channels, sequence): smaller channel blocks
    for few long sequences, so that every multiprocessor gets programs (below
    32 channels the threads also split dstate). With ngroups > 1 the block
    is at most the largest power of two dividing dim // ngroups (B and C are
    then one vector per token).

    A single long sequence (1 x 16k at dim 5120) has only dim / block_d
    programs, each walking all its tokens in order: the scan is sequential
    over tokens, so it runs far below the copy bandwidth (a chunked parallel
    scan over tokens would be needed to fill the GPU)."""
    block_d = min(MAX_BLOCK_D, _power_of_two_at_least(layout.dim))
    while block_d > MIN_BLOCK_D and -(-layout.dim // block_d) * layout.num_seqs < MIN_PROGRAMS:
        block_d //= 2
    if layout.ngroups > 1:
        per_group = layout.channels_per_group
        block_d = min(block_d, per_group & -per_group)
    block_n = _power_of_two_at_least(layout.dstate)
    return ScanTiles(block_d=block_d, block_n=block_n, block_t=BLOCK_T, num_warps=max(1, block_d // WARP),
                     even=layout.dim % block_d == 0 and layout.dstate == block_n)


def _fail(arg: str, message: str):
    checks.fail(OP, arg, message)


def check_selective_scan_args(*, u, ssm_states, delta, A, B, C, D=None, z=None, delta_bias=None,
                              query_start_loc=None, cache_indices=None, has_initial_state=None,
                              block_idx_first_scheduled_token=None,
                              block_idx_last_scheduled_token=None, initial_state_idx=None,
                              cu_chunk_seqlen=None, last_chunk_indices=None,
                              null_block_id=NULL_BLOCK_ID, block_size=1024,
                              delta_softplus=False) -> ScanLayout:
    """Check every shape, dtype and scalar option (torch, JAX or numpy
    arrays); return the call's sizes. ValueError naming the argument at fault;
    the array checks are cached per (shape, dtype) signature."""
    arrays = dict(u=u, ssm_states=ssm_states, delta=delta, A=A, B=B, C=C, D=D, z=z,
                  delta_bias=delta_bias, query_start_loc=query_start_loc,
                  cache_indices=cache_indices, has_initial_state=has_initial_state,
                  block_idx_first_scheduled_token=block_idx_first_scheduled_token,
                  block_idx_last_scheduled_token=block_idx_last_scheduled_token,
                  initial_state_idx=initial_state_idx, cu_chunk_seqlen=cu_chunk_seqlen,
                  last_chunk_indices=last_chunk_indices)
    for arg, array in arrays.items():
        if array is None:
            if arg in ("u", "ssm_states", "delta", "A", "B", "C"):
                _fail(arg, "is required")
        elif not hasattr(array, "dtype") or not hasattr(array, "shape"):
            _fail(arg, f"must be an array of the op's framework, got {type(array).__name__}")
    checks.as_int(OP, "null_block_id", null_block_id)
    apc = block_idx_first_scheduled_token is not None
    if apc:
        checks.as_int(OP, "block_size", block_size, minimum=1)
    if not isinstance(delta_softplus, (bool, np.bool_)):
        _fail("delta_softplus", f"must be a bool, got {delta_softplus!r}")
    return _check_arrays(checks.array_signature(arrays.values()))


@functools.lru_cache(maxsize=1024)
def _check_arrays(signature) -> ScanLayout:
    shapes = {arg: None if s is None else s[0] for arg, s in zip(ARGS, signature)}
    for arg, entry in zip(ARGS, signature):
        if entry is None:
            continue
        if arg == "has_initial_state":
            allowed = ("bool",) + INDEX_DTYPES
        else:
            allowed = FLOAT_DTYPES if arg in FLOAT_ARGS else INDEX_DTYPES
        checks.expect_dtype(OP, arg, entry[1], allowed)

    varlen = shapes["query_start_loc"] is not None
    u = shapes["u"]
    if varlen:
        if len(u) != 2:
            _fail("u", f"has shape {u}; with query_start_loc it must be (dim, total_length)")
        dim, num_tokens = u
        qsl = shapes["query_start_loc"]
        if len(qsl) != 1 or qsl[0] < 1:
            _fail("query_start_loc", f"must be 1-D of length batch + 1, got shape {qsl}")
        num_seqs = qsl[0] - 1
    else:
        if len(u) != 3:
            _fail("u", f"has shape {u}; without query_start_loc it must be (batch, dim, seqlen)")
        num_seqs, dim, num_tokens = u
    lead = () if varlen else (num_seqs,)
    checks.expect_shape(OP, "delta", shapes["delta"], u)
    if shapes["z"] is not None:
        checks.expect_shape(OP, "z", shapes["z"], u)
    A = shapes["A"]
    if len(A) != 2 or A[0] != dim:
        _fail("A", f"has shape {A}, expected ({dim}, dstate)")
    dstate = A[1]
    B = shapes["B"]
    ngroups = B[len(lead)] if len(B) == len(lead) + 3 else 1
    if ngroups < 1 or dim % ngroups:
        _fail("B", f"has ngroups={ngroups}, which must divide dim={dim}")
    checks.expect_shape(OP, "B", B, lead + (ngroups, dstate, num_tokens), lead + (dstate, num_tokens))
    checks.expect_shape(OP, "C", shapes["C"], B)
    for arg in ("D", "delta_bias"):
        if shapes[arg] is not None:
            checks.expect_shape(OP, arg, shapes[arg], (dim,))

    states = shapes["ssm_states"]
    if len(states) == 4 and states[1] >= 1 and states[1] * states[2] == dim and states[3] == dstate:
        num_slots = states[0]
    elif len(states) == 3:
        num_slots = states[0]
        checks.expect_shape(OP, "ssm_states", states, (num_slots, dim, dstate))
    else:
        _fail("ssm_states", f"has shape {states}, expected (slots, {dim}, {dstate}) "
                            f"or (slots, nheads, {dim} // nheads, {dstate})")

    apc = shapes["block_idx_first_scheduled_token"] is not None
    index_columns = 1
    indices = shapes["cache_indices"]
    if apc:
        if indices is None or len(indices) != 2 or indices[0] < num_seqs or indices[1] < 1:
            _fail("cache_indices", f"has shape {indices}; with block_idx_first_scheduled_token it "
                                   f"must be a block table ({num_seqs}, max_positions)")
        index_columns = indices[1]
        for arg in APC_ARGS:
            if shapes[arg] is None:
                _fail(arg, "is required with block_idx_first_scheduled_token (prefix caching)")
    else:
        for arg in APC_ARGS[1:] + ("cu_chunk_seqlen", "last_chunk_indices"):
            if shapes[arg] is not None:
                _fail(arg, "is only used with block_idx_first_scheduled_token (prefix caching)")
        if indices is not None and (len(indices) != 1 or indices[0] < num_seqs):
            _fail("cache_indices", f"has shape {indices}, expected ({num_seqs},) "
                                   f"(a block table needs block_idx_first_scheduled_token)")
    for arg in APC_ARGS + ("has_initial_state", "last_chunk_indices"):
        if shapes[arg] is not None and (len(shapes[arg]) != 1 or shapes[arg][0] < num_seqs):
            _fail(arg, f"has shape {shapes[arg]}, expected ({num_seqs},)")
    num_chunks = 0
    chunks, last_chunks = shapes["cu_chunk_seqlen"], shapes["last_chunk_indices"]
    if (chunks is None) != (last_chunks is None):
        _fail("cu_chunk_seqlen" if chunks is None else "last_chunk_indices",
              "is required with " + ("last_chunk_indices" if chunks is None else "cu_chunk_seqlen"))
    if chunks is not None:
        if len(chunks) != 1 or chunks[0] < 2:
            _fail("cu_chunk_seqlen", f"must be 1-D of length num_chunks + 1 (at least one chunk), "
                                     f"got shape {chunks}")
        num_chunks = chunks[0] - 1
    return ScanLayout(varlen=varlen, num_seqs=num_seqs, num_tokens=num_tokens, dim=dim,
                      dstate=dstate, ngroups=ngroups, num_slots=num_slots, apc=apc,
                      index_columns=index_columns, num_chunks=num_chunks)


def first_block_offsets(layout: ScanLayout, block_size: int, seqlens, cu_chunk_seqlen=None,
                        last_chunk_indices=None) -> np.ndarray:
    """Offset of each sequence's first scheduled token inside its first block
    (see the module docstring), from host values."""
    offsets = np.zeros(layout.num_seqs, np.int64)
    if cu_chunk_seqlen is None:
        return offsets
    cu = np.asarray(cu_chunk_seqlen, np.int64)
    last = np.asarray(last_chunk_indices, np.int64)[:layout.num_seqs]
    first = np.concatenate([[0], last[:-1] + 1])
    if (last < first).any() or (last >= layout.num_chunks).any():
        _fail("last_chunk_indices", f"must rise by at least 1 per sequence and stay below the "
                                    f"{layout.num_chunks} chunks, got {last.tolist()[:8]}")
    if (np.diff(cu) < 0).any():
        _fail("cu_chunk_seqlen", f"must not decrease, got {cu.tolist()[:8]}")
    if not np.array_equal(cu[last + 1] - cu[first], seqlens):
        _fail("cu_chunk_seqlen", f"gives sequences of {(cu[last + 1] - cu[first]).tolist()[:8]} "
                                 f"tokens, but query_start_loc {np.asarray(seqlens).tolist()[:8]}")
    first_len = cu[first + 1] - cu[first]
    partial = (last > first) & (first_len < block_size)
    offsets[partial] = block_size - first_len[partial]
    return offsets


def check_selective_scan_index_values(layout: ScanLayout, *, null_block_id: int, block_size: int,
                                      query_start_loc=None, cache_indices=None,
                                      has_initial_state=None, block_idx_first_scheduled_token=None,
                                      block_idx_last_scheduled_token=None, initial_state_idx=None,
                                      cu_chunk_seqlen=None, last_chunk_indices=None) -> None:
    """Value checks on host (numpy) copies of the index arguments, the debug
    mode: the kernels skip bad work on their own, only this can raise."""
    Q, S = layout.num_seqs, layout.num_slots
    if query_start_loc is not None:
        qsl = np.asarray(query_start_loc, np.int64)
        if qsl[0] < 0 or qsl[-1] > layout.num_tokens or (np.diff(qsl) < 0).any():
            _fail("query_start_loc", f"must rise from >= 0 to at most the {layout.num_tokens} "
                                     f"tokens, got {qsl.tolist()[:8]}")
        seqlens = np.diff(qsl)
    else:
        seqlens = np.full(Q, layout.num_tokens, np.int64)
    if has_initial_state is not None:
        flags = np.asarray(has_initial_state)[:Q]
        if not np.isin(flags, (0, 1)).all():
            _fail("has_initial_state", f"must hold 0/1 (bool) values, got {flags.tolist()[:8]}")
    if cache_indices is None:
        return
    table = np.asarray(cache_indices, np.int64).reshape(len(cache_indices), -1)[:Q]

    def check_slots(arg, slots):
        bad = (slots != null_block_id) & ((slots < 0) | (slots >= S))
        if bad.any():
            _fail(arg, f"holds {slots[bad].tolist()[:4]}, outside the cache's {S} slots "
                       f"(null_block_id={null_block_id})")

    if not layout.apc:
        read = written = table[:, 0]
        check_slots("cache_indices", read)
        active = read != null_block_id
        writes = [(q, int(read[q])) for q in range(Q) if active[q] and seqlens[q] > 0]
    else:
        columns = {arg: np.asarray(v, np.int64)[:Q] for arg, v in (
            ("initial_state_idx", initial_state_idx),
            ("block_idx_first_scheduled_token", block_idx_first_scheduled_token),
            ("block_idx_last_scheduled_token", block_idx_last_scheduled_token))}
        for arg, cols in columns.items():
            if ((cols < 0) | (cols >= layout.index_columns)).any():
                _fail(arg, f"must lie in [0, {layout.index_columns}) (columns of cache_indices), "
                           f"got {cols.tolist()[:8]}")
        first, last = columns["block_idx_first_scheduled_token"], columns["block_idx_last_scheduled_token"]
        offsets = first_block_offsets(layout, block_size, seqlens, cu_chunk_seqlen, last_chunk_indices)
        blocks = (offsets + np.maximum(seqlens, 1) - 1) // block_size
        if not np.array_equal(last, first + blocks):
            _fail("block_idx_last_scheduled_token",
                  f"is {last.tolist()[:8]}, but the scheduled tokens end in block columns "
                  f"{(first + blocks).tolist()[:8]} (block_idx_first_scheduled_token + "
                  f"(offset + seqlen - 1) // block_size)")
        read = table[np.arange(Q), columns["initial_state_idx"]]
        check_slots("cache_indices", read)
        active = read != null_block_id
        writes = []
        for q in np.flatnonzero(active & (seqlens > 0)):
            slots = table[q, first[q]:last[q] + 1]
            check_slots("cache_indices", slots)
            writes += [(q, int(s)) for s in slots if s != null_block_id]
    _check_collisions(read, active, writes)


def _check_collisions(read, active, writes) -> None:
    """No slot written twice; no slot read by one sequence and written by another."""
    slots = [s for _, s in writes]
    values, counts = np.unique(np.asarray(slots, np.int64), return_counts=True)
    if (counts > 1).any():
        _fail("cache_indices", f"writes slot(s) {values[counts > 1].tolist()[:8]} more than once")
    reader = {int(s): q for q, s in enumerate(read) if active[q]}
    clash = sorted({s for q, s in writes if reader.get(s, q) != q})
    if clash:
        _fail("cache_indices", f"writes slot(s) {clash[:8]} that another sequence reads in the same call")
