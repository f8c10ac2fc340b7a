"""``selective_scan_fn`` (Mamba-1 prefill) in both frameworks against a
float64 numpy reference written from the math of
``bridge.spec.selective_scan_contract``: varlen with padding, initial-state
mixes, groups, z / D / delta_bias / softplus, the batched form, prefix-caching
block writes, the decode continuation with the 3-D ``selective_state_update``,
Triton vs Pallas, refusals by name and guard regions on the unchecked path."""

from __future__ import annotations

import functools

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


@pytest.mark.parametrize("variant", ["full", "plain", "groups", "batched", "even", "even-bf16"])
def test_matches_float64(side, rng, variant):
    """Varlen with a padding entry and an empty sequence, initial-state mixes;
    z, D, delta_bias, softplus on ("full") and off ("plain"); 2 groups (with
    and without B's group axis); the batched (batch, dim, seqlen) form; dim
    a multiple of the channel tile and dstate a power of two ("even": the
    unmasked tiles inside a sequence), also with bf16 inputs (the reference
    on the same rounded values; float32 states)."""
    options = dict(delta_softplus=variant != "plain")
    kwargs = dict(with_z=variant != "plain", with_D=variant != "plain", with_bias=variant != "plain")
    if variant == "groups":
        kwargs.update(ngroups=2, dim=8)
    if variant == "batched":
        kwargs.update(batched=True, seqlens=(4, 4, 4))
    if variant.startswith("even"):
        kwargs.update(dim=16, dstate=8, seqlens=(3, 0, 13, 6))
    inputs = random_inputs(rng, **kwargs)
    dtype = "bfloat16" if variant.endswith("bf16") else "float32"
    if dtype == "bfloat16":
        import ml_dtypes
        inputs.update({k: inputs[k].astype(ml_dtypes.bfloat16).astype(np.float32)
                       for k in FLOAT_ARGS if k != "ssm_states" and inputs.get(k) is not None})
    Q = len(inputs["u"]) if variant == "batched" else len(inputs["query_start_loc"]) - 1
    slots = 1 + rng.permutation(inputs["ssm_states"].shape[0] - 1)[:Q]
    slots[1] = NULL  # a padding entry
    inputs["cache_indices"] = slots.astype(np.int32)
    inputs["has_initial_state"] = rng.random(Q) < 0.5
    inputs["has_initial_state"][0] = True
    want_out, want_states = scan_ref(**inputs, **options)
    got_out, got_states = run(side, native(side, inputs, dtype=dtype), **options)
    assert_close(got_out, want_out, dtype, "out")
    assert_close(got_states, want_states, "float32", "ssm_states")
    untouched = np.setdiff1d(np.arange(len(want_states)), slots[slots != NULL])
    np.testing.assert_array_equal(got_states[untouched], inputs["ssm_states"][untouched])


def apc_case(rng, block_size=4, computed=(0, 6, 4, 9, 3), seqlens=(7, 9, 3, 2, 2), slots=28, columns=5,
             padding=(4,)):
    """Prefix-caching inputs: block tables, the scheduled-block columns and
    block-aligned chunks built as vLLM's builder does, from each sequence's
    ``computed`` tokens; sequences in ``padding`` are null entries."""
    inputs = random_inputs(rng, seqlens=seqlens, slots=slots)
    Q, bs = len(seqlens), block_size
    computed, seqlens = np.array(computed), np.array(seqlens)
    table = (1 + rng.permutation(slots - 1)[:Q * columns]).reshape(Q, columns).astype(np.int32)
    for q in padding:
        table[q] = NULL
    first, last = computed // bs, (computed + seqlens - 1) // bs
    chunks = []
    for c, n in zip(computed, seqlens):
        lens = [min(n, bs - c % bs)]
        while sum(lens) < n:
            lens.append(min(bs, n - sum(lens)))
        chunks.append(lens)
    inputs.update(
        cache_indices=table, has_initial_state=computed > 0,
        block_idx_first_scheduled_token=first.astype(np.int32),
        block_idx_last_scheduled_token=last.astype(np.int32),
        initial_state_idx=(np.maximum(computed - 1, 0) // bs).astype(np.int32),
        cu_chunk_seqlen=np.concatenate([[0], np.cumsum(np.concatenate(chunks))]).astype(np.int32),
        last_chunk_indices=(np.cumsum([len(c) for c in chunks]) - 1).astype(np.int32))
    return inputs, computed


APC_ONLY = ("block_idx_first_scheduled_token", "block_idx_last_scheduled_token", "initial_state_idx",
            "cu_chunk_seqlen", "last_chunk_indices")


def test_prefix_caching_block_writes(side, rng):
    """The state at every block boundary crossed goes to its block, the final
    state to the last scheduled block, the initial state comes from the block
    of the last computed token; every other slot bitwise unchanged."""
    check_block_writes(side, *apc_case(rng), block_size=4, boundaries=3, finals=4)


def check_block_writes(side, inputs, computed, *, block_size, boundaries, finals):
    """A prefix-caching call against float64: outputs, the states written
    (``boundaries`` block states and ``finals`` final states), every other
    slot bitwise unchanged."""
    options = dict(delta_softplus=True, block_size=block_size)
    ref_inputs = {k: v for k, v in inputs.items() if k not in APC_ONLY}
    want_out, want_states = scan_ref(**ref_inputs, **options, num_computed_tokens=computed)
    got_out, got_states = run(side, native(side, inputs), **options, validate_indices=True)
    assert_close(got_out, want_out, "float32", "out")
    assert_close(got_states, want_states, "float32", "ssm_states")
    written = np.flatnonzero((want_states != inputs["ssm_states"]).any(axis=(1, 2)))
    assert len(written) == boundaries + finals, "boundary and final states"
    untouched = np.setdiff1d(np.arange(len(want_states)), written)
    np.testing.assert_array_equal(got_states[untouched], inputs["ssm_states"][untouched])


def test_tiles_across_sequence_ends_and_blocks(side, rng):
    """The kernels walk tokens in aligned tiles: sequences starting and
    ending inside a tile, one shorter than a tile, tiles fully inside a
    sequence (the unmasked path), and prefix-caching block boundaries
    (block_size 6, not a multiple of the tile) inside tiles, at a tile's
    last token and between tiles."""
    case = apc_case(rng, block_size=6, computed=(0, 7, 5, 13), seqlens=(15, 13, 2, 9), slots=40, columns=6,
                    padding=())
    check_block_writes(side, *case, block_size=6, boundaries=6, finals=4)


def test_decode_continues_prefill(side, rng):
    """Prefill with selective_scan_fn, then two decode steps with the 3-D
    selective_state_update, equals one longer prefill."""
    prefill, decode = (3, 5), 2
    full = random_inputs(rng, seqlens=tuple(n + decode for n in prefill), with_z=True)
    Q = len(prefill)
    slots = np.array([3, 5], np.int32)
    full.update(cache_indices=slots, has_initial_state=np.array([True, False]))
    options = dict(delta_softplus=True)
    want_out, want_states = scan_ref(**full, **options)

    starts = full["query_start_loc"][:-1]
    keep = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, prefill)])
    part = dict(full, query_start_loc=np.concatenate([[0], np.cumsum(prefill)]).astype(np.int32))
    for k in ("u", "delta", "z", "B", "C"):
        part[k] = full[k][..., keep]
    out, states = run(side, native(side, part), **options)
    outs = [out]
    states = side.array(states, "float32")
    for step in range(decode):
        tokens = starts + np.array(prefill) + step
        args = native(side, dict(x=full["u"][:, tokens].T, dt=full["delta"][:, tokens].T,
                                 z=full["z"][:, tokens].T, B=full["B"][0][:, tokens].T,
                                 C=full["C"][0][:, tokens].T, A=full["A"], D=full["D"],
                                 dt_bias=full["delta_bias"], state_batch_indices=slots))
        args = {k: v for k, v in args.items()}
        y, states = side.decode_step(states, **args, dt_softplus=True)
        outs.append(side.numpy(y).T)
    got = np.zeros_like(want_out)
    got[:, keep] = outs[0]
    for step in range(decode):
        got[:, starts + np.array(prefill) + step] = outs[1 + step]
    assert_close(got, want_out, "float32", "out")
    assert_close(side.numpy(states), want_states, "float32", "ssm_states")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_matches_pallas(rng, dtype):
    """Both kernels on the same inputs (prefix caching, groups absent, z / D on)."""
    from frameworks import JaxSide, TorchSide
    inputs, _ = apc_case(rng)
    options = dict(delta_softplus=True, block_size=4)
    outs = [run(s, native(s, inputs, dtype=dtype), **options) for s in (TorchSide(), JaxSide())]
    for i, what in enumerate(("out", "ssm_states")):
        assert_close(outs[0][i], outs[1][i], "float32" if dtype == "float32" else dtype, what)


def _bad_calls(inputs):
    """(arguments changed, argument named in the error)."""
    apc, _ = inputs
    return [
        (dict(delta=apc["delta"][:, :-1]), "delta"),
        (dict(B=np.zeros((5,) + apc["B"].shape[1:], np.float32),
              C=np.zeros((5,) + apc["B"].shape[1:], np.float32)), "B"),
        (dict(block_idx_first_scheduled_token=None, cu_chunk_seqlen=None, last_chunk_indices=None,
              block_idx_last_scheduled_token=None, initial_state_idx=None), "cache_indices"),
        (dict(block_idx_last_scheduled_token=apc["block_idx_last_scheduled_token"] + 1),
         "block_idx_last_scheduled_token"),
        (dict(initial_state_idx=apc["initial_state_idx"] - 9), "initial_state_idx"),
        (dict(cache_indices=np.where(apc["cache_indices"] == apc["cache_indices"][0, 0], 99,
                                     apc["cache_indices"]).astype(np.int32)), "cache_indices"),
        (dict(cache_indices=np.where(apc["cache_indices"] == apc["cache_indices"][1, 2],
                                     apc["cache_indices"][0, 0], apc["cache_indices"]).astype(np.int32)),
         "cache_indices"),
        (dict(query_start_loc=apc["query_start_loc"] + 1), "query_start_loc"),
        (dict(cu_chunk_seqlen=apc["cu_chunk_seqlen"] * 2), "cu_chunk_seqlen"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_bad_inputs_refused_by_name(side, rng, case):
    apc = apc_case(rng)
    changes, arg = _bad_calls(apc)[case]
    inputs = native(side, dict(apc[0], **changes))
    with pytest.raises(ValueError, match=f"selective_scan_fn: `{arg}`"):
        run(side, inputs, delta_softplus=True, block_size=4, validate_indices=True)


def test_list_indices_refused_by_name(side, rng):
    inputs = native(side, random_inputs(rng))
    inputs["cache_indices"] = [1, 2, 3, 4]
    with pytest.raises(ValueError, match="`cache_indices` must be an array"):
        run(side, inputs)


def _malformed(rng, dim=6, dstate=5, seqlens=(2, 3, 2, 3, 2)):
    """Varlen case (8 slots) whose sequences break the contract in different
    ways: 0 a negative slot, 1 a slot past the cache, 2 valid, 3 padding,
    4 tokens past T (3 of them)."""
    inputs = random_inputs(rng, dim=dim, dstate=dstate, seqlens=seqlens, slots=8)
    query_start_loc = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
    query_start_loc[-1] += 3
    inputs.update(cache_indices=np.array([-1, 8, 2, NULL, 4], np.int32), query_start_loc=query_start_loc,
                  has_initial_state=np.ones(5, bool))
    return inputs


@pytest.mark.parametrize("shape", ["odd", "even"])
def test_unchecked_malformed_indices_touch_nothing_outside(side, rng, shape):
    """Unchecked path: bad sequences write no state and NaN outputs (inside
    [0, T)); the padding sequence's columns keep their values; every slot but
    the valid sequence's bitwise unchanged. torch: guard regions around the
    state and output buffers bitwise unchanged; JAX: under jit. "even": dim
    a multiple of the channel tile, dstate a power of two, and the valid
    sequence long enough for unmasked tiles."""
    dim, dstate, seqlens = (6, 5, (2, 3, 2, 3, 2)) if shape == "odd" else (16, 8, (2, 3, 9, 3, 2))
    inputs = _malformed(rng, dim, dstate, seqlens)
    T = inputs["u"].shape[1]
    qsl = inputs["query_start_loc"]
    valid = dict(inputs, cache_indices=np.array([1, 5, 2, NULL, 4], np.int32),
                 query_start_loc=np.concatenate([qsl[:-1], [T]]).astype(np.int32))
    want_out, ref_states = scan_ref(**valid, delta_softplus=True)
    want_out[:, 0:qsl[2]] = want_out[:, qsl[4]:T] = np.nan
    want_states = inputs["ssm_states"].astype(np.float64)
    want_states[2] = ref_states[2]
    args = native(side, inputs)
    if side.name == "torch":
        torch = side.torch
        sentinel = -12345.0
        guard_states = torch.full((12, dim, dstate), sentinel, device=side.device)
        guard_states[2:10] = args["ssm_states"]
        guard_z = torch.full((dim + 4, T + 8), sentinel, device=side.device)
        guard_z[2:dim + 2, 4:T + 4] = args["z"]
        args.update(ssm_states=guard_states[2:10], z=guard_z[2:dim + 2, 4:T + 4])
        from torch_impl.selective_scan import selective_scan_fn
        selective_scan_fn(**args, delta_softplus=True, validate_indices=False)
        got_out, got_states = side.numpy(args["z"]), side.numpy(args["ssm_states"])
        inner_z = (slice(2, dim + 2), slice(4, T + 4))
        for buffer, inner in ((guard_states, (slice(2, 10),)), (guard_z, inner_z)):
            outside = torch.ones(buffer.shape, dtype=torch.bool, device=side.device)
            outside[inner] = False
            assert (buffer[outside] == sentinel).all(), "a write outside the given tensors"
    else:
        import jax
        from jax_impl.selective_scan import selective_scan_fn
        got_out, got_states = map(side.numpy, jax.jit(
            functools.partial(selective_scan_fn, delta_softplus=True))(**args))
    assert_close(got_out, want_out, "float32", "out")
    untouched = [0, 1, 3, 4, 5, 6, 7]
    np.testing.assert_array_equal(got_states[untouched], want_states[untouched])
    assert_close(got_states[2], want_states[2], "float32", "the valid sequence's state")


# int32 under x64 (the case issue 17 reported) runs on the GPU; CI covers the path with int64.
@pytest.mark.parametrize("index_dtype", [pytest.param("int32", marks=pytest.mark.slow), "int64"])
def test_jax_x64_mode(rng, index_dtype):
    """With jax_enable_x64 on, int32 and int64 indices, eager and jitted."""
    import jax
    from frameworks import JaxSide
    from jax_impl.selective_scan import selective_scan_fn
    side = JaxSide()
    inputs, computed = apc_case(rng)
    options = dict(delta_softplus=True, block_size=4)
    ref_inputs = {k: v for k, v in inputs.items() if k not in APC_ONLY}
    want_out, want_states = scan_ref(**ref_inputs, **options, num_computed_tokens=computed)
    inputs = {k: (v.astype(index_dtype) if v is not None and v.dtype.kind == "i" else v)
              for k, v in inputs.items()}
    with jax.enable_x64(True):
        args = native(side, inputs)
        for fn in (selective_scan_fn, jax.jit(functools.partial(selective_scan_fn, **options))):
            got_out, got_states = map(side.numpy, fn(**args, **(options if fn is selective_scan_fn else {})))
            assert_close(got_out, want_out, "float32", "out")
            assert_close(got_states, want_states, "float32", "ssm_states")


def test_pallas_lowers_to_triton_without_cache_indices(monkeypatch):
    """The Pallas kernel lowered for the GPU (Triton IR, on any host: the
    interpreter does not see what the Triton lowering refuses) in the form
    no other test runs: batched, without cache_indices (sequence q in slot q),
    has_initial_state, z, D or delta_bias."""
    import jax
    import jax.numpy as jnp
    from jax_impl import platform
    from jax_impl.selective_scan import selective_scan_fn
    monkeypatch.setattr(platform, "INTERPRET", False)
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    args = dict(u=spec(2, 64, 12), delta=spec(2, 64, 12), A=spec(64, 4), B=spec(2, 4, 12), C=spec(2, 4, 12),
                ssm_states=spec(3, 64, 4))
    lowered = jax.jit(selective_scan_fn).trace(**args).lower(lowering_platforms=("cuda",))
    assert "triton" in lowered.as_text()


@pytest.mark.parametrize("optional", ["none", "all"])
def test_triton_compiles_for_sm90(optional):
    """The Triton kernel compiled for an sm_90 GPU on this host, with no
    optional operand (the form whose argument tuple held None: the
    interpreter ran it, compiled Triton refused it on the H200) and with all."""
    from sm90_compile import run_in_subprocess
    given = optional == "all"
    code = f"""
import numpy as np, torch
from sm90_compile import compile_launches
from test_selective_scan import random_inputs
from torch_impl.selective_scan import selective_scan_fn
inputs = random_inputs(np.random.default_rng(0), with_z={given}, with_D={given}, with_bias={given})
args = {{k: None if v is None else torch.from_numpy(v) for k, v in inputs.items()}}
print(compile_launches(lambda: selective_scan_fn(**args, delta_softplus=True)))
"""
    assert "_selective_scan_kernel" in run_in_subprocess(code)


def test_no_tokens_is_a_no_op(side, rng):
    inputs = random_inputs(rng, seqlens=(0, 0))
    inputs["cache_indices"] = np.array([1, 2], np.int32)
    got_out, got_states = run(side, native(side, inputs), delta_softplus=True)
    assert got_out.shape == inputs["z"].shape == (6, 0)
    np.testing.assert_array_equal(got_states, inputs["ssm_states"])


def test_per_head_state_layout(side, rng):
    """ssm_states (slots, nheads, dim // nheads, dstate) is the (slots, dim,
    dstate) cache seen per head."""
    inputs = random_inputs(rng, dim=8)
    inputs.update(cache_indices=np.array([1, 2, 3, 4], np.int32), has_initial_state=np.ones(4, bool))
    want_out, want_states = scan_ref(**inputs, delta_softplus=True)
    heads = dict(inputs, ssm_states=inputs["ssm_states"].reshape(9, 2, 4, 5))
    got_out, got_states = run(side, native(side, heads), delta_softplus=True)
    assert_close(got_out, want_out, "float32", "out")
    assert_close(got_states.reshape(want_states.shape), want_states, "float32", "ssm_states")


def test_torch_compile_fullgraph(rng):
    """The torch op under torch.compile(fullgraph=True) matches eager (GPU only)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch.compile of Triton kernels needs a GPU")
    from frameworks import TorchSide
    from torch_impl.selective_scan import selective_scan_fn
    side = TorchSide()
    inputs, _ = apc_case(rng)
    args = native(side, inputs)
    options = dict(delta_softplus=True, block_size=4)
    eager = run(side, args, **options)
    compiled = torch.compile(lambda **a: selective_scan_fn(**a, **options), fullgraph=True)
    args = {k: (v.clone() if v is not None and k in FLOAT_ARGS else v) for k, v in args.items()}
    out = compiled(**args)
    np.testing.assert_array_equal(side.numpy(out), eager[0])
    np.testing.assert_array_equal(side.numpy(args["ssm_states"]), eager[1])


def test_refuses_grad(side, rng):
    """selective_scan_fn is inference-only: torch refuses inputs that require
    grad in grad mode (states and output left as they were), JAX names the
    op under jax.grad; the plain calls still run."""
    inputs = native(side, random_inputs(rng))
    options = dict(delta_softplus=True)
    if side.name == "torch":
        torch = side.torch
        from torch_impl.selective_scan import selective_scan_fn
        states, z = inputs["ssm_states"].clone(), inputs["z"].clone()
        for name in ("u", "A"):
            leaf = inputs[name].clone().requires_grad_()
            with pytest.raises(RuntimeError, match="selective_scan_fn is an inference-only"):
                selective_scan_fn(**dict(inputs, **{name: leaf}), **options)
            assert torch.equal(inputs["ssm_states"], states) and torch.equal(inputs["z"], z), \
                "a refused call wrote its buffers"
        with torch.no_grad():
            selective_scan_fn(**dict(inputs, u=inputs["u"].clone().requires_grad_()), **options)
        assert not torch.equal(inputs["ssm_states"], states)
        return
    import jax
    from jax_impl.selective_scan import selective_scan_fn

    def loss(u):
        return selective_scan_fn(**dict(inputs, u=u), **options)[0].sum()

    with pytest.raises(ValueError, match="selective_scan_fn is an inference-only"):
        jax.grad(loss)(inputs["u"])
    assert np.isfinite(float(loss(inputs["u"])))
