"""The argument contract of ``selective_state_update`` (vLLM's ``mamba_ssm``),
checked once for both frameworks.

Shapes (spec names; S cache slots, H heads, P = dim = headdim, N = dstate,
G groups, T tokens in the batch, Q sequences):

    state   (S, H, P, N)            or 3-D (S, P, N)
    x, z    (T, H, P)               or (T, P)
    dt      (T, H, P) | (T, H)      or (T, P)
    A       (H, P, N) | (H,)        or (P, N)
    B, C    (T, G, N)               or (T, N)
    D       (H, P) | (H,)           or (P,)
    dt_bias (H, P) | (H,)           or (P,)
    state_batch_indices, dst_state_batch_indices  (Q,) or (Q, L)
    num_accepted_tokens (Q,), cu_seqlens (Q + 1,)

The per-head forms of dt, A, dt_bias (and D) are the *tied-head* layout of
Mamba-2: one value per head, broadcast over ``dim``. PyTorch callers may also
pass the full shapes as stride-0 expansions, as vLLM's mixer does.

Without ``cu_seqlens`` every token is its own sequence (Q = T). With it,
sequence q owns tokens ``cu_seqlens[q]:cu_seqlens[q+1]``. Index arguments are
arrays of the op's framework (Python lists are refused by name);
``null_block_id`` is an integer; ``num_accepted_tokens`` lies in
``[1, L]`` (``check_num_accepted_tokens``, shared with the conv contract).

Unchecked values (torch by default, JAX under jit) never make a kernel touch
memory outside the arrays it was given: a sequence whose ``cu_seqlens`` range
leaves ``[0, T]``, whose ``num_accepted_tokens`` leaves ``[1, L]`` or whose
source / destination slot leaves ``[0, S)`` (and is not ``null_block_id``)
writes no state, and its outputs inside ``[0, T)`` become NaN. Slots shared
between sequences (``check_slot_collisions``) give an unspecified result.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import numpy as np

from bridge.spec import checks

OP = "selective_state_update"

# vLLM reserves cache block 0 as the null block: an index equal to it marks a
# padding entry that is skipped (its state and output are left untouched).
NULL_BLOCK_ID = 0

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
REFERENCE_FLOAT_DTYPES = FLOAT_DTYPES + ("float64",)  # the references also take float64
INDEX_DTYPES = ("int32", "int64")
DEFAULT_PHILOX_ROUNDS = 10
FLOAT_ARGS = ("state", "x", "dt", "A", "B", "C", "D", "dt_bias", "z", "out")
INDEX_ARGS = ("state_batch_indices", "dst_state_batch_indices", "num_accepted_tokens", "cu_seqlens")
ARGS = FLOAT_ARGS + INDEX_ARGS


@dataclasses.dataclass(frozen=True)
class SsuLayout:
    """Sizes of one call, in the 4-D form (a 3-D call has nheads == 1)."""

    state_ndim: int
    num_slots: int
    nheads: int
    dim: int
    dstate: int
    ngroups: int
    num_tokens: int
    num_seqs: int
    index_columns: int  # L: columns of the (2-D) index arrays, 1 when 1-D or absent
    per_head_params: bool  # dt, A and dt_bias were given one value per head

    @property
    def heads_per_group(self) -> int:
        return self.nheads // self.ngroups


def _fail(arg: str, message: str):
    checks.fail(OP, arg, message)


def _expect(arg: str, shape, *allowed: tuple[int, ...]) -> None:
    checks.expect_shape(OP, arg, shape, *allowed)


def check_ssu_args(state, x, dt, A, B, C, D=None, dt_bias=None, z=None, out=None,
                   state_batch_indices=None, dst_state_batch_indices=None,
                   num_accepted_tokens=None, cu_seqlens=None, *, null_block_id=NULL_BLOCK_ID,
                   enable_stochastic_rounding: bool = False, cache_philox_rounds: int = 0,
                   rounding_seed=None, float_dtypes=FLOAT_DTYPES) -> SsuLayout:
    """Check every shape, dtype and scalar option of a call (torch, JAX or
    numpy arrays); return the call's sizes. Raises ValueError naming the
    argument at fault. The array checks are cached per (shape, dtype)
    signature: a decode loop pays them once."""
    arrays = (state, x, dt, A, B, C, D, dt_bias, z, out, state_batch_indices,
              dst_state_batch_indices, num_accepted_tokens, cu_seqlens)
    try:
        signature = checks.array_signature(arrays)
    except AttributeError:
        arg, array = next((n, a) for n, a in zip(ARGS, arrays) if a is not None and not hasattr(a, "dtype"))
        _fail(arg, f"must be an array of the op's framework, got {type(array).__name__}")
    check_ssu_options(state, null_block_id=null_block_id, enable_stochastic_rounding=enable_stochastic_rounding,
                      cache_philox_rounds=cache_philox_rounds, rounding_seed=rounding_seed)
    return _check_arrays(signature, float_dtypes)


def check_ssu_options(state, *, null_block_id, enable_stochastic_rounding, cache_philox_rounds,
                      rounding_seed) -> None:
    """The scalar options' part of ``check_ssu_args`` (for callers that cached the array checks)."""
    if type(null_block_id) is not int:  # noqa: E721  (the common case without a call)
        checks.as_int(OP, "null_block_id", null_block_id)
    if cache_philox_rounds:
        checks.as_int(OP, "cache_philox_rounds", cache_philox_rounds, minimum=0)
    if enable_stochastic_rounding:
        if checks.dtype_name(state) != "float16":
            _fail("enable_stochastic_rounding", f"needs a float16 state, got {checks.dtype_name(state)}")
        check_rounding_seed(rounding_seed)


@functools.lru_cache(maxsize=1024)
def _check_arrays(signature, float_dtypes) -> SsuLayout:
    shapes = {arg: None if s is None else s[0] for arg, s in zip(ARGS, signature)}
    for arg, entry in zip(ARGS, signature):
        if entry is not None:
            checks.expect_dtype(OP, arg, entry[1], float_dtypes if arg in FLOAT_ARGS else INDEX_DTYPES)
    state, x, B, C = shapes["state"], shapes["x"], shapes["B"], shapes["C"]
    if len(state) == 4:
        num_slots, nheads, dim, dstate = state
    elif len(state) == 3:
        num_slots, dim, dstate = state
        nheads = 1
    else:
        _fail("state", f"must be 3-D (slots, dim, dstate) or 4-D (slots, nheads, dim, dstate), got shape {state}")
    four_d = len(state) == 4
    if len(x) != len(state) - 1:
        _fail("x", f"has shape {x}; with a {len(state)}-D state it must be {len(state) - 1}-D")
    num_tokens = x[0]
    _expect("x", x, (num_tokens, nheads, dim) if four_d else (num_tokens, dim))

    if four_d:
        if len(B) != 3:
            _fail("B", f"has shape {B}, expected (batch, ngroups, dstate)")
        ngroups = B[1]
    else:
        ngroups = 1
    _expect("B", B, (num_tokens, ngroups, dstate) if four_d else (num_tokens, dstate))
    if ngroups < 1 or nheads % ngroups:
        _fail("B", f"has ngroups={ngroups}, which must divide nheads={nheads}")
    _expect("C", C, B)

    full = {
        "dt": (num_tokens, nheads, dim) if four_d else (num_tokens, dim),
        "A": (nheads, dim, dstate) if four_d else (dim, dstate),
        "dt_bias": (nheads, dim) if four_d else (dim,),
        "D": (nheads, dim) if four_d else (dim,),
    }
    per_head = {"dt": (num_tokens, nheads), "A": (nheads,), "dt_bias": (nheads,), "D": (nheads,)}
    given_per_head = {}
    for arg in ("dt", "A", "dt_bias", "D"):
        shape = shapes[arg]
        if shape is None:
            if arg in ("dt", "A"):
                _fail(arg, "is required")
            continue
        _expect(arg, shape, *((full[arg], per_head[arg]) if four_d else (full[arg],)))
        given_per_head[arg] = four_d and shape == per_head[arg] and full[arg] != per_head[arg]
    per_head_params = given_per_head["dt"] and given_per_head["A"] and given_per_head.get("dt_bias", True)
    for arg in ("z", "out"):
        if shapes[arg] is not None:
            _expect(arg, shapes[arg], x)

    cu_seqlens = shapes["cu_seqlens"]
    if cu_seqlens is not None:
        shape = cu_seqlens
        if len(shape) != 1 or shape[0] < 1:
            _fail("cu_seqlens", f"must be 1-D of length num_seqs + 1, got shape {shape}")
        num_seqs = shape[0] - 1
    else:
        num_seqs = num_tokens

    index_columns = 1
    src, dst = shapes["state_batch_indices"], shapes["dst_state_batch_indices"]
    for arg, shape in (("state_batch_indices", src), ("dst_state_batch_indices", dst)):
        if shape is None:
            continue
        if len(shape) not in (1, 2) or shape[0] < num_seqs or (len(shape) == 2 and shape[1] < 1):
            _fail(arg, f"has shape {shape}, expected ({num_seqs},) or ({num_seqs}, max_seqlen)")
        if len(shape) == 2:
            index_columns = max(index_columns, shape[1])
    if dst is not None and src is None:
        _fail("dst_state_batch_indices", "needs state_batch_indices")
    columns = lambda shape: shape[1] if len(shape) == 2 else 1  # noqa: E731
    if src is not None and dst is not None and columns(src) != columns(dst):
        _fail("dst_state_batch_indices", f"has {columns(dst)} columns but state_batch_indices "
                                         f"has {columns(src)}")
    if shapes["num_accepted_tokens"] is not None:
        if src is None or len(src) != 2:
            _fail("num_accepted_tokens", "needs a 2-D state_batch_indices (num_seqs, max_seqlen)")
        _expect("num_accepted_tokens", shapes["num_accepted_tokens"], (num_seqs,))

    return SsuLayout(
        state_ndim=len(state), num_slots=num_slots, nheads=nheads, dim=dim, dstate=dstate,
        ngroups=ngroups, num_tokens=num_tokens, num_seqs=num_seqs,
        index_columns=index_columns, per_head_params=bool(per_head_params))


def check_rounding_seed(seed) -> None:
    """A seed is an integer in [0, 2**32) or an integer array of one element."""
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        if not 0 <= int(seed) < 2**32:
            _fail("rounding_seed", f"must lie in [0, 2**32), got {seed}")
    elif seed is not None and not (hasattr(seed, "dtype") and checks.dtype_name(seed) in (
            "int32", "int64", "uint32") and int(np.prod(seed.shape)) == 1):
        _fail("rounding_seed", f"must be an integer in [0, 2**32) or a one-element integer array, "
                               f"got {seed!r}")


def check_num_accepted_tokens(op: str, num_accepted_tokens, columns) -> None:
    """The accepted-token counts of the previous speculative step (vLLM:
    1 .. 1 + num_speculative_tokens): each in ``[1, columns]``, ``columns``
    being the state columns a sequence can continue from (scalar or per
    sequence). Host (numpy) values."""
    accepted = np.asarray(num_accepted_tokens, dtype=np.int64)
    bad = (accepted < 1) | (accepted > columns)
    if bad.any():
        checks.fail(op, "num_accepted_tokens", f"must lie in [1, {np.max(columns)}], "
                                               f"got {accepted[bad].tolist()[:8]}")


def check_ssu_index_values(layout: SsuLayout, *, null_block_id: int,
                           state_batch_indices=None, dst_state_batch_indices=None,
                           num_accepted_tokens=None, cu_seqlens=None) -> None:
    """Value checks on host copies (numpy arrays) of the index arguments, the
    debug mode: the kernels skip bad work on their own (see the module
    docstring), but only this check can raise."""
    for arg, indices in (("state_batch_indices", state_batch_indices),
                         ("dst_state_batch_indices", dst_state_batch_indices)):
        if indices is None:
            continue
        used = np.asarray(indices)[:layout.num_seqs]
        bad = (used != null_block_id) & ((used < 0) | (used >= layout.num_slots))
        if bad.any():
            _fail(arg, f"holds {used[bad].ravel()[:4].tolist()}, outside the cache's "
                       f"{layout.num_slots} slots (null_block_id={null_block_id})")
    if cu_seqlens is not None:
        cu = np.asarray(cu_seqlens)
        if cu[0] != 0 or cu[-1] != layout.num_tokens or (np.diff(cu) < 0).any():
            _fail("cu_seqlens", f"must rise from 0 to the {layout.num_tokens} tokens, got {cu.tolist()[:8]}")
        seqlens = np.diff(cu)
    else:
        seqlens = np.ones(layout.num_seqs, dtype=np.int64)
    if num_accepted_tokens is not None:
        check_num_accepted_tokens(OP, num_accepted_tokens, layout.index_columns)
        if (seqlens > layout.index_columns).any():
            _fail("cu_seqlens", f"gives a sequence of {seqlens.max()} tokens, more than the "
                                f"{layout.index_columns} state slots per sequence in dst_state_batch_indices")
    if state_batch_indices is not None:
        check_slot_collisions(layout, null_block_id, seqlens, state_batch_indices,
                              dst_state_batch_indices, num_accepted_tokens)


def check_slot_collisions(layout: SsuLayout, null_block_id: int, seqlens, state_batch_indices,
                          dst_state_batch_indices=None, num_accepted_tokens=None) -> None:
    """Sequences must not share slots: no two read one slot, no slot is
    written twice, and no sequence reads a slot that another writes (the
    kernels run sequences in parallel). Padding entries are exempt; a
    sequence may read and write its own slot (the in-place update)."""
    Q = layout.num_seqs
    columns = lambda a: np.asarray(a) if np.ndim(a) == 2 else np.asarray(a)[:, None]  # noqa: E731
    src = columns(state_batch_indices)[:Q]
    dst_arg = "state_batch_indices" if dst_state_batch_indices is None else "dst_state_batch_indices"
    dst = src if dst_state_batch_indices is None else columns(dst_state_batch_indices)[:Q]
    first_col = (np.asarray(num_accepted_tokens) - 1 if num_accepted_tokens is not None
                 else np.zeros(Q, np.int64))
    read = src[np.arange(Q), first_col]
    active = read != null_block_id
    if num_accepted_tokens is not None:  # each token's state to its own column
        written = np.arange(dst.shape[1])[None, :] < np.asarray(seqlens)[:, None]
    else:
        written = np.zeros(dst.shape, bool)
        written[:, 0] = seqlens > 0
    written &= active[:, None] & (dst != null_block_id)
    writer = np.broadcast_to(np.arange(Q)[:, None], dst.shape)[written]
    dst_slots = dst[written]

    def repeated(slots):
        values, counts = np.unique(slots, return_counts=True)
        return values[counts > 1].tolist()

    if repeated(read[active]):
        _fail("state_batch_indices", f"has sequences reading the same slot(s) "
                                     f"{repeated(read[active])[:8]}; each sequence needs its own")
    if repeated(dst_slots):
        _fail(dst_arg, f"writes slot(s) {repeated(dst_slots)[:8]} more than once")
    reader = dict(zip(read[active].tolist(), np.flatnonzero(active).tolist()))
    clash = sorted({int(s) for s, q in zip(dst_slots.tolist(), writer.tolist())
                    if reader.get(s, q) != q})
    if clash:
        _fail(dst_arg, f"writes slot(s) {clash[:8]} that another sequence reads in the same call")


def philox_rounds(cache_philox_rounds: int) -> int:
    """0 selects the default number of rounds."""
    return cache_philox_rounds or DEFAULT_PHILOX_ROUNDS
