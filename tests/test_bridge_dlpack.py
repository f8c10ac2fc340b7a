"""bridge.to_jax / bridge.to_torch / bridge.jax_step_into: zero copies,
verified by pointer; clear errors where sharing would need a copy."""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

import bridge  # noqa: E402
from frameworks import as_float64, assert_close  # noqa: E402

ON_GPU = torch.cuda.is_available() and jax.default_backend() == "gpu"
DEVICES = ["cpu"] + (["cuda"] if ON_GPU else [])
DTYPES = ["float32", "float16", "bfloat16", "int32", "int64"]
SHAPES = [(7,), (3, 5), (2, 3, 4), (2, 1, 3, 5)]


def random_tensor(rng, shape, dtype, device="cpu"):
    values = rng.standard_normal(shape) * 100
    return torch.from_numpy(values).to(device, getattr(torch, dtype))


def x64_for(dtype):
    """int64 crosses to JAX only in x64 mode (otherwise JAX narrows it)."""
    return jax.enable_x64(True) if dtype == "int64" else jax.enable_x64(jax.config.jax_enable_x64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_to_jax_and_back_share_memory(rng, device, shape, dtype):
    tensor = random_tensor(rng, shape, dtype, device)
    before = tensor.clone()
    with x64_for(dtype):
        array = bridge.to_jax(tensor)
        assert array.unsafe_buffer_pointer() == tensor.data_ptr()
        assert array.shape == shape and str(array.dtype) == dtype
        back = bridge.to_torch(array)
    assert back.data_ptr() == tensor.data_ptr() and back.dtype == tensor.dtype
    assert torch.equal(back, before)  # the round trip changes nothing
    np.testing.assert_array_equal(as_float64(array), as_float64(before))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("dtype", DTYPES)
def test_jax_to_torch_shares_memory(rng, device, shape, dtype):
    with x64_for(dtype):
        # An XLA-owned buffer (jnp.asarray on CPU may alias numpy memory).
        array = jax.jit(lambda a: (a * 100).astype(dtype))(jnp.asarray(rng.standard_normal(shape), jnp.float32))
        array = jax.device_put(array, jax.devices("gpu" if device == "cuda" else "cpu")[0])
        tensor = bridge.to_torch(array)
        assert tensor.data_ptr() == array.unsafe_buffer_pointer()
        assert tuple(tensor.shape) == shape and str(tensor.dtype) == f"torch.{dtype}"
        assert bridge.to_jax(tensor).unsafe_buffer_pointer() == tensor.data_ptr()
    np.testing.assert_array_equal(as_float64(tensor), as_float64(array))


def test_mutations_are_visible_both_ways(rng):
    tensor = random_tensor(rng, (4, 6), "float32")
    array = bridge.to_jax(tensor)
    tensor[1, 2] = 12345.0
    assert float(array[1, 2]) == 12345.0
    owned = jax.jit(lambda a: a * 2)(array)
    view = bridge.to_torch(owned)
    view.zero_()
    assert float(jnp.abs(owned).sum()) == 0.0


def test_non_contiguous_raises_naming_the_argument_or_copies_when_allowed(rng):
    tensor = random_tensor(rng, (6, 8), "float32")
    for view in (tensor.t(), tensor[:, ::2]):
        with pytest.raises(ValueError, match="`conv_state` is not contiguous.*copy_ok=True"):
            bridge.to_jax(view, name="conv_state")
        with pytest.warns(bridge.BridgeCopyWarning, match="copied"):
            copied = bridge.to_jax(view, copy_ok=True)
        assert copied.unsafe_buffer_pointer() != tensor.data_ptr()
        np.testing.assert_array_equal(np.asarray(copied), view.numpy())


def test_misaligned_memory_raises_or_copies_when_allowed(rng):
    base = random_tensor(rng, (65,), "float32")
    misaligned = base[1:]  # 4 bytes past a 64-byte boundary; XLA on CPU needs 64
    with pytest.raises(ValueError, match="`state` .*not aligned"):
        bridge.to_jax(misaligned, name="state")
    with pytest.warns(bridge.BridgeCopyWarning):
        copied = bridge.to_jax(misaligned, copy_ok=True)
    np.testing.assert_array_equal(np.asarray(copied), misaligned.numpy())


def test_requires_grad_is_shared_detached(rng):
    weight = random_tensor(rng, (3, 4), "float32").requires_grad_()
    assert bridge.to_jax(weight).unsafe_buffer_pointer() == weight.data_ptr()


@pytest.mark.parametrize("make,match", [
    (lambda: torch.zeros(4, dtype=torch.complex32), "complex32, which JAX cannot take"),
    (lambda: torch.zeros(4, dtype=torch.int64), "int64, which JAX narrows.*jax_enable_x64"),
    (lambda: torch.zeros(4, device="meta"), "is on meta"),
    (lambda: np.zeros(4, np.float32), "must be a torch.Tensor"),
])
def test_to_jax_bad_input(make, match):
    if jax.config.jax_enable_x64 and "int64" in match:
        pytest.skip("x64 mode is on")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: complex32 is experimental
        value = make()
    with pytest.raises(ValueError, match=match):
        bridge.to_jax(value)


@pytest.mark.parametrize("lazy,bit", [
    (lambda t: torch._neg_view(t), "negative"),
    (lambda t: torch.complex(t, t).conj().imag, "negative"),
    (lambda t: torch.complex(t, t).conj(), "conjugate"),
], ids=["neg_view", "imag_of_conj", "conj"])
def test_lazy_sign_bits_are_refused_or_resolved_when_copying_is_allowed(rng, lazy, bit):
    """DLPack drops torch's negative / conjugate bits: sharing such a view
    would hand JAX the un-negated memory."""
    base = random_tensor(rng, (3, 4), "float32")
    view = lazy(base)
    with pytest.raises(ValueError, match=f"`state` has torch's {bit} bit set.*copy_ok=True"):
        bridge.to_jax(view, name="state")
    with pytest.warns(bridge.BridgeCopyWarning, match=f"{bit} bit"):
        copied = bridge.to_jax(view, copy_ok=True)
    np.testing.assert_array_equal(np.asarray(copied), view.resolve_neg().resolve_conj().numpy())


@pytest.mark.skipif(ON_GPU, reason="needs a machine without a GPU")
def test_cuda_tensor_without_jax_gpu_is_a_device_error(monkeypatch):
    monkeypatch.setattr("bridge.dlpack._jax_has_gpu", lambda: False)

    class FakeCuda:  # torch cannot make a CUDA tensor here; only the device is read
        device = torch.device("cuda", 0)

    from bridge.dlpack import _torch_export_problem
    assert "JAX has no GPU backend" in _torch_export_problem(FakeCuda())


@pytest.mark.parametrize("make,match", [
    (lambda: jnp.zeros(4, jnp.int4), "int4, which torch cannot take"),
    (lambda: jnp.zeros(4, jnp.float8_e4m3b11fnuz), "float8_e4m3b11fnuz, which torch cannot take"),
    (lambda: torch.zeros(4), "must be a jax.Array"),
])
def test_to_torch_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        bridge.to_torch(make())


def test_consumed_donated_array_raises_jax_error(rng):
    array = jax.jit(lambda a: a + 0)(jnp.asarray(rng.standard_normal(8), jnp.float32))
    jax.jit(lambda a: a * 2, donate_argnums=0)(array)
    assert array.is_deleted()
    with pytest.raises(RuntimeError, match="deleted"):
        bridge.to_torch(array)
    with pytest.raises(RuntimeError, match="deleted"):
        array + 1


def double_first(state, scale):
    return state.sum(), state * scale


DOUBLE = jax.jit(double_first, donate_argnums=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jax_step_into_updates_the_torch_tensor(rng, dtype):
    state = random_tensor(rng, (3, 4, 8), dtype, DEVICES[-1])
    want = state.float() * 3
    pointer = state.data_ptr()
    step = bridge.jax_step_into([state], DOUBLE, 3.0, state_outputs=(1,))
    assert state.data_ptr() == pointer
    assert_close(state, want, dtype, "state after the step")
    new_state = step.outputs[1]
    # Whichever path ran, the returned state is a view of the torch memory.
    assert new_state.unsafe_buffer_pointer() == pointer
    if ON_GPU:
        assert step.aliased == (True,) and step.num_written_back == 0
    else:  # CPU: XLA does not alias memory torch also holds; the bridge copies and says so
        assert step.aliased == (False,) and step.written_back == (True,)


def test_jax_step_into_refuses_a_lost_alias_without_touching_the_tensor(rng):
    state = random_tensor(rng, (2, 8), "float32")
    before = state.clone()
    undonated = jax.jit(double_first)  # no donation: XLA cannot write in place
    with pytest.raises(bridge.AliasLostError, match="allow_writeback=True"):
        bridge.jax_step_into([state], undonated, 5.0, state_outputs=(1,), allow_writeback=False)
    assert torch.equal(state, before)


def test_jax_step_into_rejects_a_state_of_the_wrong_shape(rng):
    state = random_tensor(rng, (2, 8), "float32")
    before = state.clone()
    with pytest.raises(ValueError, match=r"output 1 is float32\(2, 4\).*torch_states\[0\]"):
        bridge.jax_step_into([state], lambda s: (s, s[:, :4]), state_outputs=(1,))
    assert torch.equal(state, before)


@pytest.mark.parametrize("states,state_outputs,match", [
    (lambda s: [s, s], (0, 1), "`torch_states` entries 0 and 1 share memory"),
    (lambda s: [s[1:], s[:2]], (0, 1), "`torch_states` entries 0 and 1 share memory"),
    (lambda s: [s[:1], s[1:]], (1, 1), r"`state_outputs` \[1, 1\] names an output twice"),
    (lambda s: [s], (-1,), r"`state_outputs\[0\]` must be >= 0"),
])
def test_jax_step_into_refuses_ambiguous_states_before_the_step(rng, states, state_outputs, match):
    state = random_tensor(rng, (3, 16), "float32")  # 64-byte rows: every row slice is XLA-aligned
    before = state.clone()
    ran = []
    with pytest.raises(ValueError, match=f"jax_step_into: {match}"):
        bridge.jax_step_into(states(state), lambda *s: ran.append(1) or s, state_outputs=state_outputs)
    assert not ran and torch.equal(state, before)


@pytest.mark.skipif(not ON_GPU, reason="CUDA streams")
@pytest.mark.parametrize("direction", ["torch->jax", "jax->torch"])
def test_in_flight_writes_are_seen_by_the_other_framework(direction):
    n = 1 << 26  # 256 MB of float32: long enough to still be running when handed over
    if direction == "torch->jax":
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            tensor = torch.empty(n, device="cuda")
            tensor.fill_(1.0)
            for _ in range(20):
                tensor.mul_(1.5).div_(1.5).add_(1.0)  # ends at 21.0
            array = bridge.to_jax(tensor)  # handshake on the current (side) stream
        assert float(jnp.min(array)) == 21.0 and float(jnp.max(array)) == 21.0
    else:
        array = jax.jit(lambda: jax.lax.fori_loop(0, 20, lambda i, a: a + 1.0, jnp.ones(n)))()
        tensor = bridge.to_torch(array)  # no block_until_ready: the step may still run
        assert tensor.min().item() == 21.0 and tensor.max().item() == 21.0
