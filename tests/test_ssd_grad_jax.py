"""Gradients of the chunked scan in JAX (``jax.custom_vjp`` with the Pallas
backward stages): every gradient against ``jax.vjp`` of the float64 jnp
reference (``jax_impl.reference.ssd_chunked_jnp`` in float64, which has no
custom rule: plain autodiff of the math), from ``out`` and from the returned
final or intermediate states at once (random cotangents); a
finite-difference spot check; prefill-split invariance; the batched form
with ``seq_idx``; a given ``out``; ``nnx.grad`` of a module.

The kernels run under ``jax.jit`` (in interpret mode on CPU the compiled
interpreter is much faster than the eager one)."""

import numpy as np
import pytest

from ssd_cases import SsdCase, make_ssd_inputs

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from frameworks import assert_close  # noqa: E402

import jax_impl  # noqa: E402
from jax_impl import ssd_chunk_scan  # noqa: E402
from jax_impl.reference import ssd_chunked_jnp  # noqa: E402

DIFF_ARGS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
METADATA = ("cu_seqlens", "cu_chunk_seqlens", "seq_idx", "last_chunk_indices")
# Gradients sum over more rounded products than the outputs (and bf16 rounds
# dy, the scaled tiles and the saved end states): looser than the forward's.
GRAD_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 6e-2}

# CI (CPU interpreter, ~1 min each on 2 shared cores) runs the second case
# and the batched test; the GPU runs (--slow) everything.
GRAD_CASES = [
    pytest.param(SsdCase(seqlens=(5, 20, 15), nheads=2, ngroups=1), marks=pytest.mark.slow,
                 id="final-states"),
    # ngroups > 1, D per (head, channel), dt_limit, gradients from the intermediate
    # states, and (see heads_per_program) several heads per program.
    pytest.param(SsdCase(seqlens=(7, 33), nheads=4, ngroups=2, D="full", dt_limit=(0.05, 0.6),
                         intermediate=True), id="groups-limit-intermediate"),
    pytest.param(SsdCase(seqlens=(9, 30), nheads=2, ngroups=1, input_dtype="bfloat16"),
                 marks=pytest.mark.slow, id="bf16"),
    pytest.param(SsdCase(seqlens=(40,), nheads=2, ngroups=2, D="none", has_z=False,
                         has_dt_bias=False, softplus=False, initial_states=False),
                 marks=pytest.mark.slow, id="bare"),
    pytest.param(SsdCase(seqlens=(1, 15, 16, 17, 40), computed=(0, 3, 16, 9, 33),
                         intermediate=True), marks=pytest.mark.slow, id="resumed-intermediate"),
    pytest.param(SsdCase(chunk_size=32, headdim=24, dstate=32, seqlens=(31, 33, 5), ngroups=1),
                 marks=pytest.mark.slow, id="odd-dims"),
    pytest.param(SsdCase(seqlens="random", nheads=2), marks=pytest.mark.slow, id="random"),
    pytest.param(SsdCase(seqlens=(9, 30), input_dtype="bfloat16", state_dtype="bfloat16",
                         intermediate=True), marks=pytest.mark.slow, id="bf16-states"),
    pytest.param(SsdCase(seqlens=(9, 30), input_dtype="float16", state_dtype="float16",
                         ngroups=1), marks=pytest.mark.slow, id="fp16"),
]


def _inputs(case, rng):
    """(differentiable inputs as jax arrays in the case's dtypes, metadata as
    numpy, options)."""
    arrays, dtypes, options = make_ssd_inputs(case, rng)
    inputs = {k: jnp.asarray(arrays[k].astype(np.float32), getattr(jnp, dtypes[k]))
              for k in DIFF_ARGS if k in arrays}
    metadata = {k: arrays[k] for k in METADATA}
    return inputs, metadata, options


def _kernel_vjp(inputs, metadata, options, cotangents, out=None):
    """(out, states) and the gradients of <out, d_out> + <states, d_states>."""
    options = dict(options, state_dtype=jnp.dtype(options["state_dtype"]))
    @jax.jit
    def run(inputs, out):
        def f(inputs):
            return jax_impl.mamba_chunk_scan_combined_varlen(
                **inputs, **{k: jnp.asarray(v) for k, v in metadata.items()}, out=out, **options)
        primal, vjp = jax.vjp(f, inputs)
        d_out, d_states = cotangents
        return primal, vjp((d_out.astype(primal[0].dtype), d_states.astype(primal[1].dtype)))[0]

    return run(inputs, out)


def _reference_vjp(inputs, metadata, options, cotangents):
    """The float64 reference's (out, states) and gradients, as numpy."""
    with jax.enable_x64(True):
        f64 = {k: jnp.asarray(np.asarray(v.astype(jnp.float32), np.float64)) for k, v in inputs.items()}

        def f(inputs):
            return ssd_chunked_jnp(
                **inputs, chunk_size=options["chunk_size"],
                cu_chunk_seqlens=metadata["cu_chunk_seqlens"], seq_idx=metadata["seq_idx"],
                last_chunk_indices=metadata["last_chunk_indices"],
                dt_softplus=options["dt_softplus"], dt_limit=options["dt_limit"],
                return_intermediate_states=options["return_intermediate_states"],
                compute_dtype=jnp.float64)
        primal, vjp = jax.vjp(f, f64)
        grads = vjp(tuple(jnp.asarray(np.asarray(c, np.float64)) for c in cotangents))[0]
        return [np.asarray(p) for p in primal], {k: np.asarray(v) for k, v in grads.items()}


def _cotangents(case, inputs, metadata, options, rng):
    T, H, P = inputs["x"].shape
    rows = (len(metadata["cu_chunk_seqlens"]) - 1 if options["return_intermediate_states"]
            else len(metadata["cu_seqlens"]) - 1)
    return (jnp.asarray(rng.standard_normal((T, H, P)), jnp.float32),
            jnp.asarray(rng.standard_normal((rows, H, P, case.dstate)), jnp.float32))


def _check_grads(got, want, dtype, what=""):
    assert set(got) == set(want)
    for name in want:
        assert_close(got[name], want[name], dtype, f"{what}d{name}", tol=GRAD_TOLERANCE[dtype])


@pytest.mark.parametrize("case", GRAD_CASES)
def test_grads_vs_float64(case, rng, monkeypatch):
    if case.nheads // case.ngroups > 1:  # several heads per chunk_scan_bwd program
        monkeypatch.setattr(ssd_chunk_scan, "TARGET_PROGRAMS", 1)
    inputs, metadata, options = _inputs(case, rng)
    cotangents = _cotangents(case, inputs, metadata, options, rng)
    (out, states), grads = _kernel_vjp(inputs, metadata, options, cotangents)
    (want_out, want_states), want = _reference_vjp(inputs, metadata, options, cotangents)
    tol = {"float32": None, "float16": 5e-3, "bfloat16": 3e-2}
    assert_close(out, want_out, case.input_dtype, "out", tol=tol[case.input_dtype])
    assert_close(states, want_states, case.input_dtype, "states", tol=tol[case.input_dtype])
    for name in ("A", "D", "dt_bias"):
        if name in grads:
            assert grads[name].dtype == jnp.float32, f"d{name} dtype"
    if "initial_states" in grads:
        assert grads["initial_states"].dtype == inputs["initial_states"].dtype
    for name in ("x", "dt", "B", "C", "z"):
        if name in grads:
            assert grads[name].dtype == inputs[name].dtype, f"d{name} dtype"
    _check_grads(grads, want, case.input_dtype)


@pytest.mark.slow
def test_given_out_and_statics(rng):
    """A given ``out`` (poisoned) changes nothing in the gradients (and gets
    none); gradients only from the final states (zero d_out) still flow."""
    case = SsdCase(seqlens=(5, 20), nheads=2, ngroups=1)
    inputs, metadata, options = _inputs(case, rng)
    d_out, d_states = _cotangents(case, inputs, metadata, options, rng)
    cotangents = (jnp.zeros_like(d_out), d_states)
    _, grads = _kernel_vjp(inputs, metadata, options, cotangents)
    poisoned = jnp.full(inputs["x"].shape, jnp.nan, jnp.float32)
    (out, _), given = _kernel_vjp(inputs, metadata, options, cotangents, out=poisoned)
    assert np.isfinite(np.asarray(out)).all()
    for name in grads:
        np.testing.assert_array_equal(np.asarray(given[name]), np.asarray(grads[name]), err_msg=name)
    _, want = _reference_vjp(inputs, metadata, options, cotangents)
    _check_grads(grads, want, "float32", "states only: ")


@pytest.mark.slow
def test_finite_difference(rng):
    """The directional derivative of a scalar loss along a random direction
    of every input, by central differences in float32, against the kernel's
    gradient (no reference involved)."""
    case = SsdCase(seqlens=(6, 21), nheads=2, ngroups=1, dt_limit=(0.0, 5.0))
    inputs, metadata, options = _inputs(case, rng)
    d_out, d_states = _cotangents(case, inputs, metadata, options, rng)
    static = dict(options, state_dtype=jnp.float32)

    @jax.jit
    def loss(inputs):
        out, states = jax_impl.mamba_chunk_scan_combined_varlen(
            **inputs, **{k: jnp.asarray(v) for k, v in metadata.items()}, **static)
        return jnp.sum(out * d_out) + jnp.sum(states * d_states)

    grads = jax.jit(jax.grad(loss))(inputs)
    direction = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in inputs.items()}
    eps = 1e-2
    shifted = lambda s: {k: v + s * eps * direction[k] for k, v in inputs.items()}  # noqa: E731
    numeric = (float(loss(shifted(1.0))) - float(loss(shifted(-1.0)))) / (2 * eps)
    analytic = sum(float(jnp.sum(grads[k] * direction[k])) for k in inputs)
    assert abs(numeric - analytic) <= 1e-2 * max(1.0, abs(analytic)), (numeric, analytic)


@pytest.mark.slow
def test_prefill_split_invariance(rng):
    """One call over a sequence and two calls chained through
    ``initial_states`` (the second starting from the first's final state)
    give the same gradients for every input."""
    case = SsdCase(seqlens=(37,), nheads=2, ngroups=1)
    inputs, _, options = _inputs(case, rng)
    split = 21
    static = dict(options, state_dtype=jnp.float32)

    def call(inputs, lo, hi, initial_states):
        from bridge.spec.ssd_contract import chunk_metadata
        cu_seqlens = np.array([0, hi - lo], np.int32)
        meta = chunk_metadata(cu_seqlens, case.chunk_size)
        per_token = {k: inputs[k][lo:hi] for k in ("x", "dt", "B", "C", "z")}
        return jax_impl.mamba_chunk_scan_combined_varlen(
            **per_token, A=inputs["A"], D=inputs["D"], dt_bias=inputs["dt_bias"],
            initial_states=initial_states, cu_seqlens=jnp.asarray(cu_seqlens),
            cu_chunk_seqlens=jnp.asarray(meta.cu_chunk_seqlens), seq_idx=jnp.asarray(meta.seq_idx),
            last_chunk_indices=jnp.asarray(meta.last_chunk_indices), **static)

    T = inputs["x"].shape[0]
    weights = jnp.asarray(rng.standard_normal((T,) + inputs["x"].shape[1:]), jnp.float32)
    d_final = jnp.asarray(rng.standard_normal(inputs["initial_states"].shape), jnp.float32)

    def whole(inputs):
        out, final = call(inputs, 0, T, inputs["initial_states"])
        return jnp.sum(out * weights) + jnp.sum(final * d_final)

    def chained(inputs):
        out1, mid = call(inputs, 0, split, inputs["initial_states"])
        out2, final = call(inputs, split, T, mid)
        return jnp.sum(jnp.concatenate([out1, out2]) * weights) + jnp.sum(final * d_final)

    one = jax.jit(jax.grad(whole))(inputs)
    two = jax.jit(jax.grad(chained))(inputs)
    for name in one:
        assert_close(two[name], one[name], "float32", f"d{name}", tol=GRAD_TOLERANCE["float32"])


def _batched_reference(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_softplus):
    """The batched form token by token (float64 jnp, plain autodiff): a row's
    state starts at its initial state and restarts from 0 where seq_idx
    changes; returns (out, final state of every row)."""
    batch, seqlen, H, P = x.shape
    G, N = B.shape[2:]
    dt = dt + dt_bias
    if dt_softplus:
        dt = jnp.where(dt > 20.0, dt, jnp.log1p(jnp.exp(dt)))
    B, C = (jnp.repeat(a, H // G, axis=2) for a in (B, C))  # (b, l, H, N)
    restart = np.concatenate([np.zeros((batch, 1), bool), seq_idx[:, 1:] != seq_idx[:, :-1]], axis=1)

    def step(state, t):
        state = jnp.where(jnp.asarray(restart)[:, t, None, None, None], 0.0, state)
        decay = jnp.exp(A * dt[:, t])[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        return state, jnp.einsum("bhpn,bhn->bhp", state, C[:, t])

    final, y = jax.lax.scan(step, initial_states, jnp.arange(seqlen))
    y = jnp.moveaxis(y, 0, 1) + D[:, None] * x
    return y * z * jax.nn.sigmoid(z), final


@pytest.mark.slow
def test_batched_with_seq_idx(rng):
    """``mamba_chunk_scan_combined`` (b, l) with seq_idx splitting the rows:
    gradients (from out and the final states) against the float64 batched
    recurrence."""
    batch, seqlen, H, P, G, N, chunk = 2, 24, 2, 16, 1, 16, 16
    seq_idx = np.array([[0] * 10 + [1] * 14, [2] * 24], np.int32)
    r = lambda *shape, scale=1.0: rng.standard_normal(shape) * scale  # noqa: E731
    arrays = {"x": r(batch, seqlen, H, P), "dt": r(batch, seqlen, H, scale=0.5),
              "A": -np.exp(r(H, scale=0.5)), "B": r(batch, seqlen, G, N), "C": r(batch, seqlen, G, N),
              "D": r(H), "z": r(batch, seqlen, H, P), "dt_bias": r(H, scale=0.5),
              "initial_states": r(batch, H, P, N)}
    inputs = {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}
    d_out = jnp.asarray(r(batch, seqlen, H, P), jnp.float32)
    d_final = jnp.asarray(r(batch, H, P, N), jnp.float32)

    @jax.jit
    def grads(inputs):
        def loss(inputs):
            out, final = jax_impl.mamba_chunk_scan_combined(
                **inputs, chunk_size=chunk, seq_idx=seq_idx, dt_softplus=True,
                return_final_states=True, state_dtype=jnp.float32)
            return jnp.sum(out * d_out) + jnp.sum(final * d_final)
        return jax.grad(loss)(inputs)

    got = grads(inputs)
    with jax.enable_x64(True):
        weights = [np.asarray(w, np.float64) for w in (d_out, d_final)]

        def loss64(inputs):
            out, final = _batched_reference(**inputs, seq_idx=seq_idx, dt_softplus=True)
            return jnp.sum(out * weights[0]) + jnp.sum(final * weights[1])
        want = jax.grad(loss64)({k: jnp.asarray(v, jnp.float64) for k, v in arrays.items()})
        want = {k: np.asarray(v) for k, v in want.items()}
    _check_grads(got, want, "float32", "batched: ")


@pytest.mark.slow
def test_nnx_grad_of_module(rng):
    """``nnx.grad`` through a module whose parameters (A_log, D, dt_bias)
    feed the chunked scan equals ``jax.grad`` of the same function of the
    parameters (and the scan's own gradient check covers the values)."""
    nnx = pytest.importorskip("flax.nnx")
    case = SsdCase(seqlens=(5, 20), nheads=2, ngroups=1)
    inputs, metadata, options = _inputs(case, rng)
    static = dict(options, state_dtype=jnp.float32)
    meta = {k: jnp.asarray(v) for k, v in metadata.items()}

    def scan(A_log, D, dt_bias):
        out, states = jax_impl.mamba_chunk_scan_combined_varlen(
            **dict(inputs, A=-jnp.exp(A_log), D=D, dt_bias=dt_bias), **meta, **static)
        return jnp.sum(out ** 2) + jnp.sum(states ** 2)

    class Scan(nnx.Module):
        def __init__(self):
            self.A_log = nnx.Param(jnp.log(-inputs["A"]))
            self.D = nnx.Param(inputs["D"])
            self.dt_bias = nnx.Param(inputs["dt_bias"])

        def __call__(self):
            return scan(self.A_log[...], self.D[...], self.dt_bias[...])

    module = Scan()
    got = nnx.jit(nnx.grad(lambda m: m()))(module)
    want = jax.jit(jax.grad(scan, argnums=(0, 1, 2)))(module.A_log[...], module.D[...],
                                                       module.dt_bias[...])
    for name, value in zip(("A_log", "D", "dt_bias"), want):
        np.testing.assert_allclose(np.asarray(getattr(got, name)[...]), np.asarray(value),
                                   rtol=1e-5, atol=1e-5 * float(jnp.abs(value).max()), err_msg=name)
        assert np.abs(np.asarray(value)).max() > 0, name
