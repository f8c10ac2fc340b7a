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
sequence q owns tokens ``cu_seqlens[q]:cu_seqlens[q+1]``.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np

# vLLM reserves cache block 0 as the null block: an index equal to it marks a
# padding entry that is skipped (its state and output are left untouched).
NULL_BLOCK_ID = 0

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
INDEX_DTYPES = ("int32", "int64")
DEFAULT_PHILOX_ROUNDS = 10

Shape = Optional[Sequence[int]]


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
    raise ValueError(f"selective_state_update: `{arg}` {message}")


def _expect(arg: str, shape: Shape, *allowed: tuple[int, ...]) -> None:
    if tuple(shape) not in allowed:
        wanted = " or ".join(str(a) for a in allowed)
        _fail(arg, f"has shape {tuple(shape)}, expected {wanted}")


def check_ssu_args(shapes: Mapping[str, Shape], dtypes: Mapping[str, Optional[str]], *,
                   enable_stochastic_rounding: bool = False,
                   cache_philox_rounds: int = 0) -> SsuLayout:
    """Check every shape and dtype; return the call's sizes.

    ``shapes`` and ``dtypes`` map argument names to a shape tuple / dtype name,
    or None for an argument that was not given. Raises ValueError naming the
    argument at fault.
    """
    state = tuple(shapes["state"])
    if len(state) == 4:
        num_slots, nheads, dim, dstate = state
    elif len(state) == 3:
        num_slots, dim, dstate = state
        nheads = 1
    else:
        _fail("state", f"must be 3-D (slots, dim, dstate) or 4-D (slots, nheads, dim, dstate), got shape {state}")
    four_d = len(state) == 4
    x = tuple(shapes["x"])
    if len(x) != len(state) - 1:
        _fail("x", f"has shape {x}; with a {len(state)}-D state it must be {len(state) - 1}-D")
    num_tokens = x[0]
    _expect("x", x, (num_tokens, nheads, dim) if four_d else (num_tokens, dim))

    B = tuple(shapes["B"])
    if four_d:
        if len(B) != 3:
            _fail("B", f"has shape {B}, expected (batch, ngroups, dstate)")
        ngroups = B[1]
    else:
        ngroups = 1
    _expect("B", B, (num_tokens, ngroups, dstate) if four_d else (num_tokens, dstate))
    if ngroups < 1 or nheads % ngroups:
        _fail("B", f"has ngroups={ngroups}, which must divide nheads={nheads}")
    _expect("C", shapes["C"], tuple(B))

    full = {
        "dt": (num_tokens, nheads, dim) if four_d else (num_tokens, dim),
        "A": (nheads, dim, dstate) if four_d else (dim, dstate),
        "dt_bias": (nheads, dim) if four_d else (dim,),
        "D": (nheads, dim) if four_d else (dim,),
    }
    per_head = {"dt": (num_tokens, nheads), "A": (nheads,), "dt_bias": (nheads,), "D": (nheads,)}
    given_per_head = {}
    for arg in ("dt", "A", "dt_bias", "D"):
        shape = shapes.get(arg)
        if shape is None:
            if arg in ("dt", "A"):
                _fail(arg, "is required")
            continue
        allowed = (full[arg], per_head[arg]) if four_d else (full[arg],)
        _expect(arg, shape, *allowed)
        given_per_head[arg] = four_d and tuple(shape) == per_head[arg] and full[arg] != per_head[arg]
    per_head_params = given_per_head["dt"] and given_per_head["A"] and given_per_head.get("dt_bias", True)
    for arg in ("z", "out"):
        if shapes.get(arg) is not None:
            _expect(arg, shapes[arg], x)

    cu_seqlens = shapes.get("cu_seqlens")
    if cu_seqlens is not None:
        if len(cu_seqlens) != 1 or cu_seqlens[0] < 1:
            _fail("cu_seqlens", f"must be 1-D of length num_seqs + 1, got shape {tuple(cu_seqlens)}")
        num_seqs = cu_seqlens[0] - 1
    else:
        num_seqs = num_tokens

    index_columns = 1
    for arg in ("state_batch_indices", "dst_state_batch_indices"):
        shape = shapes.get(arg)
        if shape is None:
            continue
        if len(shape) not in (1, 2) or shape[0] < num_seqs or (len(shape) == 2 and shape[1] < 1):
            _fail(arg, f"has shape {tuple(shape)}, expected ({num_seqs},) or ({num_seqs}, max_seqlen)")
        if len(shape) == 2:
            index_columns = max(index_columns, shape[1])
    src, dst = shapes.get("state_batch_indices"), shapes.get("dst_state_batch_indices")
    if dst is not None and src is None:
        _fail("dst_state_batch_indices", "needs state_batch_indices")
    if src is not None and dst is not None and len(src) == 2 and len(dst) == 2 and src[1] != dst[1]:
        _fail("dst_state_batch_indices", f"has {dst[1]} columns but state_batch_indices has {src[1]}")
    num_accepted = shapes.get("num_accepted_tokens")
    if num_accepted is not None:
        if src is None or len(src) != 2:
            _fail("num_accepted_tokens", "needs a 2-D state_batch_indices (num_seqs, max_seqlen)")
        _expect("num_accepted_tokens", num_accepted, (num_seqs,))

    for arg in ("state", "x", "dt", "A", "B", "C", "D", "dt_bias", "z", "out"):
        dtype = dtypes.get(arg)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            _fail(arg, f"has dtype {dtype}; supported: {', '.join(FLOAT_DTYPES)}")
    for arg in ("state_batch_indices", "dst_state_batch_indices", "num_accepted_tokens", "cu_seqlens"):
        dtype = dtypes.get(arg)
        if dtype is not None and dtype not in INDEX_DTYPES:
            _fail(arg, f"has dtype {dtype}; supported: {', '.join(INDEX_DTYPES)}")
    if enable_stochastic_rounding and dtypes["state"] != "float16":
        _fail("enable_stochastic_rounding", f"needs a float16 state, got {dtypes['state']}")
    if cache_philox_rounds < 0:
        _fail("cache_philox_rounds", f"must be >= 0, got {cache_philox_rounds}")

    return SsuLayout(
        state_ndim=len(state), num_slots=num_slots, nheads=nheads, dim=dim, dstate=dstate,
        ngroups=ngroups, num_tokens=num_tokens, num_seqs=num_seqs,
        index_columns=index_columns, per_head_params=bool(per_head_params))


def check_ssu_index_values(layout: SsuLayout, *, null_block_id: int,
                           state_batch_indices=None, dst_state_batch_indices=None,
                           num_accepted_tokens=None, cu_seqlens=None) -> None:
    """Value checks on host copies (numpy arrays) of the index arguments.

    Kernels also guard against bad indices (no out-of-range access; the
    affected outputs are written as NaN), but only this check can raise.
    """
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
        accepted = np.asarray(num_accepted_tokens)
        if ((accepted < 0) | (accepted > layout.index_columns)).any():
            _fail("num_accepted_tokens", f"must lie in [0, {layout.index_columns}], got {accepted.tolist()[:8]}")
        if (seqlens > layout.index_columns).any():
            _fail("cu_seqlens", f"gives a sequence of {seqlens.max()} tokens, more than the "
                                f"{layout.index_columns} state slots per sequence in dst_state_batch_indices")


def philox_rounds(cache_philox_rounds: int) -> int:
    """0 selects the default number of rounds."""
    return cache_philox_rounds or DEFAULT_PHILOX_ROUNDS
