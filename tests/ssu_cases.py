"""Framework-neutral test cases for ``selective_state_update``: each case is
a set of options, turned into fresh random numpy inputs per test run."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

@dataclasses.dataclass(frozen=True)
class SsuCase:
    four_d: bool = True
    batch: int = 3           # sequences
    nheads: int = 4
    dim: int = 16
    dstate: int = 16
    ngroups: int = 2
    per_head: bool = True    # tied dt / A / dt_bias (Mamba-2 layout)
    has_z: bool = True
    has_D: bool = True
    D_per_head: bool = False  # D (H,) as the Mamba-2 mixer passes it, else (H, P)
    has_dt_bias: bool = True
    softplus: bool = True
    indices: str = "padding"  # none | plain | padding | dst
    spec: bool = False       # speculative decoding: cu_seqlens + num_accepted_tokens
    spec_len: int = 3        # max tokens per sequence when spec
    state_dtype: str = "float32"
    input_dtype: str = "float32"
    null_block_id: int = 0

    def __str__(self):
        fields = dataclasses.asdict(self)
        default = dataclasses.asdict(SsuCase())
        return ",".join(f"{k}={v}" for k, v in fields.items() if v != default[k]) or "default"


CASES = [
    SsuCase(),
    SsuCase(four_d=False, ngroups=1, per_head=False),
    SsuCase(four_d=False, ngroups=1, per_head=False, indices="none", has_z=False),
    SsuCase(ngroups=1), SsuCase(ngroups=4), SsuCase(nheads=6, ngroups=3),
    SsuCase(per_head=False), SsuCase(per_head=False, ngroups=4, has_dt_bias=False),
    SsuCase(has_z=False), SsuCase(has_D=False), SsuCase(has_dt_bias=False), SsuCase(softplus=False),
    SsuCase(has_z=False, has_D=False, has_dt_bias=False, softplus=False, indices="none"),
    SsuCase(indices="none"), SsuCase(indices="plain"), SsuCase(indices="dst"),
    SsuCase(indices="padding", null_block_id=-1),
    SsuCase(dim=10), SsuCase(dim=24, per_head=False), SsuCase(dim=72, dstate=64),
    SsuCase(dstate=64), SsuCase(dstate=128, dim=8), SsuCase(dstate=12, per_head=False),
    SsuCase(spec=True), SsuCase(spec=True, indices="dst"), SsuCase(spec=True, indices="plain"),
    SsuCase(spec=True, per_head=False, ngroups=1, spec_len=4),
    SsuCase(spec=True, null_block_id=-1, has_z=False),
    SsuCase(state_dtype="float16"), SsuCase(state_dtype="bfloat16"),
    SsuCase(state_dtype="bfloat16", input_dtype="bfloat16"),
    SsuCase(state_dtype="float16", input_dtype="float16", indices="dst"),
    SsuCase(state_dtype="bfloat16", spec=True, indices="dst"),
    SsuCase(state_dtype="float16", four_d=False, ngroups=1, per_head=False),
    SsuCase(D_per_head=True, state_dtype="bfloat16", input_dtype="bfloat16"),
]

# A representative subset (3-D, no optional operands, full params, spec
# decoding with dst / padding, fp16 and bf16) for the CI runs of the slower
# cross-framework tests; the others are marked slow (run on the GPU).
CI_CASES = (0, 1, 12, 18, 24, 27, 31, 32)


def case_params():
    """CASES as pytest params, those outside CI_CASES marked slow."""
    return [pytest.param(case, marks=() if i in CI_CASES else pytest.mark.slow, id=str(case))
            for i, case in enumerate(CASES)]


def make_inputs(case: SsuCase, rng: np.random.Generator):
    """Returns (arrays, dtypes, options): numpy float64/int64 arrays by
    argument name, the dtype each should have, and the keyword options.
    Cache slots that a call should write are poisoned with NaN first, and so
    is ``out``, so an element the kernel fails to write fails the test."""
    H = case.nheads if case.four_d else 1
    P, N, G = case.dim, case.dstate, (case.ngroups if case.four_d else 1)
    Q = case.batch
    if case.spec:
        lengths = rng.integers(1, case.spec_len + 1, size=Q)
        cu_seqlens = np.concatenate([[0], np.cumsum(lengths)])
        columns = case.spec_len
    else:
        lengths, cu_seqlens, columns = np.ones(Q, int), None, 1
    T = int(lengths.sum())
    # Enough slots for disjoint source and destination rows; slot 0 is the
    # null block when null_block_id == 0, so real slots start at 1.
    num_slots = 2 * Q * columns + 2
    free = rng.permutation(np.arange(1, num_slots))

    def r(*shape, scale=1.0):
        return rng.standard_normal(shape) * scale

    head_shape = (T, H) if case.per_head else (T, H, P)
    arrays = {
        "state": r(num_slots, H, P, N),
        "x": r(T, H, P),
        "dt": r(*head_shape, scale=0.5),
        "A": -np.exp(r(*((H,) if case.per_head else (H, P, N)), scale=0.5)),
        "B": r(T, G, N),
        "C": r(T, G, N),
    }
    if case.has_D:
        arrays["D"] = r(H) if case.D_per_head else r(H, P)
    if case.has_dt_bias:
        arrays["dt_bias"] = r(*((H,) if case.per_head else (H, P)), scale=0.5)
    if case.has_z:
        arrays["z"] = r(T, H, P)
    if not case.softplus:
        # Without softplus the caller supplies positive step sizes.
        arrays["dt"] = np.abs(arrays["dt"]) + 0.05
        if case.has_dt_bias:
            arrays["dt_bias"] = np.abs(arrays["dt_bias"])

    if case.indices != "none":
        src = free[:Q * columns].reshape(Q, columns)
        if case.indices == "padding":
            padded = rng.choice(Q, size=max(1, Q // 3), replace=False)
            src[padded] = case.null_block_id
        arrays["state_batch_indices"] = src if case.spec else src[:, 0]
        if case.indices == "dst" or case.spec:
            dst = free[Q * columns:2 * Q * columns].reshape(Q, columns)
            dst[src[:, 0] == case.null_block_id] = case.null_block_id
            if case.indices == "dst":
                arrays["dst_state_batch_indices"] = dst if case.spec else dst[:, 0]
        written = arrays.get("dst_state_batch_indices", arrays["state_batch_indices"])
        written = np.asarray(written).ravel()
        read = np.asarray(arrays["state_batch_indices"]).ravel()
        fresh = np.setdiff1d(written[written != case.null_block_id], read)
        arrays["state"][fresh] = np.nan  # must be overwritten by the call
    if case.spec:
        arrays["cu_seqlens"] = cu_seqlens
        arrays["num_accepted_tokens"] = rng.integers(1, columns + 1, size=Q)
    arrays["out"] = np.full((T, H, P), np.nan)

    if not case.four_d:
        arrays = {k: _drop_head(k, v) for k, v in arrays.items()}
    dtypes = {k: (case.input_dtype if k in ("x", "dt", "B", "C", "z", "out") else "float32")
              for k in arrays}
    dtypes["state"] = case.state_dtype
    for k in ("state_batch_indices", "dst_state_batch_indices", "num_accepted_tokens", "cu_seqlens"):
        if k in arrays:
            dtypes[k] = "int32"
    options = {"dt_softplus": case.softplus, "null_block_id": case.null_block_id}
    return arrays, dtypes, options


def _drop_head(name, array):
    """4-D case arrays with one head -> the spec's 3-D form."""
    axis = {"state": 1, "x": 1, "dt": 1, "B": 1, "C": 1, "z": 1, "out": 1,
            "A": 0, "D": 0, "dt_bias": 0}.get(name)
    return array if axis is None else np.squeeze(array, axis)
