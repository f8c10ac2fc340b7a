"""Gated RMSNorm in each framework vs the float64 reference (grouped or
not, gate before or after the norm, with and without weight and gate),
Triton vs Pallas on the same memory, bad input, no tokens, JAX x64 mode."""

import numpy as np
import pytest

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
    return numpy_reference("rms_norm_gated", {k: v for k, v in inputs.items() if k != "out"}, **options)


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


def test_jax_x64_mode(rng):
    jax = pytest.importorskip("jax")
    side = JaxSide()
    with jax.enable_x64(True):
        inputs = _inputs(side, rng, CASES[1])
        options = dict(group_size=12, norm_before_gate=True)
        want = _reference(inputs, **options)
        got = jax.jit(lambda arrays: side.impl.rms_norm_gated(**arrays, **options))(inputs)
        assert_close(got, want, "float32", "x64 rms_norm_gated")
