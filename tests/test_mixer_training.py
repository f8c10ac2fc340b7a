"""The mixers' cache-free training forward (``mixer(hidden_states)``, each row
one sequence from zero state, or rows split by ``seq_idx`` / packed by
``cu_seqlens``) in each framework: equal to the serving forward's prefill of
the same sequences and to the float64 mixer; the gradients of the input and
of every parameter against float64 autodiff of a float64 reference mixer
(torch autograd; ``jax.grad`` under x64); a finite-difference spot check;
AdamW steps of a 2-layer mixer stack giving the same losses in both
frameworks; ``A_log`` as the parameter; the refused calls."""

import numpy as np
import pytest

from bridge.spec.mixer_layout import PARAM_ATTRS
from bridge.spec.mixer_metadata import build_mamba2_metadata
from frameworks import SIDES, JaxSide, TorchSide, assert_close
from mixer_reference import autodiff_mixer_ref, mixer_ref, random_weights
from test_mamba_mixer2 import CONFIG, DIMS, WIDTH, _mixer, _new_cache, _new_mixer

HIDDEN = CONFIG["hidden_size"]
# The Flax mixer's gradients compile for minutes in the Pallas interpreter: CI runs torch's.
FRAMEWORKS = ["torch", pytest.param("jax", marks=pytest.mark.slow)]
# (batch, seqlen, seq_idx or cu_seqlens): the packed sequences' lengths follow.
LAYOUTS = {
    "rows": (2, 20, {}),  # 20 tokens: two chunks of 16 per row
    "seq_idx": (2, 20, dict(seq_idx=np.array([[0] * 7 + [1] * 13, [3] * 20], np.int32))),
    "cu_seqlens": (1, 41, dict(cu_seqlens=np.array([0, 3, 25, 41], np.int32))),
}


def _lengths(batch, seqlen, packing) -> list[int]:
    if "cu_seqlens" in packing:
        return np.diff(packing["cu_seqlens"]).tolist()
    if "seq_idx" in packing:
        return [int(n) for row in packing["seq_idx"] for n in np.unique(row, return_counts=True)[1]]
    return [seqlen] * batch


def _packing(side, packing):
    """The packing arguments as the side passes them (torch: tensors, JAX: numpy)."""
    if side.name == "torch":
        return {k: side.torch.from_numpy(v) for k, v in packing.items()}
    return packing


_JAX_FORWARDS = {}


def _jax_forward(graphdef, packing):
    """The Flax training forward jitted once per module structure and
    packing (the weights an argument: the interpreters compile slowly)."""
    key = (graphdef, tuple((k, v.shape, v.tobytes()) for k, v in sorted(packing.items())))
    if key not in _JAX_FORWARDS:
        import jax
        from flax import nnx
        _JAX_FORWARDS[key] = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, **packing))
    return _JAX_FORWARDS[key]


def _train(side, mixer, hidden: np.ndarray, packing) -> np.ndarray:
    if side.name == "torch":
        with side.torch.no_grad():
            return side.numpy(mixer(side.array(hidden, "float32"), **_packing(side, packing)))
    from flax import nnx
    graphdef, state = nnx.split(mixer)
    return side.numpy(_jax_forward(graphdef, packing)(state, side.array(hidden, "float32")))


@pytest.mark.parametrize("layout", [pytest.param(name, marks=[] if name == "seq_idx" else pytest.mark.slow)
                                    for name in LAYOUTS])
def test_training_forward_equals_serving_prefill_and_reference(side, layout, rng):
    batch, seqlen, packing = LAYOUTS[layout]
    weights = random_weights(rng, DIMS, HIDDEN, WIDTH, use_bias=True)
    mixer = _mixer(side, weights)
    hidden = rng.standard_normal((batch, seqlen, HIDDEN))
    got = _train(side, mixer, hidden, packing)
    assert got.shape == (batch, seqlen, HIDDEN)

    lengths = _lengths(batch, seqlen, packing)
    flat = hidden.reshape(-1, HIDDEN)
    metadata = build_mamba2_metadata(lengths, [0] * len(lengths), list(range(1, len(lengths) + 1)), 0,
                                     CONFIG["chunk_size"])
    serving = side.run_mixer(mixer, flat, _new_cache(mixer), metadata)
    assert_close(got.reshape(-1, HIDDEN), serving, "float32", f"{side.name} {layout}: vs serving prefill")
    want, _, _ = mixer_ref(weights, DIMS, flat, np.concatenate([[0], np.cumsum(lengths)]),
                           CONFIG["rms_norm_eps"])
    assert_close(got.reshape(-1, HIDDEN), want, "float32", f"{side.name} {layout}: vs float64 mixer")


# --- gradients ------------------------------------------------------------------------

def _kernel_grads(side, mixer, hidden: np.ndarray, cotangent: np.ndarray, packing):
    """Gradients of ``sum(mixer(hidden) * cotangent)`` (float32 kernels):
    ``({attribute: float64 numpy}, d hidden)``, and the loss."""
    if side.name == "torch":
        torch = side.torch
        mixer.zero_grad(set_to_none=True)
        x = side.array(hidden, "float32").requires_grad_()
        loss = (mixer(x, **_packing(side, packing)) * side.array(cotangent, "float32")).sum()
        loss.backward()
        grads = {name: side.numpy(p.grad) if p.grad is not None else None
                 for name, p in mixer.named_parameters()}
        assert torch.is_grad_enabled()
        return grads, side.numpy(x.grad), float(loss.detach())
    from flax import nnx
    jax = side.jax
    graphdef, state = nnx.split(mixer)
    cot = side.array(cotangent, "float32")

    def loss_fn(state, x):
        return (nnx.merge(graphdef, state)(x, **packing) * cot).sum()

    loss, (d_state, d_hidden) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(
        state, side.array(hidden, "float32"))
    return ({k: side.numpy(v) for k, v in nnx.to_pure_dict(d_state).items()}, side.numpy(d_hidden),
            float(loss))


def _reference_grads(side, weights: dict, hidden: np.ndarray, cotangent: np.ndarray, lengths):
    """float64 autodiff of ``autodiff_mixer_ref`` in the side's framework:
    ``({checkpoint key: grad}, d hidden)``."""
    cu = np.concatenate([[0], np.cumsum(lengths)])
    flat_shape = (-1, HIDDEN)
    if side.name == "torch":
        torch = side.torch
        leaves = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in weights.items()}
        x = torch.tensor(hidden.reshape(flat_shape), dtype=torch.float64, requires_grad=True)
        out = autodiff_mixer_ref(torch, leaves, DIMS, x, cu, CONFIG["rms_norm_eps"])
        (out * torch.tensor(cotangent.reshape(flat_shape), dtype=torch.float64)).sum().backward()
        return {k: v.grad.numpy() for k, v in leaves.items()}, x.grad.numpy().reshape(hidden.shape)
    jax, jnp = side.jax, side.jnp
    with jax.enable_x64(True):
        def loss(w, x):
            out = autodiff_mixer_ref(jnp, w, DIMS, x, cu, CONFIG["rms_norm_eps"])
            return (out * jnp.asarray(cotangent.reshape(flat_shape))).sum()

        d_w, d_x = jax.grad(loss, argnums=(0, 1))({k: jnp.asarray(v) for k, v in weights.items()},
                                                   jnp.asarray(hidden.reshape(flat_shape)))
        return ({k: np.asarray(v, np.float64) for k, v in d_w.items()},
                np.asarray(d_x, np.float64).reshape(hidden.shape))


def _float32(weights: dict) -> dict:
    """The weights as the float32 mixer holds them (``conv1d.weight`` 2-D), in float64."""
    return {k: (v.reshape(v.shape[0], -1) if k == "conv1d.weight" else v).astype(np.float32).astype(np.float64)
            for k, v in weights.items()}


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("layout", ["seq_idx", pytest.param("cu_seqlens", marks=pytest.mark.slow)])
def test_gradients_of_every_parameter_match_float64_autodiff(framework, layout, rng):
    """Every parameter (biases included) and the input. seq_idx: two rows,
    one split, one crossing a chunk boundary; cu_seqlens: three sequences
    packed in one row, chunks straddling sequence ends."""
    side = SIDES[framework]()
    batch, seqlen, packing = LAYOUTS[layout]
    weights = _float32(random_weights(rng, DIMS, HIDDEN, WIDTH, use_bias=True))
    mixer = _mixer(side, weights)
    hidden = rng.standard_normal((batch, seqlen, HIDDEN)).astype(np.float32).astype(np.float64)
    cotangent = rng.standard_normal((batch, seqlen, HIDDEN)).astype(np.float32).astype(np.float64)
    grads, d_hidden, _ = _kernel_grads(side, mixer, hidden, cotangent, packing)
    want, want_hidden = _reference_grads(side, weights, hidden, cotangent, _lengths(batch, seqlen, packing))
    assert set(grads) == {PARAM_ATTRS[k] for k in want}, "a parameter without a gradient"
    for key, expected in want.items():
        got = grads[PARAM_ATTRS[key]]
        assert got is not None, f"{side.name}: `{PARAM_ATTRS[key]}` got no gradient"
        assert_close(got.reshape(expected.shape), expected, "float32", f"{side.name}: d {key}")
    assert_close(d_hidden, want_hidden, "float32", f"{side.name}: d hidden_states")


@pytest.mark.slow  # five mixer calls and a backward in the interpreters: ~45 s on 2 CPU cores
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_gradient_finite_difference_spot_check(framework, rng):
    """The kernels' directional derivative of the loss along a random
    direction in every parameter and the input equals the central finite
    difference of the kernels' own loss, Richardson-extrapolated from steps
    eps and 2 eps: the plain difference's eps^2 truncation error (1e-3
    relative at eps 1e-3 for some seeds, on CPU and on the H200) cancels,
    while float32 rounding (about 1e-7 |loss terms| / eps) keeps eps from
    being smaller and sets the tolerance (up to 8e-4 of |analytic| seen on
    CPU seeds with a small derivative; a missing gradient term, the bug this
    guards, is off by tens of %)."""
    side = SIDES[framework]()
    batch, seqlen, packing = LAYOUTS["rows"]
    weights = _float32(random_weights(rng, DIMS, HIDDEN, WIDTH, use_bias=True))
    hidden = rng.standard_normal((batch, seqlen, HIDDEN))
    cotangent = rng.standard_normal((batch, seqlen, HIDDEN))
    mixer = _mixer(side, weights)
    grads, d_hidden, _ = _kernel_grads(side, mixer, hidden, cotangent, packing)
    direction = {k: rng.standard_normal(v.shape) * np.sqrt(np.mean(v ** 2)) for k, v in weights.items()}
    direction_hidden = rng.standard_normal(hidden.shape)
    analytic = sum(float((grads[PARAM_ATTRS[k]].reshape(v.shape) * v).sum()) for k, v in direction.items())
    analytic += float((d_hidden * direction_hidden).sum())
    def central_difference(eps):
        losses = []
        for sign in (1, -1):
            moved = _mixer(side, {k: w + sign * eps * direction[k] for k, w in weights.items()})
            out = _train(side, moved, hidden + sign * eps * direction_hidden, packing)
            losses.append(float((out * cotangent).sum()))
        return (losses[0] - losses[1]) / (2 * eps)

    numeric = (4 * central_difference(1e-3) - central_difference(2e-3)) / 3
    print(f"finite difference {numeric}, analytic {analytic}")
    assert abs(numeric - analytic) <= 2e-3 * max(abs(analytic), 1.0), (numeric, analytic)


# --- a few optimizer steps in both frameworks --------------------------------------------

STACK_STEPS, LR, WEIGHT_DECAY = 3, 1e-2, 0.1


def _torch_stack_losses(torch_side, mixer_weights, readout, hidden, target):
    torch = torch_side.torch
    mixers = torch.nn.ModuleList(_mixer(torch_side, w) for w in mixer_weights)
    head = torch.nn.Linear(HIDDEN, readout.shape[0], bias=False).to(torch_side.device)
    with torch.no_grad():
        head.weight.copy_(torch_side.array(readout, "float32"))
    params = list(mixers.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
    x, y = torch_side.array(hidden, "float32"), torch_side.array(target, "float32")
    losses = []
    for _ in range(STACK_STEPS):
        optimizer.zero_grad()
        h = x
        for mixer in mixers:
            h = h + mixer(h)
        loss = ((head(h) - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _jax_stack_losses(jax_side, mixer_weights, readout, hidden, target):
    optax = pytest.importorskip("optax")
    from flax import nnx
    jax, jnp = jax_side.jax, jax_side.jnp
    mixers = [_mixer(jax_side, w) for w in mixer_weights]
    graphdefs, states = zip(*(nnx.split(m) for m in mixers))
    params = (list(states), jnp.asarray(readout, jnp.float32))
    optimizer = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WEIGHT_DECAY)
    opt_state = optimizer.init(params)
    x, y = jnp.asarray(hidden, jnp.float32), jnp.asarray(target, jnp.float32)

    def loss_fn(params):
        states, head = params
        h = x
        for graphdef, state in zip(graphdefs, states):
            h = h + nnx.merge(graphdef, state)(h)
        # full float32 like torch's Linear: XLA's default on a GPU is TF32
        return jnp.mean((jnp.matmul(h, head.T, precision="highest") - y) ** 2)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(STACK_STEPS):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return losses


@pytest.mark.slow
def test_adamw_steps_of_a_mixer_stack_agree_across_frameworks(rng):
    """Two mixers with residuals and a linear readout, MSE loss; torch.optim.AdamW
    and optax.adamw with the same hyper-parameters from the same weights on
    the same data: the same losses step by step (float32)."""
    mixer_weights = [_float32(random_weights(rng, DIMS, HIDDEN, WIDTH, use_bias=True)) for _ in range(2)]
    readout = rng.standard_normal((3, HIDDEN)) / np.sqrt(HIDDEN)
    hidden = rng.standard_normal((2, 20, HIDDEN))
    target = rng.standard_normal((2, 20, 3))
    torch_losses = _torch_stack_losses(TorchSide(), mixer_weights, readout, hidden, target)
    jax_losses = _jax_stack_losses(JaxSide(), mixer_weights, readout, hidden, target)
    assert torch_losses[-1] < torch_losses[0], f"no training progress: {torch_losses}"
    assert_close(np.array(jax_losses), np.array(torch_losses), "float32", "losses, optax vs torch")


# --- A_log, mirrored parameters, refused calls ----------------------------------------------

def _param_names(side, mixer) -> dict:
    if side.name == "torch":
        return {name: tuple(p.shape) for name, p in mixer.named_parameters()}
    from flax import nnx
    return {name: tuple(v.shape) for name, v in nnx.to_pure_dict(nnx.split(mixer)[1]).items()}


def test_a_log_is_the_parameter_and_both_mixers_mirror_each_other(side, rng):
    mixer = _new_mixer(side)
    names = _param_names(side, mixer)
    assert names == _param_names(TorchSide(), _new_mixer(TorchSide())), "parameter names or shapes differ"
    assert "A_log" in names and "A" not in names
    a_log = side.numpy(mixer.A_log[...] if side.name == "jax" else mixer.A_log)
    assert (a_log >= 0).all() and (a_log <= np.log(16) + 1e-6).all(), "init: A in [-16, -1]"
    np.testing.assert_allclose(side.numpy(mixer.A), -np.exp(a_log), rtol=1e-6)
    weights = random_weights(rng, DIMS, HIDDEN, WIDTH, use_bias=True)
    mixer.load_weights(weights)
    saved = mixer.checkpoint_weights()
    np.testing.assert_array_equal(side.numpy(saved["A_log"]), weights["A_log"].astype(np.float32))
    assert str(saved["A_log"].dtype).endswith("float32")


REFUSED = {  # the call's arguments -> the argument the error names
    "cache without metadata": (dict(cache=True), "metadata"),
    "metadata without cache": (dict(metadata=True), "cache"),
    "seq_idx with a cache": (dict(cache=True, metadata=True, seq_idx=True), "seq_idx"),
    "2-D hidden states": (dict(flat=True), "hidden_states"),
    "cu_seqlens with two rows": (dict(cu_seqlens=np.array([0, 5, 20], np.int32)), "cu_seqlens"),
    "cu_seqlens short of the row": (dict(rows=1, cu_seqlens=np.array([0, 5, 19], np.int32)), "cu_seqlens"),
    "decreasing seq_idx": (dict(seq_idx=np.array([[1] * 10 + [0] * 10] * 2, np.int32)), "seq_idx"),
    "both packings": (dict(rows=1, seq_idx=np.zeros((1, 20), np.int32),
                           cu_seqlens=np.array([0, 20], np.int32)), "cu_seqlens"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_calls_name_the_argument(side, case, rng):
    args, name = REFUSED[case]
    mixer = _new_mixer(side)
    rows = args.get("rows", 2)
    hidden = rng.standard_normal((rows * 20, HIDDEN) if args.get("flat") else (rows, 20, HIDDEN))
    x = side.array(hidden, "float32")
    metadata = build_mamba2_metadata([20], [0], [1], 0, CONFIG["chunk_size"])
    cache = _new_cache(mixer)
    packing = {k: v for k, v in args.items() if k in ("seq_idx", "cu_seqlens")}
    if packing.get("seq_idx") is True:
        packing["seq_idx"] = np.zeros((20, 20), np.int32)
    packing = _packing(side, packing)
    if side.name == "torch":
        call = dict(cache=cache if args.get("cache") else None,
                    metadata=metadata if args.get("metadata") else None, **packing)
    else:
        conv, ssm = (side.jnp.asarray(cache.torch(n).cpu().numpy()) for n in ("conv", "ssm"))
        call = dict(conv_state=conv if args.get("cache") else None,
                    ssm_state=ssm if args.get("cache") else None,
                    metadata=metadata if args.get("metadata") else None, **packing)
        if name == "cache":
            name = "conv_state"
    with pytest.raises(ValueError, match=f"MambaMixer2: `{name}`"):
        mixer(x, **call)


def test_jax_traced_packing_is_refused_by_name(rng):
    jax_side = JaxSide()
    mixer = _new_mixer(jax_side)
    hidden = jax_side.array(rng.standard_normal((2, 20, HIDDEN)), "float32")
    seq_idx = np.zeros((2, 20), np.int32)
    with pytest.raises(ValueError, match="MambaMixer2: `seq_idx` must be concrete"):
        jax_side.jax.jit(lambda h, s: mixer(h, seq_idx=s))(hidden, seq_idx)


def test_no_tokens_give_an_empty_output(side):
    mixer = _new_mixer(side)
    assert _train(side, mixer, np.zeros((2, 0, HIDDEN)), {}).shape == (2, 0, HIDDEN)
