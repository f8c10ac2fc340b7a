"""Gated RMSNorm in each framework vs the float64 reference (grouped or
not, gate before or after the norm, with and without weight and gate),
Triton vs Pallas on the same memory, bad input, no tokens, JAX x64 mode; the
residual form (``residual=``: the sum normalised and returned) likewise, its
outputs allocated or (torch) written over ``residual``, its refusal under
differentiation and its torch op's schema."""

import numpy as np
import pytest

from bridge.spec.checks import dtype_name
from frameworks import JaxSide, TorchSide, assert_close, numpy_reference

CASES = [dict(group_size=None, dtype="float32", norm_before_gate=False, gate=True, weight=True),
         dict(group_size=12, dtype="float32", norm_before_gate=True, gate=True, weight=True),
         dict(group_size=8, dtype="bfloat16", norm_before_gate=False, gate=True, weight=False),
         dict(group_size=24, dtype="float32", norm_before_gate=False, gate=False, weight=True)]


def _inputs(side, rng, case, tokens=5, hidden=48):
    arrays = {"x": rng.standard_normal((tokens, hidden)) * 3,
              "z": rng.standard_normal((tokens, hidden)) if case["gate"] else None,
              "weight": rng.standard_normal(hidden) if case["weight"] else None,
              "out": np.full((tokens, hidden), np.nan)}
    return {k: (side.array(v, case["dtype"]) if v is not None else None) for k, v in arrays.items()}


def _run(side, inputs, **options):
    result = side.impl.rms_norm_gated(**inputs, **options)
    if side.name == "torch":
        assert result is inputs["out"], "torch kernel must return the `out` it wrote"
    return side.numpy(result)


def _reference(inputs, **options):
    return numpy_reference("rms_norm_gated", {k: v for k, v in inputs.items()
                                              if k not in ("out", "residual_out")}, **options)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_matches_reference(side, case, rng):
    inputs = _inputs(side, rng, case)
    options = dict(eps=1e-5, group_size=case["group_size"], norm_before_gate=case["norm_before_gate"])
    want = _reference(inputs, **options)
    got = _run(side, inputs, **options)
    assert_close(got, want, case["dtype"], f"{side.name} rms_norm_gated")


@pytest.mark.filterwarnings("ignore::bridge.dlpack.BridgeCopyWarning")
def test_triton_matches_pallas(rng):
    import bridge
    torch_side, jax_side = TorchSide(), JaxSide()
    inputs = _inputs(torch_side, rng, CASES[1])
    shared = {k: bridge.to_jax(v, copy_ok=True) for k, v in inputs.items()}
    t = _run(torch_side, dict(inputs, out=inputs["out"].clone()), group_size=12)
    j = _run(jax_side, shared, group_size=12)
    assert_close(t, j, "float32", "Triton vs Pallas")


@pytest.mark.parametrize("case", CASES[:2], ids=["plain", "grouped-norm-first"])
def test_jax_columns_form_reads_the_gate_in_place(case, rng):
    """``rms_norm_gated_columns`` (the JAX mixer's form): the gate read from
    columns of a wider array equals ``rms_norm_gated`` on the slice
    (bitwise: the same kernel) and the float64 reference; refused under
    differentiation and for a ``z_source`` that does not hold the columns."""
    side = JaxSide()
    jax, jnp = side.jax, side.jnp
    from jax_impl.gated_rms_norm import rms_norm_gated_columns

    inputs = _inputs(side, rng, case)
    del inputs["out"]
    options = dict(eps=1e-5, group_size=case["group_size"], norm_before_gate=case["norm_before_gate"])
    x, z = inputs["x"], inputs["z"]
    source = jnp.concatenate([jnp.ones((x.shape[0], 3)), z, jnp.ones((x.shape[0], 6))], axis=1)
    got = rms_norm_gated_columns(x, inputs["weight"], source, 3, **options)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(side.impl.rms_norm_gated(**inputs, **options)))
    assert_close(side.numpy(got), _reference(inputs, **options), case["dtype"], "columns form")
    with pytest.raises(ValueError, match="rms_norm_gated_columns.*inference-only"):
        jax.grad(lambda s: rms_norm_gated_columns(x, inputs["weight"], s, 3, **options).sum())(source)
    for bad_source, column in [(source, 10), (source[1:], 3)]:
        with pytest.raises(ValueError, match="z_source"):
            rms_norm_gated_columns(x, inputs["weight"], bad_source, column, **options)


def test_bad_input_raises_naming_the_argument(side, rng):
    inputs = _inputs(side, rng, CASES[0])
    with pytest.raises(ValueError, match="`group_size`"):
        _run(side, inputs, group_size=7)
    with pytest.raises(ValueError, match="`weight`"):
        _run(side, dict(inputs, weight=side.array(np.ones(47), "float32")))
    with pytest.raises(ValueError, match="`z`"):
        _run(side, dict(inputs, z=side.array(np.ones((5, 47)), "float32")))
    with pytest.raises(ValueError, match="`z` must be an array"):
        _run(side, dict(inputs, z=np.ones((5, 48)).tolist()))
    for eps in (-1.0, float("nan"), "1e-5"):
        with pytest.raises(ValueError, match="`eps`"):
            _run(side, inputs, eps=eps)
    with pytest.raises(ValueError, match="`group_size` must be an integer"):
        _run(side, inputs, group_size=12.0)
    got = _run(side, inputs, group_size=np.int64(12))
    assert not np.isnan(got).any()


def test_no_tokens_is_a_no_op(side):
    x = side.array(np.zeros((0, 16)), "float32")
    assert _run(side, dict(x=x, z=x, weight=side.array(np.ones(16), "float32"), out=x)).shape == (0, 16)
    out, residual_out = side.impl.rms_norm_gated(x, None, residual=x)
    assert out.shape == residual_out.shape == (0, 16)


def test_jax_x64_mode(rng):
    jax = pytest.importorskip("jax")
    side = JaxSide()
    with jax.enable_x64(True):
        inputs = _inputs(side, rng, CASES[1])
        options = dict(group_size=12, norm_before_gate=True)
        want = _reference(inputs, **options)
        got = jax.jit(lambda arrays: side.impl.rms_norm_gated(**arrays, **options))(inputs)
        assert_close(got, want, "float32", "x64 rms_norm_gated")


# --- the residual form: s = x + residual (float32) -> (norm(s) * weight, s) ----------

RESIDUAL_CASES = [
    dict(x="float32", residual="float32", out="float32", tokens=5, hidden=48, group_size=None),
    dict(x="bfloat16", residual="float32", out="bfloat16", tokens=1, hidden=80, group_size=None),
    dict(x="bfloat16", residual="bfloat16", out="bfloat16", tokens=3, hidden=160, group_size=None),
    dict(x="float32", residual="bfloat16", out="float32", tokens=4, hidden=160, group_size=40),
    # a float32 out shows s normalised as float32, not rounded to x's bfloat16 first
    dict(x="bfloat16", residual="float32", out="float32", tokens=2, hidden=80, group_size=None)]


def _residual_inputs(side, rng, case):
    """x and weight in x's dtype, residual (T, hidden), NaN-poisoned ``out``
    and, for torch, ``residual_out`` (residual's dtype)."""
    shape = (case["tokens"], case["hidden"])
    inputs = {"x": side.array(rng.standard_normal(shape) * 3, case["x"]),
              "weight": side.array(rng.standard_normal(shape[1]), case["x"]),
              "residual": side.array(rng.standard_normal(shape) * 3, case["residual"]),
              "out": side.array(np.full(shape, np.nan), case["out"])}
    if side.name == "torch":
        inputs["residual_out"] = side.array(np.full(shape, np.nan), case["residual"])
    return inputs


def _run_residual(side, inputs, *, jit=False, **options):
    """``(out, residual_out)`` as float64 numpy (JAX under ``jax.jit`` when
    ``jit``), having checked their dtypes (out's, else x's; residual's) and
    that torch returns the buffers it was given."""
    def call(arrays):
        return side.impl.rms_norm_gated(**arrays, **options)
    results = (side.jax.jit(call) if jit else call)(inputs)
    likes = (inputs["x"] if inputs.get("out") is None else inputs["out"], inputs["residual"])
    for name, result, like in zip(("out", "residual_out"), results, likes):
        assert dtype_name(result) == dtype_name(like), f"{side.name} `{name}` dtype"
        if side.name == "torch" and inputs.get(name) is not None:
            assert result is inputs[name], f"torch kernel must return the `{name}` it wrote"
    return [side.numpy(result) for result in results]


@pytest.mark.parametrize("case", RESIDUAL_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_residual_matches_reference(side, case, rng):
    inputs = _residual_inputs(side, rng, case)
    options = dict(eps=1e-5, group_size=case["group_size"])
    want_out, want_sum = _reference(inputs, **options)
    got_out, got_sum = _run_residual(side, inputs, **options)
    assert_close(got_out, want_out, case["out"], f"{side.name} residual form out")
    assert_close(got_sum, want_sum, case["residual"], f"{side.name} residual form residual_out")


def test_residual_outputs_allocated_or_in_place(side, rng):
    """No buffers given: out like x, residual_out like residual (JAX under
    jit, residual unchanged); torch with ``residual_out=residual``: s written
    over residual."""
    case = RESIDUAL_CASES[1]  # the model's: x bfloat16, residual float32
    inputs = {k: v for k, v in _residual_inputs(side, rng, case).items()
              if k in ("x", "weight", "residual")}
    residual = side.numpy(inputs["residual"])
    want_out, want_sum = _reference(inputs, eps=1e-5)
    got_out, got_sum = _run_residual(side, inputs, jit=side.name == "jax", eps=1e-5)
    assert_close(got_out, want_out, "bfloat16", f"{side.name} allocated out")
    assert_close(got_sum, want_sum, "float32", f"{side.name} allocated residual_out")
    np.testing.assert_array_equal(side.numpy(inputs["residual"]), residual)
    if side.name == "torch":
        got_out, got_sum = _run_residual(side, dict(inputs, residual_out=inputs["residual"]), eps=1e-5)
        assert_close(got_out, want_out, "bfloat16", "in-place out")
        assert_close(side.numpy(inputs["residual"]), want_sum, "float32", "in-place residual")


@pytest.mark.filterwarnings("ignore::bridge.dlpack.BridgeCopyWarning")
def test_residual_triton_matches_pallas(rng):
    import bridge
    torch_side, jax_side = TorchSide(), JaxSide()
    case = RESIDUAL_CASES[3]
    inputs = _residual_inputs(torch_side, rng, case)
    shared = {k: bridge.to_jax(v, copy_ok=True) for k, v in inputs.items() if k != "residual_out"}
    t = _run_residual(torch_side, dict(inputs, out=inputs["out"].clone()), group_size=40)
    j = _run_residual(jax_side, shared, group_size=40)
    assert_close(t[0], j[0], "float32", "Triton vs Pallas residual form out")
    assert_close(t[1], j[1], "bfloat16", "Triton vs Pallas residual form residual_out")


def test_residual_bad_input_raises_naming_the_argument(side, rng):
    inputs = _residual_inputs(side, rng, RESIDUAL_CASES[0])
    with pytest.raises(ValueError, match="`residual` cannot be combined with `z`"):
        _run_residual(side, dict(inputs, z=inputs["x"]))
    with pytest.raises(ValueError, match="`residual` has shape"):
        _run_residual(side, dict(inputs, residual=side.array(np.ones((5, 47)), "float32")))
    with pytest.raises(ValueError, match="`residual` has dtype int32"):
        _run_residual(side, dict(inputs, residual=side.array(np.ones((5, 48), np.int32), "int32")))
    if side.name == "torch":
        with pytest.raises(ValueError, match="`residual_out` has shape"):
            _run_residual(side, dict(inputs, residual_out=side.array(np.ones((4, 48)), "float32")))
        with pytest.raises(ValueError, match="`residual_out` has dtype bfloat16"):
            _run_residual(side, dict(inputs, residual_out=side.array(np.ones((5, 48)), "bfloat16")))
        with pytest.raises(ValueError, match="`residual_out` is given without `residual`"):
            side.impl.rms_norm_gated(inputs["x"], None, residual_out=inputs["residual_out"])
        shifted = side.torch.full((6, 48), float("nan"), dtype=inputs["residual"].dtype,
                                  device=inputs["residual"].device)
        shifted[:5] = inputs["residual"]
        with pytest.raises(ValueError, match="`residual_out` shares memory with `residual`"):
            _run_residual(side, dict(inputs, residual=shifted[:5], residual_out=shifted[1:]))
    assert np.isnan(side.numpy(inputs["out"])).all()


def test_residual_refuses_grad(side, rng):
    """Inference only, refused by name: torch when an input requires grad in
    grad mode (nothing written; under no_grad it runs), JAX under jax.grad."""
    inputs = _residual_inputs(side, rng, RESIDUAL_CASES[0])
    refusal = r"rms_norm_gated: `residual` \(the fused residual add\) is inference-only"
    if side.name == "torch":
        torch = side.torch
        for name in ("x", "weight", "residual"):
            with pytest.raises(ValueError, match=refusal):
                side.impl.rms_norm_gated(**dict(inputs, **{name: inputs[name].clone().requires_grad_()}))
        assert torch.isnan(inputs["out"]).all() and torch.isnan(inputs["residual_out"]).all()
        with torch.no_grad():
            _run_residual(side, dict(inputs, x=inputs["x"].clone().requires_grad_()))
        assert not torch.isnan(inputs["out"]).any()
        return
    arrays = dict(inputs, out=None)
    with pytest.raises(ValueError, match=refusal):
        side.jax.grad(lambda x: side.impl.rms_norm_gated(**dict(arrays, x=x))[0].sum())(inputs["x"])


def test_torch_residual_op_opcheck(rng):
    """The op's schema marks ``residual_out`` written (opcheck's test_schema)
    and its fake runs."""
    side = TorchSide()
    torch = side.torch
    inputs = _residual_inputs(side, rng, RESIDUAL_CASES[0])
    args = (inputs["x"], inputs["weight"], None, inputs["residual"], inputs["out"],
            inputs["residual_out"], 1e-5, 48, False)
    torch.library.opcheck(torch.ops.mamba_twin.rms_norm_gated.default, args,
                          test_utils=("test_schema", "test_faketensor"))
