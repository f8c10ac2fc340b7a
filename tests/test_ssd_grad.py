"""Gradients of the chunked scan in torch (the Triton backward stages behind
``torch.library.register_autograd``): every gradient against torch autograd
of the float64 plain-ops form (``torch_impl.reference.ssd_chunked_torch_ops``
in float64, which ``test_ssd`` checks against the token-by-token numpy
reference), from ``out`` and from
the returned final or intermediate states at once (random cotangents); a
finite-difference spot check; prefill-split invariance; the batched form
with ``seq_idx``; the inference path and the refusal of an in-place ``out``
under autograd; the op's registration (opcheck); Triton vs Pallas gradients
on the same inputs. Mirror: ``test_ssd_grad_jax.py``."""

import math

import numpy as np
import pytest

from ssd_cases import SsdCase, make_ssd_inputs

torch = pytest.importorskip("torch")
torch_impl = pytest.importorskip("torch_impl")  # before triton: interpreter mode on CPU

from bridge.spec.ssd_contract import batched_sequences, chunk_metadata  # noqa: E402
from frameworks import assert_close  # noqa: E402
from torch_impl import ssd_chunk_scan  # noqa: E402
from torch_impl.reference import ssd_chunked_torch_ops  # noqa: E402

DEVICE = torch_impl.platform.default_device()
DIFF_ARGS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
METADATA = ("cu_seqlens", "cu_chunk_seqlens", "seq_idx", "last_chunk_indices")
# Gradients sum over more rounded products than the outputs (and bf16 rounds
# dy, the scaled tiles and the saved end states): looser than the forward's.
GRAD_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 6e-2}
OUT_TOLERANCE = {"float32": None, "float16": 5e-3, "bfloat16": 3e-2}

GRAD_CASES = [
    pytest.param(SsdCase(seqlens=(5, 20, 15), nheads=2, ngroups=1), None, id="default"),
    # ngroups > 1, D per (head, channel), dt_limit, gradients from the
    # intermediate states; one head per stage-4 program (head splits summed).
    pytest.param(SsdCase(seqlens=(7, 33), nheads=4, ngroups=2, D="full", dt_limit=(0.05, 0.6),
                         intermediate=True), 1, id="groups-limit-intermediate-splits"),
    pytest.param(SsdCase(seqlens=(9, 30), nheads=2, ngroups=1, input_dtype="bfloat16"), 8, id="bf16"),
    pytest.param(SsdCase(seqlens=(40,), nheads=2, ngroups=2, D="none", has_z=False,
                         has_dt_bias=False, softplus=False, initial_states=False), 8,
                 marks=pytest.mark.slow, id="bare"),
    pytest.param(SsdCase(seqlens=(1, 15, 16, 17, 40), computed=(0, 3, 16, 9, 33),
                         intermediate=True), 8, marks=pytest.mark.slow, id="resumed-intermediate"),
    pytest.param(SsdCase(chunk_size=32, headdim=24, dstate=32, seqlens=(31, 33, 5), ngroups=1), 8,
                 marks=pytest.mark.slow, id="odd-dims"),
    pytest.param(SsdCase(seqlens="random", nheads=4, ngroups=1), 3, marks=pytest.mark.slow,
                 id="random-uneven-splits"),
    pytest.param(SsdCase(seqlens=(9, 30), input_dtype="bfloat16", state_dtype="bfloat16",
                         intermediate=True), 8, marks=pytest.mark.slow, id="bf16-states"),
    pytest.param(SsdCase(seqlens=(9, 30), input_dtype="float16", state_dtype="float16",
                         ngroups=1), 8, marks=pytest.mark.slow, id="fp16"),
]


# --- helpers ---------------------------------------------------------------------------

def _inputs(case, rng):
    """(differentiable leaves in the case's dtypes, metadata as int32 tensors, options)."""
    arrays, dtypes, options = make_ssd_inputs(case, rng)
    leaves = {k: torch.from_numpy(arrays[k]).to(DEVICE, getattr(torch, dtypes[k])).requires_grad_()
              for k in DIFF_ARGS if k in arrays}
    metadata = {k: torch.from_numpy(np.asarray(arrays[k])).to(DEVICE, torch.int32) for k in METADATA}
    options = dict(options, state_dtype=getattr(torch, options["state_dtype"]))
    return leaves, metadata, options


def _cotangents(leaves, metadata, options, rng):
    T, H, P = leaves["x"].shape
    rows = (len(metadata["cu_chunk_seqlens"]) - 1 if options["return_intermediate_states"]
            else len(metadata["cu_seqlens"]) - 1)
    N = leaves["B"].shape[2]
    as_tensor = lambda a: torch.from_numpy(a).to(DEVICE, torch.float32)  # noqa: E731
    return as_tensor(rng.standard_normal((T, H, P))), as_tensor(rng.standard_normal((rows, H, P, N)))


def _kernel_grads(leaves, metadata, options, cotangents):
    """(out, states) and the gradients of <out, d_out> + <states, d_states>."""
    for leaf in leaves.values():
        leaf.grad = None
    out, states = torch_impl.mamba_chunk_scan_combined_varlen(**leaves, **metadata, **options)
    assert out.grad_fn is not None and states.grad_fn is not None
    d_out, d_states = cotangents
    loss = (out * d_out.to(out.dtype)).sum() + (states * d_states.to(states.dtype)).sum()
    loss.backward()
    return (out, states), {k: v.grad for k, v in leaves.items()}


def _reference_grads(leaves, metadata, options, cotangents):
    """The float64 reference's (out, states) and gradients (from the inputs
    as the kernel sees them, rounded to their dtypes)."""
    f64 = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    out, states = ssd_chunked_torch_ops(
        **f64, **{k: v for k, v in metadata.items() if k != "cu_seqlens"},
        chunk_size=options["chunk_size"], dt_softplus=options["dt_softplus"],
        dt_limit=options["dt_limit"], return_intermediate_states=options["return_intermediate_states"],
        compute_dtype=torch.float64)
    d_out, d_states = cotangents
    ((out * d_out.double()).sum() + (states * d_states.double()).sum()).backward()
    return (out.detach(), states.detach()), {k: v.grad for k, v in f64.items()}


def _check_grads(got, want, dtype, what=""):
    assert set(got) == set(want)
    for name in want:
        assert got[name] is not None, f"{what}d{name} missing"
        assert_close(got[name], want[name], dtype, f"{what}d{name}", tol=GRAD_TOLERANCE[dtype])


# --- tests -------------------------------------------------------------------------------

@pytest.mark.parametrize("case,heads_per_program", GRAD_CASES)
def test_grads_vs_float64(case, heads_per_program, rng, monkeypatch):
    monkeypatch.setattr(ssd_chunk_scan, "HEADS_PER_PROGRAM", heads_per_program)
    leaves, metadata, options = _inputs(case, rng)
    cotangents = _cotangents(leaves, metadata, options, rng)
    (out, states), grads = _kernel_grads(leaves, metadata, options, cotangents)
    (want_out, want_states), want = _reference_grads(leaves, metadata, options, cotangents)
    tol = OUT_TOLERANCE[case.input_dtype]
    assert_close(out, want_out, case.input_dtype, "out", tol=tol)
    assert_close(states, want_states, case.input_dtype, "states", tol=tol)
    for name, grad in grads.items():
        assert grad.dtype == leaves[name].dtype, f"d{name} has dtype {grad.dtype}"
    _check_grads(grads, want, case.input_dtype)


def test_grads_from_states_only_and_out_only(rng):
    """Zero cotangent on one output: the other's gradient alone (and an
    unused output, never touched by the loss, counts as zero)."""
    case = SsdCase(seqlens=(5, 20), nheads=2, ngroups=1)
    leaves, metadata, options = _inputs(case, rng)
    d_out, d_states = _cotangents(leaves, metadata, options, rng)
    for cotangents in ((torch.zeros_like(d_out), d_states), (d_out, torch.zeros_like(d_states))):
        _, grads = _kernel_grads(leaves, metadata, options, cotangents)
        _, want = _reference_grads(leaves, metadata, options, cotangents)
        _check_grads(grads, want, "float32")
    # Only `out` used by the loss: autograd hands the states' gradient as None.
    out, _ = torch_impl.mamba_chunk_scan_combined_varlen(**leaves, **metadata, **options)
    for leaf in leaves.values():
        leaf.grad = None
    (out * d_out).sum().backward()
    _check_grads({k: v.grad for k, v in leaves.items()}, want, "float32", "out only: ")


def test_finite_difference(rng):
    """The directional derivative of a scalar loss along a random direction
    of every input, by central differences in float64 of the float32
    kernel's loss, against the kernel's gradient (no reference involved)."""
    case = SsdCase(seqlens=(6, 21), nheads=2, ngroups=1, dt_limit=(0.0, 5.0))
    leaves, metadata, options = _inputs(case, rng)
    d_out, d_states = _cotangents(leaves, metadata, options, rng)

    def loss(inputs):
        out, states = torch_impl.mamba_chunk_scan_combined_varlen(**inputs, **metadata, **options)
        return (out * d_out).sum() + (states * d_states).sum()

    loss(leaves).backward()
    direction = {k: torch.from_numpy(rng.standard_normal(v.shape)).to(DEVICE, torch.float32)
                 for k, v in leaves.items()}
    eps = 1e-2
    with torch.no_grad():
        shifted = lambda s: {k: v + s * eps * direction[k] for k, v in leaves.items()}  # noqa: E731
        numeric = (float(loss(shifted(1.0))) - float(loss(shifted(-1.0)))) / (2 * eps)
    analytic = sum(float((leaves[k].grad * direction[k]).sum()) for k in leaves)
    assert abs(numeric - analytic) <= 1e-2 * max(1.0, abs(analytic)), (numeric, analytic)


def test_prefill_split_invariance(rng):
    """One call over a sequence and two calls chained through
    ``initial_states`` (the second starting from the first's final state)
    give the same gradients for every input."""
    case = SsdCase(seqlens=(37,), nheads=2, ngroups=1)
    leaves, _, options = _inputs(case, rng)
    T = leaves["x"].shape[0]
    weights = torch.from_numpy(rng.standard_normal(tuple(leaves["x"].shape))).to(DEVICE, torch.float32)
    d_final = torch.from_numpy(rng.standard_normal(tuple(leaves["initial_states"].shape))).to(
        DEVICE, torch.float32)

    def call(lo, hi, initial_states):
        cu_seqlens = np.array([0, hi - lo], np.int32)
        meta = chunk_metadata(cu_seqlens, case.chunk_size)
        index = lambda a: torch.from_numpy(np.asarray(a)).to(DEVICE, torch.int32)  # noqa: E731
        per_token = {k: leaves[k][lo:hi] for k in ("x", "dt", "B", "C", "z")}
        return torch_impl.mamba_chunk_scan_combined_varlen(
            **per_token, A=leaves["A"], D=leaves["D"], dt_bias=leaves["dt_bias"],
            initial_states=initial_states, cu_seqlens=index(cu_seqlens),
            cu_chunk_seqlens=index(meta.cu_chunk_seqlens), seq_idx=index(meta.seq_idx),
            last_chunk_indices=index(meta.last_chunk_indices), **options)

    def grads(split):
        for leaf in leaves.values():
            leaf.grad = None
        if split is None:
            out, final = call(0, T, leaves["initial_states"])
        else:
            first, middle = call(0, split, leaves["initial_states"])
            second, final = call(split, T, middle)
            out = torch.cat([first, second])
        ((out * weights).sum() + (final * d_final).sum()).backward()
        return {k: v.grad.clone() for k, v in leaves.items()}

    whole = grads(None)
    for split in (21, 16):  # inside a chunk, and on a chunk boundary
        for name, grad in grads(split).items():
            assert_close(grad, whole[name], "float32", f"split {split}: d{name}", tol=1e-4)


def test_batched_form_with_seq_idx(rng):
    """``mamba_chunk_scan_combined`` (b, l, ...) with ``seq_idx`` splitting
    rows, initial states and the final states: gradients against the
    reference over the same packed sequences."""
    batch, seqlen, H, P, N, G = 2, 24, 2, 16, 16, 1
    ids = np.array([[0] * 10 + [1] * 14, [0] * 24])
    r = lambda *shape: rng.standard_normal(shape)  # noqa: E731
    arrays = dict(x=r(batch, seqlen, H, P), dt=r(batch, seqlen, H) * 0.5, A=-np.exp(r(H) * 0.5),
                  B=r(batch, seqlen, G, N), C=r(batch, seqlen, G, N), D=r(H), z=r(batch, seqlen, H, P),
                  dt_bias=r(H) * 0.5, initial_states=r(batch, H, P, N))
    leaves = {k: torch.from_numpy(v).to(DEVICE, torch.float32).requires_grad_() for k, v in arrays.items()}
    seq_idx = torch.from_numpy(ids).to(DEVICE, torch.int32)
    out, final = torch_impl.mamba_chunk_scan_combined(
        **leaves, chunk_size=16, seq_idx=seq_idx, dt_softplus=True, return_final_states=True)
    d_out, d_final = r(*out.shape), r(*final.shape)
    on_device = lambda a: torch.from_numpy(a).to(DEVICE, torch.float32)  # noqa: E731
    loss = (out * on_device(d_out)).sum() + (final * on_device(d_final)).sum()
    loss.backward()

    cu_seqlens, first, last = batched_sequences(batch, seqlen, ids)
    f64 = {k: torch.from_numpy(v).requires_grad_() for k, v in arrays.items()}
    flat = lambda t: t.reshape(batch * seqlen, *t.shape[2:])  # noqa: E731
    init = torch.zeros(len(cu_seqlens) - 1, H, P, N, dtype=torch.float64).index_copy(
        0, torch.from_numpy(first).long(), f64["initial_states"])
    chunks = {k: torch.from_numpy(v) for k, v in vars(chunk_metadata(cu_seqlens, 16)).items()}
    want_out, want_final = ssd_chunked_torch_ops(
        flat(f64["x"]), flat(f64["dt"]), f64["A"], flat(f64["B"]), flat(f64["C"]), 16, **chunks,
        D=f64["D"], z=flat(f64["z"]), dt_bias=f64["dt_bias"], initial_states=init, dt_softplus=True,
        compute_dtype=torch.float64)
    want_final = want_final[torch.from_numpy(last).long()]
    assert_close(out, want_out.reshape(out.shape), "float32", "out")
    assert_close(final, want_final, "float32", "final states")
    ((want_out.reshape(out.shape) * torch.from_numpy(d_out)).sum()
     + (want_final * torch.from_numpy(d_final)).sum()).backward()
    _check_grads({k: v.grad for k, v in leaves.items()}, {k: v.grad for k, v in f64.items()}, "float32")


def test_inference_path_and_refusal(rng):
    """No input requires grad (or grad mode off): the in-place inference op
    runs, nothing is recorded; out=None returns (out, states). A given
    ``out`` with inputs that require grad is refused by name."""
    case = SsdCase(seqlens=(5, 20), nheads=2, ngroups=1)
    leaves, metadata, options = _inputs(case, rng)
    plain = {k: v.detach() for k, v in leaves.items()}
    out = torch.full_like(plain["x"], math.nan)
    states = torch_impl.mamba_chunk_scan_combined_varlen(**plain, **metadata, **options, out=out)
    assert isinstance(states, torch.Tensor) and out.grad_fn is None and states.grad_fn is None
    fresh_out, fresh_states = torch_impl.mamba_chunk_scan_combined_varlen(**plain, **metadata, **options)
    assert fresh_out.grad_fn is None
    torch.testing.assert_close(fresh_out, out, rtol=0, atol=0)
    torch.testing.assert_close(fresh_states, states, rtol=0, atol=0)
    with torch.no_grad():  # grad mode off: the in-place form is fine with leaves that require grad
        torch_impl.mamba_chunk_scan_combined_varlen(**leaves, **metadata, **options,
                                                    out=torch.empty_like(out))
    with pytest.raises(ValueError, match="`out`.*require grad"):
        torch_impl.mamba_chunk_scan_combined_varlen(**leaves, **metadata, **options,
                                                    out=torch.empty_like(out))
    # The differentiable form writes the same values as the inference path.
    grad_out, grad_states = torch_impl.mamba_chunk_scan_combined_varlen(**leaves, **metadata, **options)
    torch.testing.assert_close(grad_out.detach(), out, rtol=0, atol=0)
    torch.testing.assert_close(grad_states.detach(), states, rtol=0, atol=0)


@pytest.mark.slow
def test_training_op_opcheck(rng):
    """The functional forward op's schema, fake kernel and autograd
    registration (torch.library.opcheck: eager, FakeTensor, AOT dispatch
    with the backward)."""
    case = SsdCase(seqlens=(5, 20), nheads=2, ngroups=1)
    leaves, metadata, options = _inputs(case, rng)
    args = (leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], case.chunk_size,
            metadata["cu_chunk_seqlens"], metadata["seq_idx"], 2, leaves["D"], leaves["z"],
            leaves["dt_bias"], leaves["initial_states"], True, 0.0, math.inf, False, torch.float32)
    torch.library.opcheck(torch.ops.mamba_twin.mamba_chunk_scan_combined_varlen_fwd.default, args)


@pytest.mark.slow  # ~40 s on CPU, nearly all of it tracing the Pallas interpreter
def test_triton_vs_pallas_grads(rng):
    """The two backends' gradients on the same inputs (shared through numpy)
    agree within float32 tolerance."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    jax_impl = pytest.importorskip("jax_impl")
    case = SsdCase(seqlens=(7, 26), nheads=4, ngroups=2, D="full", dt_limit=(0.0, 3.0))
    leaves, metadata, options = _inputs(case, rng)
    cotangents = _cotangents(leaves, metadata, options, rng)
    _, grads = _kernel_grads(leaves, metadata, options, cotangents)

    as_np = lambda t: t.detach().cpu().numpy()  # noqa: E731
    primals = {k: jnp.asarray(as_np(v)) for k, v in leaves.items()}
    index = {k: jnp.asarray(as_np(v)) for k, v in metadata.items()}
    jax_options = dict(options, state_dtype=jnp.float32)

    @jax.jit  # the compiled interpreter: much faster than the eager one
    def pallas_grads(primals, index, cotangents):
        def f(primals):
            return jax_impl.mamba_chunk_scan_combined_varlen(**primals, **index, **jax_options)
        return jax.vjp(f, primals)[1](cotangents)[0]

    pallas = pallas_grads(primals, index, tuple(jnp.asarray(as_np(c)) for c in cotangents))
    for name, grad in grads.items():
        assert_close(grad, np.asarray(pallas[name]), "float32", f"d{name}", tol=GRAD_TOLERANCE["float32"])


def test_strided_inputs(rng):
    """Inputs that are views (x, z: columns of one projection; dt: a slice;
    x permuted in memory) and a stride-0 cotangent: the same gradients."""
    case = SsdCase(seqlens=(5, 20), nheads=2, ngroups=1)
    leaves, metadata, options = _inputs(case, rng)
    T, H, P = leaves["x"].shape
    packed = torch.stack([leaves["x"].detach(), leaves["z"].detach()], 1).requires_grad_()  # (T, 2, H, P)
    wide_dt = torch.cat([leaves["dt"].detach(), leaves["dt"].detach()[:, :1]], 1).requires_grad_()
    permuted_x = leaves["x"].detach().permute(2, 0, 1).contiguous().requires_grad_().permute(1, 2, 0)
    for x, z in ((packed[:, 0], packed[:, 1]), (permuted_x, packed[:, 1])):
        views = dict(leaves, x=x, z=z, dt=wide_dt[:, :H])
        out, states = torch_impl.mamba_chunk_scan_combined_varlen(**views, **metadata, **options)
        d_states = torch.ones((), device=DEVICE).expand(states.shape)  # stride 0, as a sum's backward
        d_out = torch.from_numpy(rng.standard_normal((T, H, P))).to(DEVICE, torch.float32)
        got = torch.autograd.grad((out, states), list(views.values()), (d_out, d_states))
        _, want = _reference_grads(leaves, metadata, options, (d_out, d_states.contiguous()))
        _check_grads(dict(zip(views, got)), want, "float32", "strided: ")


def test_no_tokens(rng):
    """T = 0 (no chunks, no sequences): no kernel runs; the gradients are zeros."""
    H, P, N = 2, 16, 16
    leaves = {k: torch.from_numpy(rng.standard_normal(shape)).to(DEVICE, torch.float32).requires_grad_()
              for k, shape in dict(x=(0, H, P), dt=(0, H), A=(H,), B=(0, 1, N), C=(0, 1, N), D=(H,),
                                   dt_bias=(H,)).items()}
    empty = lambda n: torch.zeros(n, dtype=torch.int32, device=DEVICE)  # noqa: E731
    out, states = torch_impl.mamba_chunk_scan_combined_varlen(
        **leaves, chunk_size=16, cu_seqlens=empty(1), cu_chunk_seqlens=empty(1), seq_idx=empty(0),
        last_chunk_indices=empty(0), dt_softplus=True)
    assert out.shape == (0, H, P) and states.shape == (0, H, P, N)
    (out.sum() + states.sum()).backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and not leaf.grad.any(), name


@pytest.mark.slow
def test_torch_compile_fullgraph_training_step(rng):
    """forward + backward under torch.compile(fullgraph=True): the training
    ops are opaque to dynamo / AOT autograd; the same gradients as eager."""
    case = SsdCase(seqlens=(5, 20), nheads=2, ngroups=1)
    leaves, metadata, options = _inputs(case, rng)
    cotangents = _cotangents(leaves, metadata, options, rng)
    _, eager = _kernel_grads(leaves, metadata, options, cotangents)

    def loss(inputs):
        out, states = torch_impl.mamba_chunk_scan_combined_varlen(**inputs, **metadata, **options)
        return (out * cotangents[0]).sum() + (states * cotangents[1]).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    for leaf in leaves.values():
        leaf.grad = None
    compiled(leaves).backward()
    for name, leaf in leaves.items():
        assert_close(leaf.grad, eager[name], "float32", f"compiled d{name}", tol=1e-6)
