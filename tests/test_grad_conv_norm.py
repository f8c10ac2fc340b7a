"""Gradients of the training forms of the causal conv1d (``causal_conv1d_fn``:
x, weight, bias, initial states; from ``out`` and the new states) and of the
gated RMSNorm (x, weight, z; gate before or after the norm, groups), in each
framework, against float64 autodiff of float64 references written here from
the contracts' math (torch autograd; ``jax.grad`` under x64); a
finite-difference spot check of the kernels; Triton vs Pallas gradients on
the same inputs; chained prefill calls differentiate like one; the refusals:
decode-only ops and in-place writes under differentiation."""

import types

import numpy as np
import pytest

from frameworks import JaxSide, TorchSide, assert_close

PAD = 0  # the null block (pad_slot_id's default)


# --- the framework-specific pieces: array ops and reverse mode ----------------------

def _ops(side):
    """cat / stack / sigmoid / zeros / sqrt of the side's array module."""
    if side.name == "torch":
        torch = side.torch
        return types.SimpleNamespace(cat=lambda a, axis: torch.cat(a, axis), stack=torch.stack,
                                     sigmoid=torch.sigmoid, rsqrt=torch.rsqrt,
                                     zeros=lambda shape, like: like.new_zeros(shape))
    jnp = side.jnp
    return types.SimpleNamespace(cat=lambda a, axis: jnp.concatenate(a, axis), stack=jnp.stack,
                                 sigmoid=side.jax.nn.sigmoid, rsqrt=side.jax.lax.rsqrt,
                                 zeros=lambda shape, like: jnp.zeros(shape, like.dtype))


def _vjp(side, function, primals: dict, cotangents, dtype: str, *, x_transposed=False):
    """Gradients (float64 numpy, by name) of ``sum(outputs * cotangents)`` for
    ``function(**primals)`` (a tuple of outputs) at numpy ``primals`` cast to
    ``dtype`` (``x`` handed over as a transposed token-major buffer when
    ``x_transposed``). float64 under JAX runs in x64 mode."""
    if side.name == "torch":
        torch = side.torch
        leaves = {}
        for name, value in primals.items():
            value = value.T if (x_transposed and name == "x") else value
            leaves[name] = side.array(value, dtype).requires_grad_()
        args = {k: (v.T if (x_transposed and k == "x") else v) for k, v in leaves.items()}
        outputs = function(**args)
        loss = sum((o * side.array(c, dtype).to(o.dtype)).sum() for o, c in zip(outputs, cotangents))
        loss.backward()
        return ({k: side.numpy(v.grad.T if (x_transposed and k == "x") else v.grad)
                 for k, v in leaves.items()}, [side.numpy(o) for o in outputs])
    jax, jnp = side.jax, side.jnp
    with jax.enable_x64(dtype == "float64"):
        names = list(primals)
        values = [jnp.asarray(primals[k], getattr(jnp, dtype)) for k in names]

        def call(*arrays):
            return tuple(function(**dict(zip(names, arrays))))

        outputs, pullback = jax.vjp(call, *values)
        grads = pullback(tuple(jnp.asarray(c, o.dtype) for o, c in zip(outputs, cotangents)))
        return ({k: side.numpy(g) for k, g in zip(names, grads)},
                [side.numpy(o) for o in outputs])


def _rounded(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` as the kernel sees them in ``dtype``, back in float64."""
    if dtype == "bfloat16":
        import ml_dtypes
        return values.astype(ml_dtypes.bfloat16).astype(np.float64)
    return values.astype(dtype).astype(np.float64)


# --- causal conv1d, the training form -----------------------------------------------

def _conv_ref(F, x, weight, bias, conv_states, *, qsl, cache_indices, has_initial_state, silu):
    """Differentiable (either framework) ``causal_conv1d_fn`` training form
    from the contract: x (D, T) -> (out (D, T), zero where no sequence writes;
    new states: each sequence's slot's columns < W - 1 the last W - 1 inputs
    of history ++ x, the other slots and columns unchanged)."""
    dim, num_tokens = x.shape
    width = weight.shape[1]
    pieces, covered, rewritten = [], 0, {}
    for seq in range(len(qsl) - 1):
        begin, end = int(qsl[seq]), int(qsl[seq + 1])
        slot = seq if cache_indices is None else int(cache_indices[seq])
        pieces.append(F.zeros((dim, begin - covered), x))
        covered = end
        if cache_indices is not None and slot == PAD:
            pieces.append(F.zeros((dim, end - begin), x))
            continue
        history = (conv_states[slot, :, :width - 1]
                   if has_initial_state is not None and has_initial_state[seq]
                   else F.zeros((dim, width - 1), x))
        window = F.cat([history, x[:, begin:end]], 1)
        value = sum(weight[:, k:k + 1] * window[:, k:k + end - begin] for k in range(width))
        value = value if bias is None else value + bias[:, None]
        pieces.append(value * F.sigmoid(value) if silu else value)
        if end > begin:
            rewritten[slot] = F.cat([window[:, -(width - 1):], conv_states[slot, :, width - 1:]], 1)
    pieces.append(F.zeros((dim, num_tokens - covered), x))
    new_states = F.stack([rewritten.get(s, conv_states[s]) for s in range(conv_states.shape[0])])
    return F.cat(pieces, 1), new_states


def _conv_case(rng, *, width=4, dim=24, seqlens=(3, 1, 0, 6, 2), state_len=None, bias=True):
    """Packed sequences (one empty), one padding sequence (slot PAD), every
    second with an initial state; slots permuted, one left untouched."""
    num_seqs = len(seqlens)
    qsl = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
    slots = rng.permutation(np.arange(1, num_seqs + 2))[:num_seqs].astype(np.int32)
    slots[1] = PAD
    primals = {"x": rng.standard_normal((int(qsl[-1]), dim)).T,
               "weight": rng.standard_normal((dim, width)) * 0.5,
               "conv_states": rng.standard_normal((num_seqs + 2, dim, state_len or width))}
    if bias:
        primals["bias"] = rng.standard_normal(dim) * 0.5
    index = dict(qsl=qsl, cache_indices=slots, has_initial_state=np.arange(num_seqs) % 2 == 0)
    return primals, index


def _conv_cotangents(rng, primals):
    return [rng.standard_normal(primals["x"].shape), rng.standard_normal(primals["conv_states"].shape)]


def _conv_kernel(side, index, silu):
    """The kernel's training form with ``index`` as native int32/bool arrays."""
    qsl = side.array(index["qsl"], "int32")
    indices = None if index["cache_indices"] is None else side.array(index["cache_indices"], "int32")
    has_init = (None if index["has_initial_state"] is None
                else side.array(index["has_initial_state"], "bool"))
    extra = {"return_states": True} if side.name == "torch" else {}

    def conv(x, weight, conv_states, bias=None):
        return side.impl.causal_conv1d_fn(x, weight, bias, conv_states, qsl, indices, has_init,
                                          activation="silu" if silu else None, **extra)
    return conv


def _conv_reference(side, index, silu):
    F = _ops(side)

    def conv(x, weight, conv_states, bias=None):
        return _conv_ref(F, x, weight, bias, conv_states, qsl=index["qsl"],
                         cache_indices=index["cache_indices"],
                         has_initial_state=index["has_initial_state"], silu=silu)
    return conv


CONV_CASES = [dict(dtype="float32", silu=True, width=4, bias=True, seqlens=(3, 1, 0, 6, 2)),
              # 2 programs per sequence in the backward (ConvTiles.splits), the long one's
              # tiles interleaved between them
              pytest.param(dict(dtype="float32", silu=True, width=4, bias=True, seqlens=(70, 2)),
                           marks=pytest.mark.slow),  # in CI: Triton vs Pallas below
              pytest.param(dict(dtype="float32", silu=False, width=2, bias=False,
                                seqlens=(3, 1, 0, 6, 2)), marks=pytest.mark.slow),
              pytest.param(dict(dtype="bfloat16", silu=True, width=3, bias=True,
                                seqlens=(3, 1, 0, 6, 2)), marks=pytest.mark.slow)]
# (slow: Pallas' interpreter traces each case)


@pytest.mark.parametrize("case", CONV_CASES, ids=["f32-silu-w4", "f32-long", "f32-w2-nobias", "bf16-silu-w3"])
def test_conv_grads_match_float64_autodiff(side, case, rng):
    primals, index = _conv_case(rng, width=case["width"], bias=case["bias"], seqlens=case["seqlens"])
    if len(case["seqlens"]) == 2:
        from bridge.spec.conv_contract import PREFILL_BLOCK_T, conv_token_splits
        assert conv_token_splits(sum(case["seqlens"]), 2, PREFILL_BLOCK_T) == 2
    cotangents = _conv_cotangents(rng, primals)
    dtype = case["dtype"]
    got, got_out = _vjp(side, _conv_kernel(side, index, case["silu"]), primals, cotangents, dtype,
                        x_transposed=True)
    rounded = {k: _rounded(v, dtype) for k, v in primals.items()}
    want, want_out = _vjp(side, _conv_reference(side, index, case["silu"]), rounded,
                          [_rounded(c, dtype) for c in cotangents], "float64", x_transposed=True)
    for name, what in zip(("out", "new states"), range(2)):
        assert_close(got_out[what], want_out[what], dtype, f"{side.name} conv {name}")
    for name in primals:
        assert_close(got[name], want[name], dtype, f"{side.name} conv d{name}")


# --- gated RMSNorm ------------------------------------------------------------------

def _norm_ref(F, x, z=None, weight=None, *, eps, group_size, norm_before_gate):
    """Differentiable (either framework) gated RMSNorm from the contract."""
    tokens, hidden = x.shape
    group_size = group_size or hidden
    xs = x.reshape(tokens, hidden // group_size, group_size)
    gate = None if z is None else z.reshape(xs.shape) * F.sigmoid(z.reshape(xs.shape))
    v = xs * gate if gate is not None and not norm_before_gate else xs
    y = v * F.rsqrt((v * v).mean(-1, keepdims=True) + eps) if hasattr(v, "at") else \
        v * F.rsqrt((v * v).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.reshape(hidden // group_size, group_size)
    if gate is not None and norm_before_gate:
        y = y * gate
    return (y.reshape(tokens, hidden),)


NORM_CASES = [dict(dtype="float32", group_size=None, norm_before_gate=False, gate=True, weight=True,
                   tokens=70),
              dict(dtype="float32", group_size=12, norm_before_gate=True, gate=True, weight=True),
              dict(dtype="bfloat16", group_size=16, norm_before_gate=False, gate=True, weight=True),
              dict(dtype="float32", group_size=24, norm_before_gate=False, gate=False, weight=False)]


def _norm_case(rng, case, tokens=None, hidden=48):
    """One case with 70 tokens: two blocks of the backward's dweight partials."""
    tokens = tokens or case.get("tokens", 6)
    primals = {"x": rng.standard_normal((tokens, hidden)) * 2}
    if case["gate"]:
        primals["z"] = rng.standard_normal((tokens, hidden))
    if case["weight"]:
        primals["weight"] = 1 + 0.3 * rng.standard_normal(hidden)
    options = dict(eps=1e-5, group_size=case["group_size"], norm_before_gate=case["norm_before_gate"])
    return primals, options, [rng.standard_normal((tokens, hidden))]


def _norm_kernel(side, options):
    def norm(x, z=None, weight=None):
        return (side.impl.rms_norm_gated(x, weight, z, **options),)
    return norm


def _norm_reference(side, options):
    F = _ops(side)

    def norm(x, z=None, weight=None):
        return _norm_ref(F, x, z, weight, **options)
    return norm


@pytest.mark.parametrize("case", NORM_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_norm_grads_match_float64_autodiff(side, case, rng):
    primals, options, cotangents = _norm_case(rng, case)
    dtype = case["dtype"]
    got, got_out = _vjp(side, _norm_kernel(side, options), primals, cotangents, dtype)
    want, want_out = _vjp(side, _norm_reference(side, options),
                          {k: _rounded(v, dtype) for k, v in primals.items()},
                          [_rounded(c, dtype) for c in cotangents], "float64")
    assert_close(got_out[0], want_out[0], dtype, f"{side.name} norm out")
    for name in primals:
        assert_close(got[name], want[name], dtype, f"{side.name} norm d{name}")


# --- finite differences, Triton vs Pallas, chained calls ----------------------------------

def _directional(side, function, primals, cotangents, direction, *, x_transposed, h=1e-2):
    """Central difference of sum(outputs * cotangents) along ``direction``
    (float32 kernels, float64 sums)."""
    def loss(step):
        moved = {k: v + step * direction[k] for k, v in primals.items()}
        _, outputs = _vjp(side, function, moved, cotangents, "float32", x_transposed=x_transposed)
        return sum(float((o * c).sum()) for o, c in zip(outputs, cotangents))
    return (loss(h) - loss(-h)) / (2 * h)


@pytest.mark.parametrize("op", [pytest.param("conv", marks=pytest.mark.slow), "norm"])
def test_finite_difference_spot_check(side, op, rng):
    if op == "conv":
        primals, index = _conv_case(rng, width=3, dim=8, seqlens=(3, 1, 4))
        cotangents, function = _conv_cotangents(rng, primals), _conv_kernel(side, index, True)
    else:
        primals, options, cotangents = _norm_case(rng, NORM_CASES[1], tokens=6, hidden=24)
        function = _norm_kernel(side, options)
    transposed = op == "conv"
    grads, _ = _vjp(side, function, primals, cotangents, "float32", x_transposed=transposed)
    direction = {k: rng.standard_normal(v.shape) for k, v in primals.items()}
    want = sum(float((grads[k] * direction[k]).sum()) for k in primals)
    got = _directional(side, function, primals, cotangents, direction, x_transposed=transposed)
    assert abs(got - want) <= 2e-3 * max(1.0, abs(want)), (got, want)


@pytest.mark.parametrize("op", [pytest.param("conv", marks=pytest.mark.slow), "norm"])
def test_triton_matches_pallas_gradients(op, rng):
    torch_side, jax_side = TorchSide(), JaxSide()
    if op == "conv":
        primals, index = _conv_case(rng, width=4, dim=16, seqlens=(70, 2))  # 2 splits
        cotangents = _conv_cotangents(rng, primals)
        kernels = [_conv_kernel(s, index, True) for s in (torch_side, jax_side)]
    else:
        primals, options, cotangents = _norm_case(rng, NORM_CASES[1], tokens=9, hidden=24)
        kernels = [_norm_kernel(s, options) for s in (torch_side, jax_side)]
    (t_grads, t_out), (j_grads, j_out) = [
        _vjp(s, k, primals, cotangents, "float32", x_transposed=op == "conv")
        for s, k in zip((torch_side, jax_side), kernels)]
    for got, want in zip(t_out, j_out):
        assert_close(got, want, "float32", f"{op} Triton vs Pallas output")
    for name in primals:
        assert_close(t_grads[name], j_grads[name], "float32", f"{op} Triton vs Pallas d{name}")


@pytest.mark.slow
def test_conv_chained_prefill_grads_match_one_call(side, rng):
    """Two calls chained through the returned states (the second reads them
    as initial states) differentiate like one call over the whole sequences."""
    split, width, dim = 3, 4, 8
    seqlens = (5, 7)
    primals, _ = _conv_case(rng, width=width, dim=dim, seqlens=seqlens)
    whole = {"qsl": np.array([0, 5, 12], np.int32), "cache_indices": None, "has_initial_state": None}
    first = {"qsl": np.array([0, split, 2 * split], np.int32), "cache_indices": None,
             "has_initial_state": None}
    second = {"qsl": np.array([0, 5 - split, 12 - 2 * split], np.int32), "cache_indices": None,
              "has_initial_state": np.array([True, True])}
    one, two, three = (_conv_kernel(side, i, True) for i in (whole, first, second))
    xs = [np.arange(0, split), np.arange(split, 5), np.arange(5, 5 + split), np.arange(5 + split, 12)]
    head, tail = np.concatenate([xs[0], xs[2]]), np.concatenate([xs[1], xs[3]])
    cot = rng.standard_normal((dim, 12))

    def whole_call(x, weight, bias):
        return one(x, weight, _zeros_states(side, x, 2, dim, width - 1), bias)[:1]

    def chained(x, weight, bias):
        out1, states = two(x[:, head], weight, _zeros_states(side, x, 2, dim, width - 1), bias)
        out2, _ = three(x[:, tail], weight, states, bias)
        out = _ops(side).cat([out1, out2], 1)
        return (out[:, np.argsort(np.concatenate([head, tail]))],)

    args = {k: primals[k] for k in ("x", "weight", "bias")}
    got, got_out = _vjp(side, chained, args, [cot], "float32", x_transposed=True)
    want, want_out = _vjp(side, whole_call, args, [cot], "float32", x_transposed=True)
    assert_close(got_out[0], want_out[0], "float32", "chained out")
    for name in args:
        assert_close(got[name], want[name], "float32", f"chained d{name}")


def _zeros_states(side, like, num_seqs, dim, state_len):
    zeros = np.zeros((num_seqs, dim, state_len))
    return side.array(zeros, "float32") if side.name == "jax" else \
        side.torch.zeros((num_seqs, dim, state_len), dtype=like.dtype, device=like.device)


# --- refusals -----------------------------------------------------------------------

def _update_args(side, rng, dim=8, width=4):
    return dict(x=side.array(rng.standard_normal((2, dim)), "float32"),
                conv_state=side.array(rng.standard_normal((3, dim, width - 1)), "float32"),
                weight=side.array(rng.standard_normal((dim, width)), "float32"),
                conv_state_indices=side.array(np.array([2, 1], np.int32), "int32"))


def test_torch_decode_conv_refuses_grad(rng):
    side = TorchSide()
    torch = side.torch
    args = _update_args(side, rng)
    before = args["conv_state"].clone()
    for name in ("x", "weight"):
        leaf = args[name].clone().requires_grad_()
        with pytest.raises(RuntimeError, match="causal_conv1d_update is an inference-only"):
            side.impl.causal_conv1d_update(**dict(args, **{name: leaf}), activation="silu")
        assert torch.equal(args["conv_state"], before), "refused call wrote the state"
    with torch.no_grad():  # the serving path is unchanged
        side.impl.causal_conv1d_update(**dict(args, x=args["x"].requires_grad_()))
    assert not torch.equal(args["conv_state"], before)


def test_torch_in_place_conv_with_grad(rng):
    """Refused: an in-place state write of a state that requires grad, a
    given ``out``, prefix caching. Allowed: inputs requiring grad with a plain
    state cache, written after the functional op (same values and gradients)."""
    side = TorchSide()
    torch = side.torch
    primals, index = _conv_case(rng, width=4, dim=8, seqlens=(2, 1, 3))
    call = dict(query_start_loc=side.array(index["qsl"], "int32"),
                cache_indices=side.array(index["cache_indices"], "int32"),
                has_initial_state=side.array(index["has_initial_state"], "bool"))
    x = side.array(np.ascontiguousarray(primals["x"].T), "float32").T.requires_grad_()
    weight = side.array(primals["weight"], "float32").requires_grad_()
    states = side.array(primals["conv_states"], "float32")
    leaf_states = states.clone().requires_grad_()
    with pytest.raises(ValueError, match="`conv_states` requires grad.*return_states=True"):
        side.impl.causal_conv1d_fn(x, weight, None, leaf_states, **call)
    with pytest.raises(ValueError, match="`out` is written in place"):
        side.impl.causal_conv1d_fn(x, weight, None, states.clone(), **call, out=torch.empty_like(x))
    with pytest.raises(ValueError, match="`block_idx_first_scheduled_token`"):
        side.impl.causal_conv1d_fn(
            x, weight, None, states.clone(), call["query_start_loc"],
            call["cache_indices"].reshape(-1, 1), call["has_initial_state"],
            block_idx_first_scheduled_token=call["cache_indices"] * 0,
            block_idx_last_scheduled_token=call["cache_indices"] * 0,
            initial_state_idx=call["cache_indices"] * 0,
            num_computed_tokens=call["cache_indices"] * 0, block_size_to_align=4)
    assert leaf_states.grad is None and torch.equal(leaf_states.detach(), states)
    cache = states.clone()
    out = side.impl.causal_conv1d_fn(x, weight, None, cache, **call)
    out_f, new_f = side.impl.causal_conv1d_fn(x, weight, None, states, **call, return_states=True)
    assert_close(out, out_f, "float32", "in-place out")
    assert_close(cache, new_f, "float32", "in-place states")
    cot = torch.randn_like(out)
    grads = torch.autograd.grad((out * cot).sum(), (x, weight))
    grads_f = torch.autograd.grad((out_f * cot).sum(), (x, weight))
    for got, want, name in zip(grads, grads_f, ("dx", "dweight")):
        assert_close(got, want, "float32", f"in-place {name}")


def test_torch_norm_refuses_out_with_grad(rng):
    side = TorchSide()
    x = side.array(rng.standard_normal((3, 16)), "float32").requires_grad_()
    out = side.torch.full((3, 16), float("nan"), device=side.device)
    with pytest.raises(ValueError, match="rms_norm_gated: `out` is written in place"):
        side.impl.rms_norm_gated(x, None, out=out)
    assert side.torch.isnan(out).all()
    with side.torch.no_grad():
        assert side.impl.rms_norm_gated(x, None, out=out) is out


def test_jax_refusals_name_the_op(rng):
    side = JaxSide()
    jax, jnp = side.jax, side.jnp
    args = _update_args(side, rng)

    def decode(x):
        return side.impl.causal_conv1d_update(**dict(args, x=x))[0].sum()

    with pytest.raises(ValueError, match="causal_conv1d_update is an inference-only"):
        jax.grad(decode)(args["x"])
    primals, index = _conv_case(rng, width=4, dim=8, seqlens=(2, 3))
    x = jnp.asarray(primals["x"], jnp.float32)
    fn_args = dict(weight=jnp.asarray(primals["weight"], jnp.float32),
                   conv_states=jnp.asarray(primals["conv_states"], jnp.float32),
                   query_start_loc=jnp.asarray(index["qsl"]),
                   cache_indices=jnp.asarray(index["cache_indices"]))
    with pytest.raises(ValueError, match="causal_conv1d_fn: `out` is written in place"):
        jax.grad(lambda x: side.impl.causal_conv1d_fn(x, **fn_args, out=jnp.zeros_like(x))[0].sum())(x)
    with pytest.raises(ValueError, match="rms_norm_gated: `out` is written in place"):
        jax.grad(lambda x: side.impl.rms_norm_gated(x, None, out=jnp.zeros_like(x)).sum())(x.T)


@pytest.mark.parametrize("op", [pytest.param("conv", marks=pytest.mark.slow), "norm"])
def test_torch_training_ops_opcheck(op, rng):
    """The functional ops' schema, fake kernels and autograd registration
    (torch.library.opcheck: eager, FakeTensor, AOT dispatch with the backward)."""
    side = TorchSide()
    torch = side.torch
    leaf = lambda shape: side.array(rng.standard_normal(shape), "float32").requires_grad_()  # noqa: E731
    if op == "conv":
        x = side.array(rng.standard_normal((7, 8)), "float32").T.requires_grad_()
        args = (x, leaf((8, 4)), leaf(8), leaf((3, 8, 4)), side.array(np.array([0, 3, 7]), "int32"),
                side.array(np.array([2, 1]), "int32"), side.array(np.array([True, False]), "bool"),
                True, 0)
        target = torch.ops.mamba_twin.causal_conv1d_fn_functional.default
    else:
        args = (leaf((5, 16)), leaf(16), leaf((5, 16)), 1e-5, 8, True)
        target = torch.ops.mamba_twin.rms_norm_gated_functional.default
    torch.library.opcheck(target, args)


@pytest.mark.slow
def test_jax_grads_under_jit_and_x64(rng):
    """int64 metadata in x64 mode, under jit: the same gradients."""
    side = JaxSide()
    jax, jnp = side.jax, side.jnp
    primals, index = _conv_case(rng, width=4, dim=8, seqlens=(3, 4))

    def grads(index_dtype):
        qsl = jnp.asarray(index["qsl"], index_dtype)
        slots = jnp.asarray(index["cache_indices"], index_dtype)
        has_init = jnp.asarray(index["has_initial_state"])

        def loss(x, weight, states):
            out, new = side.impl.causal_conv1d_fn(x, weight, None, states, qsl, slots, has_init)
            return (out * out).sum() + (new * new).sum()
        args = [jnp.asarray(primals[k], jnp.float32) for k in ("x", "weight", "conv_states")]
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)

    want = grads(jnp.int32)
    with jax.enable_x64(True):
        got = grads(jnp.int64)
    for g, w in zip(got, want):
        assert g.dtype == jnp.float32
        assert_close(g, w, "float32", "x64 gradients")


def _ssu_args(side, rng, batch=2, dim=4, dstate=16, slots=3):
    arrays = dict(state=rng.standard_normal((slots, dim, dstate)), x=rng.standard_normal((batch, dim)),
                  dt=rng.standard_normal((batch, dim)), A=-np.abs(rng.standard_normal((dim, dstate))),
                  B=rng.standard_normal((batch, dstate)), C=rng.standard_normal((batch, dstate)))
    args = {k: side.array(v, "float32") for k, v in arrays.items()}
    args["state_batch_indices"] = side.array(np.array([2, 1], np.int32), "int32")
    return args


def test_state_update_refuses_grad(side, rng):
    """selective_state_update is inference-only: torch refuses inputs that
    require grad in grad mode (the state left as it was), JAX names the op
    under jax.grad; the plain calls still run."""
    args = _ssu_args(side, rng)
    if side.name == "torch":
        torch = side.torch
        before = args["state"].clone()
        for name in ("x", "A"):
            leaf = args[name].clone().requires_grad_()
            with pytest.raises(RuntimeError, match="selective_state_update is an inference-only"):
                side.impl.selective_state_update(**dict(args, **{name: leaf}))
            assert torch.equal(args["state"], before), "refused call wrote the state"
        with torch.no_grad():
            side.impl.selective_state_update(**dict(args, x=args["x"].requires_grad_()))
        assert not torch.equal(args["state"], before)
        return
    jax = side.jax

    def loss(x):
        return side.impl.selective_state_update(**dict(args, x=x))[0].sum()

    with pytest.raises(ValueError, match="selective_state_update is an inference-only"):
        jax.grad(loss)(args["x"])
    assert np.isfinite(float(loss(args["x"])))


@pytest.mark.slow  # dynamo + AOT tracing: ~20 s on CPU
def test_torch_training_step_compiles_fullgraph(rng):
    """conv (zero history, new states returned) -> gated norm, forward and
    backward under torch.compile(fullgraph=True) (inductor on CUDA, aot_eager
    on CPU, where the ops stay opaque and Triton's interpreter runs them):
    no graph break, the eager gradients."""
    side = TorchSide()
    torch = side.torch
    dim, width, tokens = 16, 4, 9
    qsl = side.array(np.array([0, 4, tokens]), "int32")

    def step(x, weight, bias, norm_weight, z):
        conv, states = side.impl.causal_conv1d_fn(x.T, weight, bias, None, qsl, return_states=True)
        normed = side.impl.rms_norm_gated(conv.T.contiguous(), norm_weight, z, group_size=8)
        return (normed * normed).sum() + states.sum()

    def leaves():
        values = [rng.standard_normal((tokens, dim)), rng.standard_normal((dim, width)),
                  rng.standard_normal(dim), rng.standard_normal(dim), rng.standard_normal((tokens, dim))]
        return [side.array(v, "float32").requires_grad_() for v in values]

    eager = leaves()
    compiled_leaves = [t.detach().clone().requires_grad_() for t in eager]
    torch._dynamo.reset()
    backend = "inductor" if torch.cuda.is_available() else "aot_eager"
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    want, got = step(*eager), compiled(*compiled_leaves)
    want.backward()
    got.backward()
    assert_close(got, want, "float32", "compiled loss")
    for a, b in zip(compiled_leaves, eager):
        assert_close(a.grad, b.grad, "float32", "compiled gradients")


def test_torch_conv_backward_op_without_state_cotangent(rng):
    """The backward op with no d(new states) (HAS_DNEW off) equals it with zeros."""
    side = TorchSide()
    torch = side.torch
    primals, index = _conv_case(rng, width=4, dim=8, seqlens=(3, 2, 4))
    x = side.array(np.ascontiguousarray(primals["x"].T), "float32").T
    weight, bias, states = (side.array(primals[k], "float32") for k in ("weight", "bias", "conv_states"))
    meta = [side.array(index["qsl"], "int32"), side.array(index["cache_indices"], "int32"),
            side.array(index["has_initial_state"], "bool")]
    dout = side.array(rng.standard_normal(primals["x"].shape), "float32")
    results = []
    for dnew in (None, torch.zeros_like(states)):
        grads = [torch.zeros_like(x), x.new_zeros((3, 4, 8)), x.new_zeros((3, 8)), torch.zeros_like(states)]
        torch.ops.mamba_twin.causal_conv1d_fn_backward(x, weight, bias, states, *meta, dout, dnew, *grads,
                                                       True, PAD)
        results.append(grads)
    for got, want in zip(*results):
        assert torch.equal(got, want)
    assert results[0][0].abs().sum() > 0
