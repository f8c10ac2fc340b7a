"""``selective_scan_fn`` (Mamba-1 prefill) in both frameworks against a
float64 numpy reference written from the math of
``bridge.spec.selective_scan_contract``: varlen with padding, initial-state
mixes, groups, z / D / delta_bias / softplus, the batched form, prefix-caching
block writes, the decode continuation with the 3-D ``selective_state_update``,
Triton vs Pallas, refusals by name and guard regions on the unchecked path."""

from __future__ import annotations

import numpy as np
import pytest

from frameworks import TOLERANCE, as_float64, assert_close

NULL = 0  # null_block_id: slot 0 is the null block


def softplus(x):
    return np.where(x <= 20.0, np.log1p(np.exp(np.minimum(x, 20.0))), x)


def scan_ref(u, ssm_states, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
             query_start_loc=None, cache_indices=None, has_initial_state=None, block_size=1024,
             num_computed_tokens=None):
    """(out, new_states) in float64. ``out`` starts as the buffer the op
    writes (z, else delta). Prefix caching is given by ``num_computed_tokens``
    (the absolute position of each sequence's first scheduled token) and the
    block table ``cache_indices``."""
    f = lambda a: None if a is None else as_float64(a)  # noqa: E731
    u, states, delta, A, B, C, D, z, delta_bias = map(f, (u, ssm_states, delta, A, B, C, D, z, delta_bias))
    out = (z if z is not None else delta).copy()
    new = states.copy()
    varlen = query_start_loc is not None
    if varlen:
        qsl = np.asarray(query_start_loc)
        spans = [(q, 0, qsl[q], qsl[q + 1]) for q in range(len(qsl) - 1)]
        u, delta, out = u[None], delta[None], out[None]
        z = None if z is None else z[None]
        B, C = B[None], C[None]
    else:
        spans = [(q, q, 0, u.shape[-1]) for q in range(u.shape[0])]
    if B.ndim == 3:
        B, C = B[:, None], C[:, None]
    dim, ngroups = A.shape[0], B.shape[1]
    group = np.arange(dim) // (dim // ngroups)
    for q, b, start, end in spans:  # sequence q at index b of the (batch, ...) arrays
        if cache_indices is None:
            read = write = q
        elif num_computed_tokens is None:
            read = write = int(np.asarray(cache_indices)[q])
        else:
            row, computed = np.asarray(cache_indices)[q], int(num_computed_tokens[q])
            read = int(row[max(computed - 1, 0) // block_size])
            write = int(row[(computed + end - start - 1) // block_size])
        if cache_indices is not None and read == NULL:
            continue
        init = has_initial_state is not None and bool(np.asarray(has_initial_state)[q])
        h = states[read].copy() if init else np.zeros_like(states[0])
        for i, t in enumerate(range(start, end)):
            dt = delta[b, :, t] + (0 if delta_bias is None else delta_bias)
            if delta_softplus:
                dt = softplus(dt)
            Bt, Ct = B[b, group, :, t], C[b, group, :, t]
            h = np.exp(dt[:, None] * A) * h + (dt * u[b, :, t])[:, None] * Bt
            y = (h * Ct).sum(1) + (0 if D is None else D * u[b, :, t])
            if z is not None:
                y = y * z[b, :, t] / (1 + np.exp(-z[b, :, t]))
            out[b, :, t] = y
            if num_computed_tokens is not None:
                position = int(num_computed_tokens[q]) + i
                if (position + 1) % block_size == 0 and t + 1 < end:
                    slot = int(np.asarray(cache_indices)[q][position // block_size])
                    if slot != NULL:
                        new[slot] = h
        if end > start:
            new[write] = h
    return (out[0] if varlen else out), new


def random_inputs(rng, *, dim=6, dstate=5, ngroups=1, seqlens=(3, 0, 5, 2), slots=9,
                  batched=False, with_z=True, with_D=True, with_bias=True, grouped_bc=True):
    """numpy inputs of a call (float32 values) and the index arrays."""
    T = sum(seqlens)
    lead = (len(seqlens),) if batched else ()
    length = seqlens[0] if batched else T
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    bc_shape = lead + ((ngroups,) if grouped_bc else ()) + (dstate, length)
    inputs = dict(
        u=normal(*lead, dim, length), delta=(0.5 * normal(*lead, dim, length)),
        A=-np.exp(0.5 * normal(dim, dstate)), B=normal(*bc_shape), C=normal(*bc_shape),
        ssm_states=normal(slots, dim, dstate),
        D=normal(dim) if with_D else None, z=normal(*lead, dim, length) if with_z else None,
        delta_bias=0.3 * normal(dim) if with_bias else None)
    if not batched:
        inputs["query_start_loc"] = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
    return inputs


FLOAT_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "ssm_states")


def native(side, inputs, dtype="float32", state_dtype="float32"):
    out = {}
    for k, v in inputs.items():
        if v is None:
            out[k] = None
        elif k in FLOAT_ARGS:
            out[k] = side.array(v, state_dtype if k == "ssm_states" else dtype)
        elif v.dtype == bool:
            out[k] = side.array(v, "bool")
        else:
            out[k] = side.array(v, str(v.dtype))
    return out


def run(side, inputs, **options):
    """The op on copies: (out, new_states) as float64 numpy."""
    if side.name == "torch":
        from torch_impl.selective_scan import selective_scan_fn
        inputs = {k: (v.clone() if v is not None and k in FLOAT_ARGS else v) for k, v in inputs.items()}
        out = selective_scan_fn(**inputs, **options)
        assert out is (inputs["z"] if inputs.get("z") is not None else inputs["delta"])
        return side.numpy(out), side.numpy(inputs["ssm_states"])
    from jax_impl.selective_scan import selective_scan_fn
    return tuple(map(side.numpy, selective_scan_fn(**inputs, **options)))


@pytest.mark.parametrize("variant", ["full", "plain", "groups", "batched"])
def test_matches_float64(side, rng, variant):
    """Varlen with a padding entry and an empty sequence, initial-state mixes;
    z, D, delta_bias, softplus on ("full") and off ("plain"); 2 groups (with
    and without B's group axis); the batched (batch, dim, seqlen) form."""
    options = dict(delta_softplus=variant != "plain")
    kwargs = dict(with_z=variant != "plain", with_D=variant != "plain", with_bias=variant != "plain")
    if variant == "groups":
        kwargs.update(ngroups=2, dim=8)
    if variant == "batched":
        kwargs.update(batched=True, seqlens=(4, 4, 4))
    inputs = random_inputs(rng, **kwargs)
    Q = len(inputs["u"]) if variant == "batched" else len(inputs["query_start_loc"]) - 1
    slots = 1 + rng.permutation(inputs["ssm_states"].shape[0] - 1)[:Q]
    slots[1] = NULL  # a padding entry
    inputs["cache_indices"] = slots.astype(np.int32)
    inputs["has_initial_state"] = rng.random(Q) < 0.5
    inputs["has_initial_state"][0] = True
    want_out, want_states = scan_ref(**inputs, **options)
    got_out, got_states = run(side, native(side, inputs), **options)
    assert_close(got_out, want_out, "float32", "out")
    assert_close(got_states, want_states, "float32", "ssm_states")
    untouched = np.setdiff1d(np.arange(len(want_states)), slots[slots != NULL])
    np.testing.assert_array_equal(got_states[untouched], inputs["ssm_states"][untouched])
