"""MambaStateCache: one allocation, torch and JAX views of it, in-place JAX
steps, prefix-caching copies, and a decode that hands over between frameworks."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy
torch_impl = pytest.importorskip("torch_impl")
jax_impl = pytest.importorskip("jax_impl")

import bridge  # noqa: E402
from bridge import MambaStateCache, MambaStateShapeCalculator  # noqa: E402
from bridge.spec.state_shapes import CONV_STATE_LAYOUT_ENV  # noqa: E402
from frameworks import assert_close  # noqa: E402
from ssu_cases import SsuCase, make_inputs  # noqa: E402

ON_GPU = torch.cuda.is_available() and jax.default_backend() == "gpu"
DEVICE = "cuda" if ON_GPU else "cpu"
HEADS, HEAD_DIM, DSTATE, GROUPS, CONV = 4, 16, 16, 2, 4


def mamba2_shapes(num_spec=0):
    return MambaStateShapeCalculator.mamba2_state_shape(
        tp_world_size=1, intermediate_size=HEADS * HEAD_DIM, n_groups=GROUPS, num_heads=HEADS,
        head_dim=HEAD_DIM, state_size=DSTATE, conv_kernel=CONV, num_spec=num_spec)


def fill(cache, rng):
    for layer in range(cache.num_layers):
        for name in cache.names:
            tensor = cache.torch(name, layer)
            tensor.copy_(torch.from_numpy(rng.standard_normal(tuple(tensor.shape))))


@pytest.mark.parametrize("owner", ["torch", "jax"])
def test_views_share_one_allocation(rng, owner):
    cache = MambaStateCache(mamba2_shapes(), ["float32", "bfloat16"], num_blocks=5, num_layers=2,
                            owner=owner, device=DEVICE)
    fill(cache, rng)
    assert cache.torch("conv").shape == (5, CONV - 1, HEADS * HEAD_DIM + 2 * GROUPS * DSTATE)
    assert cache.torch("ssm", 1).shape == (5, HEADS, HEAD_DIM, DSTATE)
    assert cache.torch("ssm", 1).dtype == torch.bfloat16
    for layer in range(2):
        for name in cache.names:
            tensor, array = cache.torch(name, layer), cache.jax(name, layer)
            assert array.unsafe_buffer_pointer() == tensor.data_ptr()
            assert cache.torch(name, layer) is tensor  # the same object every call
    pointers = {t.data_ptr() for t in cache._tensors.values()}
    assert len(pointers) == 4  # one buffer per (layer, state)
    # Mutations through torch are seen by a JAX view taken earlier, and the reverse.
    array = cache.jax("ssm", 1)
    cache.torch("ssm", 1)[2, 1, 3, 4] = 7.0
    assert float(array[2, 1, 3, 4]) == 7.0
    bridge.to_torch(array)[0] = 0.5
    assert bool((cache.torch("ssm", 1)[0] == 0.5).all())


def test_views_outlive_the_cache(rng):
    cache = MambaStateCache(mamba2_shapes(), "float32", num_blocks=3, owner="jax", device=DEVICE)
    fill(cache, rng)
    tensor, array = cache.torch("ssm"), cache.jax("conv")
    want_ssm, want_conv = tensor.clone(), np.asarray(array).copy()
    del cache
    import gc
    gc.collect()
    _ = [torch.randn(100_000) for _ in range(8)]  # reuse freed memory, if any was freed
    assert torch.equal(tensor, want_ssm)
    np.testing.assert_array_equal(np.asarray(array), want_conv)


@pytest.mark.parametrize("kwargs,match", [
    (dict(names=("conv",)), "`names`"),
    (dict(dtypes=["float32"]), "`dtypes` has 1 entries"),
    (dict(dtypes="float33"), "not a dtype name"),
    (dict(owner="numpy"), "`owner`"),
    (dict(num_blocks=0), "`num_blocks` must be >= 1"),
    (dict(num_blocks=2.5), "`num_blocks` must be an integer"),
    (dict(device="tpu"), "`device` 'tpu' must be 'cpu' or 'cuda"),
    pytest.param(dict(device="cuda"), "`device` 'cuda'",
                 marks=pytest.mark.skipif(ON_GPU, reason="needs a machine without a GPU")),
])
def test_bad_cache_arguments(kwargs, match):
    args = dict(state_shapes=mamba2_shapes(), dtypes="float32", num_blocks=4) | kwargs
    with pytest.raises(ValueError, match=match):
        MambaStateCache(**args)


def test_write_checks_shapes_and_takes_either_framework(rng):
    cache = MambaStateCache(mamba2_shapes(), "float32", num_blocks=6, device=DEVICE)
    values = rng.standard_normal((2, HEADS, HEAD_DIM, DSTATE)).astype(np.float32)
    cache.write("ssm", jnp.asarray(values), block_ids=[4, 1])
    np.testing.assert_array_equal(cache.torch("ssm")[[4, 1]].cpu().numpy(), values)
    cache.write("ssm", values[::-1], block_ids=np.array([0, 5]))  # numpy values and ids
    np.testing.assert_array_equal(cache.torch("ssm")[[5, 0]].cpu().numpy(), values)
    with pytest.raises(ValueError, match="`values` must be a torch, jax or numpy array, got list"):
        cache.write("ssm", values.tolist(), block_ids=[4, 1])
    with pytest.raises(ValueError, match=r"`values` has shape \(2, 4, 16, 15\), expected \(2, 4, 16, 16\)"):
        cache.write("ssm", torch.zeros(2, HEADS, HEAD_DIM, DSTATE - 1), block_ids=[1, 2])
    with pytest.raises(ValueError, match="`name` 'ssn'"):
        cache.torch("ssn")
    with pytest.raises(ValueError, match="`layer` 1"):
        cache.jax("ssm", layer=1)


@pytest.mark.parametrize("dtype", ["float64", "int64"])
def test_jax_owned_64_bit_cache_needs_x64(dtype):
    """Without x64 JAX would allocate 32 bits under a 64-bit name."""
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match=f"`dtypes` holds {dtype}.*jax_enable_x64"):
            MambaStateCache(mamba2_shapes(), dtype, num_blocks=2, owner="jax", device=DEVICE)
    with jax.enable_x64(True):
        cache = MambaStateCache(mamba2_shapes(), dtype, num_blocks=2, owner="jax", device=DEVICE)
        assert cache.torch("ssm").dtype == getattr(torch, dtype)
        assert cache.jax("ssm").dtype == dtype


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("block_ids,match", [
    ([2, 2], r"`block_ids` names block\(s\) \[2\] more than once"),
    ([1, -1], r"`block_ids\[1\]` = -1 is outside the state's 4 blocks"),
    ([1, 4], r"`block_ids\[1\]` = 4 is outside"),
    ([1, 2.0], r"`block_ids\[1\]` must be an integer"),
    (np.int64(1), r"`block_ids` must be a sequence or 1-D array of integers, got 1"),
    ("complex", r"`values` is complex64; state 'ssm' is float32"),
])
def test_write_refuses_bad_ids_and_complex_values_before_writing(rng, framework, block_ids, match):
    cache = MambaStateCache(mamba2_shapes(), "float32", num_blocks=4, device=DEVICE)
    fill(cache, rng)
    before = cache.torch("ssm").clone()
    values = rng.standard_normal((2, HEADS, HEAD_DIM, DSTATE)).astype(np.float32)
    if block_ids == "complex":
        block_ids, values = [0, 1], values + 1j * values  # complex64
    values = torch.from_numpy(values).to(DEVICE) if framework == "torch" else jnp.asarray(values)
    with pytest.raises(ValueError, match=f"MambaStateCache.write: {match}"):
        cache.write("ssm", values, block_ids=block_ids)
    assert torch.equal(cache.torch("ssm"), before)


def test_a_resized_cache_tensor_is_refused(rng):
    """resize_ moves torch's storage under the JAX views; the cache notices."""
    cache = MambaStateCache(mamba2_shapes(), "float32", num_blocks=3, device=DEVICE)
    cache.jax("ssm")
    tensor = cache.torch("ssm")
    tensor.resize_(2 * tensor.numel())
    for call in (lambda: cache.jax("ssm"), lambda: cache.torch("ssm"), cache.claim_for_torch,
                 lambda: cache.write("ssm", torch.zeros(1, HEADS, HEAD_DIM, DSTATE), [0]),
                 lambda: cache.run_jax_inplace(lambda s: (None, s))):
        with pytest.raises(RuntimeError, match="'ssm' of layer 0 was resized"):
            call()
    cache.jax("conv")  # the other buffers are fine


SSU_STEP = jax.jit(jax_impl.selective_state_update, donate_argnums=0,
                   static_argnames=("dt_softplus", "null_block_id"))


def decode_inputs(rng, slots, state_dtype):
    """Fresh decode-step inputs (numpy) for sequences in cache blocks ``slots``."""
    case = SsuCase(batch=len(slots), nheads=HEADS, dim=HEAD_DIM, dstate=DSTATE, ngroups=GROUPS,
                   indices="plain", state_dtype=state_dtype)
    arrays, dtypes, options = make_inputs(case, rng)
    del arrays["state"], dtypes["state"]
    arrays["state_batch_indices"] = slots
    return arrays, dtypes, options


def torch_inputs(arrays, dtypes):
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(DEVICE, getattr(torch, dtypes[k]))
            for k, v in arrays.items()}


@pytest.mark.parametrize("owner", ["torch", "jax"])
def test_jax_inplace_step_on_the_shared_cache(rng, owner):
    cache = MambaStateCache(mamba2_shapes(), "float32", num_blocks=6, owner=owner, device=DEVICE)
    fill(cache, rng)
    slots = np.array([3, 1, 5])
    arrays, dtypes, options = decode_inputs(rng, slots, "float32")
    inputs = torch_inputs(arrays, dtypes)
    want_state = cache.torch("ssm").clone()
    want_out = torch_impl.selective_state_update(want_state, **{k: v.clone() for k, v in inputs.items()},
                                                 **options)
    pointer = cache.torch("ssm").data_ptr()
    stale_view = cache.jax("ssm")
    jax_inputs = {k: bridge.to_jax(v) for k, v in inputs.items()}
    step = cache.run_jax_inplace(SSU_STEP, **jax_inputs, **options)
    assert cache.torch("ssm").data_ptr() == pointer
    assert_close(cache.torch("ssm"), want_state, "float32", "cache after the JAX step")
    assert_close(step.outputs[0], want_out, "float32", "out of the JAX step")
    assert step.outputs[1].unsafe_buffer_pointer() == pointer
    if ON_GPU:  # XLA wrote into the torch memory: no copy
        assert step.aliased == (True,) and (cache.steps_aliased, cache.steps_written_back) == (1, 0)
    else:  # CPU: the bridge copied the result in, and says so
        assert step.written_back == (True,) and (cache.steps_aliased, cache.steps_written_back) == (0, 1)
    # A view taken before the step still reads the cache (it was not donated).
    np.testing.assert_array_equal(np.asarray(stale_view), cache.torch("ssm").cpu().numpy())


def test_a_consumed_view_cannot_be_reused(rng):
    cache = MambaStateCache(mamba2_shapes(), "float32", num_blocks=2, device=DEVICE)
    view = cache.jax("ssm")
    jax.jit(lambda s: s * 2, donate_argnums=0)(view)
    assert view.is_deleted()
    with pytest.raises(RuntimeError, match="deleted"):
        np.asarray(view)
    assert cache.jax("ssm").unsafe_buffer_pointer() == cache.torch("ssm").data_ptr()  # a fresh view


def test_jax_steps_chain_without_imports_until_torch_takes_the_cache(rng, monkeypatch):
    """A step whose new state is the cache's memory (here: a step that
    returns its input, so the pointers match on CPU too) feeds the next step
    directly; ``torch()``, a torch in-place op, or a consumed view make the
    next step import afresh."""
    cache = MambaStateCache(mamba2_shapes(), "float32", num_blocks=3, device=DEVICE)
    fill(cache, rng)
    imports, seen = [], []
    real_to_jax = bridge.state_cache.to_jax
    monkeypatch.setattr(bridge.state_cache, "to_jax",
                        lambda *a, **k: imports.append(1) or real_to_jax(*a, **k))

    def identity_step(state):
        seen.append(state)
        return None, state

    def step(**options):
        imports.clear()
        result = cache.run_jax_inplace(identity_step, **options)
        assert result.aliased == (True,) and result.outputs[1] is seen[-1]
        return len(imports)

    assert step() == 1  # the first step imports
    assert step() == 0 and seen[-1] is seen[-2]  # the next one takes the previous new state
    tensor = cache.torch("ssm")
    assert step() == 1  # torch() ended the chain
    assert step() == 0
    cache.claim_for_torch()
    assert step() == 1  # so did claim_for_torch() (every state at once)
    assert step() == 0
    tensor.add_(1.0)  # a torch in-place op through a kept reference
    assert step() == 1
    jax.jit(lambda a: a + 1, donate_argnums=0)(seen[-1])  # the chain's view consumed elsewhere
    assert step() == 1
    assert step(order_torch=False) == 0
    assert cache.torch("ssm").data_ptr() == tensor.data_ptr()

    def consume_then_fail(state):
        jax.jit(lambda a: a + 1, donate_argnums=0)(state)
        raise RuntimeError("step failed")

    assert step(order_torch=False) == 1
    with pytest.raises(RuntimeError, match="step failed"):
        cache.run_jax_inplace(consume_then_fail)
    cache.torch("ssm")  # orders torch although the view it would wait on is gone
    assert step() == 1  # and the next step imports afresh


@pytest.mark.skipif(not ON_GPU, reason="CUDA streams")
@pytest.mark.parametrize("order_torch", [True, False])
def test_torch_sees_chained_jax_steps_still_in_flight(order_torch):
    """Long in-place JAX steps chained on a torch-owned cache; torch reads at
    once, through the kept reference (ordered after every step) or through
    ``cache.torch()`` (ordered on access)."""
    blocks, shape = 64, (1 << 20,)  # 256 MB of float32 per state
    cache = MambaStateCache([(1, 1), shape], "float32", num_blocks=blocks, device="cuda")
    kept = cache.torch("ssm")
    kept.fill_(1.0)
    step_fn = jax.jit(lambda state: (None, jax.lax.fori_loop(0, 10, lambda i, a: a + 1.0, state)),
                      donate_argnums=0)
    for _ in range(3):
        cache.run_jax_inplace(step_fn, order_torch=order_torch)
    tensor = kept if order_torch else cache.torch("ssm")
    assert tensor.min().item() == 31.0 and tensor.max().item() == 31.0
    assert cache.steps_aliased == 3


@pytest.mark.parametrize("owner,state_dtype", [("torch", "float32"), ("jax", "float32"),
                                               ("torch", "bfloat16")])
def test_decode_hands_over_between_frameworks(rng, owner, state_dtype):
    """Decode steps alternate torch (Triton, on the torch view) and JAX
    (Pallas, donated, on the jax view) over one cache; they equal a run of
    torch steps alone."""
    num_steps = 4
    cache = MambaStateCache(mamba2_shapes(), state_dtype, num_blocks=7, owner=owner, device=DEVICE)
    fill(cache, rng)
    solo_state = cache.torch("ssm").clone()
    pointer = cache.torch("ssm").data_ptr()
    slots = rng.permutation(np.arange(1, 7))[:3]
    for t in range(num_steps):
        arrays, dtypes, options = decode_inputs(rng, slots, state_dtype)
        inputs = torch_inputs(arrays, dtypes)
        solo_out = torch_impl.selective_state_update(solo_state, **{k: v.clone() for k, v in inputs.items()},
                                                     **options)
        if t % 2 == 0:
            shared_out = torch_impl.selective_state_update(cache.torch("ssm"), **inputs, **options)
        else:
            step = cache.run_jax_inplace(SSU_STEP, **{k: bridge.to_jax(v) for k, v in inputs.items()},
                                         **options)
            shared_out = bridge.to_torch(step.outputs[0])
        assert cache.torch("ssm").data_ptr() == pointer
        assert_close(shared_out, solo_out, state_dtype, f"out of step {t}")
    assert_close(cache.torch("ssm"), solo_state, state_dtype, "final state")
    assert cache.steps_aliased + cache.steps_written_back == num_steps // 2


@pytest.fixture(params=["SD", "DS"])
def conv_layout(request, monkeypatch):
    monkeypatch.setenv(CONV_STATE_LAYOUT_ENV, request.param)
    return request.param


def test_copy_specs_address_the_right_elements(rng, conv_layout):
    num_spec = 2
    cache = MambaStateCache(mamba2_shapes(num_spec), "float32", num_blocks=8, device=DEVICE)
    fill(cache, rng)
    conv, ssm = cache.torch("conv"), cache.torch("ssm")
    block_ids = [5, 2, 7, 3]
    for accepted in range(1, num_spec + 2):
        spec = bridge.get_temporal_copy_spec(ssm, block_ids, 1, accepted)
        source = ssm[block_ids[1 + accepted - 1]]
        assert (spec.start_addr, spec.num_elements) == (source.data_ptr(), source.numel())
        # The same addresses from the JAX view of the same memory.
        assert bridge.get_temporal_copy_spec(cache.jax("ssm"), block_ids, 1, accepted) == spec
        if conv_layout == "DS" and accepted > 1:
            with pytest.raises(NotImplementedError, match="DS conv state layout"):
                bridge.get_conv_copy_spec(conv, block_ids, 1, accepted)
            continue
        spec = bridge.get_conv_copy_spec(conv, block_ids, 1, accepted)
        source = conv[2] if conv_layout == "DS" else conv[2, accepted - 1:]
        assert (spec.start_addr, spec.num_elements) == (source.data_ptr(), source.numel())
        assert bridge.get_conv_copy_spec(cache.jax("conv"), block_ids, 1, accepted) == spec


def test_block_copy_applies_specs_in_either_framework(rng):
    cache = MambaStateCache(mamba2_shapes(num_spec=1), "float32", num_blocks=6, device=DEVICE)
    fill(cache, rng)
    conv = cache.torch("conv")
    before = conv.cpu().numpy().copy()
    block_ids = [1, 4]
    specs = [bridge.get_conv_copy_spec(conv, block_ids, 0, 2),  # block 1 from position 1
             bridge.get_conv_copy_spec(conv, block_ids, 1, 1)]  # all of block 4
    dst = [4, 2]  # block 4 is both a source and a destination: sources are read first
    want = before.copy()
    flat = want.reshape(len(want), -1)
    tail = before[1, 1:].ravel()
    flat[4, :tail.size] = tail
    flat[2] = before[4].ravel()

    jax_result = bridge.copy_blocks(cache.jax("conv"), specs, dst)  # functional
    np.testing.assert_array_equal(np.asarray(jax_result), want)
    np.testing.assert_array_equal(conv.cpu().numpy(), before)  # the JAX copy left the cache alone
    cache.copy_blocks("conv", specs, dst)  # in place through the torch view
    np.testing.assert_array_equal(conv.cpu().numpy(), want)
    with pytest.raises(ValueError, match=r"`specs\[0\]`.*does not lie inside `state`"):
        bridge.copy_blocks(cache.torch("ssm"), specs[:1], [0])
    with pytest.raises(ValueError, match=r"`dst_block_ids\[0\]` = 6"):
        cache.copy_blocks("conv", specs[:1], [6])


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("call,match", [
    (lambda state: bridge.get_temporal_copy_spec(state, [1, -2], 0, 2), r"`block_ids\[1\]` = -2"),
    (lambda state: bridge.get_temporal_copy_spec(state, [1, 2], -1, 2), "`cur_block_idx` must be >= 0"),
    (lambda state: bridge.get_temporal_copy_spec(state, [1, 2], 0, 0), "`num_accepted_tokens` must be >= 1"),
    (lambda state: bridge.get_temporal_copy_spec(state, [1, 2], 1, 2), "index 2 is out of range"),
    (lambda state: bridge.get_temporal_copy_spec(state, [1, 2.5], 0, 2),
     r"`block_ids\[1\]` must be an integer"),
    (lambda state: bridge.get_conv_copy_spec(state, [1, 2], 0, 0), "`num_accepted_tokens` must be >= 1"),
    (lambda state: bridge.copy_blocks(state, [bridge.get_temporal_copy_spec(state, [1], 0, 1)], [-1]),
     r"copy_blocks: `dst_block_ids\[0\]` = -1 is outside the state's 4 blocks"),
    (lambda state: bridge.copy_blocks(state, [bridge.get_temporal_copy_spec(state, [1, 2], i, 1)
                                              for i in range(2)], [3, 3]),
     r"copy_blocks: `dst_block_ids` names block\(s\) \[3\] more than once"),
    (lambda state: bridge.copy_blocks(state, [bridge.MambaCopySpec(state_address(state), -1)], [0]),
     r"`specs\[0\].num_elements` must be >= 0"),
])
def test_block_ids_are_checked_never_wrapped(rng, framework, call, match):
    """Negative, out-of-range, non-integer and duplicate destination ids are
    refused by name, for torch and JAX states, and nothing is written."""
    cache = MambaStateCache(mamba2_shapes(), "float32", num_blocks=4, device=DEVICE)
    fill(cache, rng)
    before = cache.torch("conv").clone()
    state = cache.torch("conv") if framework == "torch" else cache.jax("conv")
    with pytest.raises(ValueError, match=match):
        call(state)
    assert torch.equal(cache.torch("conv"), before)


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_block_copies_stay_inside_an_interior_state(rng, framework):
    """A state that is an interior slice of a larger buffer: specs that
    address the guard blocks around it, or run past its end, are refused;
    a valid copy leaves the guards bitwise unchanged."""
    values = rng.standard_normal((8, 3, 5)).astype(np.float32)
    buffer = torch.from_numpy(values.copy()) if framework == "torch" else values.copy()
    state = buffer[2:6]  # 4 blocks; blocks 0-1 and 6-7 of the buffer are guards
    end = bridge.get_temporal_copy_spec(state, [3], 0, 1)
    for spec in (bridge.get_temporal_copy_spec(buffer, [1], 0, 1),
                 bridge.get_temporal_copy_spec(buffer, [6], 0, 1),
                 bridge.MambaCopySpec(end.start_addr + 4, end.num_elements)):
        with pytest.raises(ValueError, match=r"`specs\[0\]`.*does not lie inside `state`"):
            bridge.copy_blocks(state, [spec], [0])
    bridge.copy_blocks(state, [bridge.get_temporal_copy_spec(state, [0], 0, 1)], [3])
    want = values.copy()
    want[5] = values[2]
    np.testing.assert_array_equal(np.asarray(buffer), want)


def state_address(state):
    return state.data_ptr() if hasattr(state, "data_ptr") else state.unsafe_buffer_pointer()


def prefill_inputs(rng, lengths):
    """numpy inputs of a chunked-scan prefill over packed sequences."""
    T = int(sum(lengths))
    r = lambda *shape, scale=1.0: rng.standard_normal(shape) * scale  # noqa: E731
    arrays = dict(x=r(T, HEADS, HEAD_DIM), dt=r(T, HEADS, scale=0.5), A=-np.exp(r(HEADS, scale=0.5)),
                  B=r(T, GROUPS, DSTATE), C=r(T, GROUPS, DSTATE), D=r(HEADS), z=r(T, HEADS, HEAD_DIM),
                  dt_bias=r(HEADS, scale=0.5))
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def prefill_into(cache, framework, arrays, lengths, slots, chunk_size=16):
    """Prefill with ``framework``'s chunked scan; its final states go to ``slots``."""
    from bridge.spec.ssd_contract import chunk_metadata

    cu_seqlens = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    chunks = chunk_metadata(cu_seqlens, chunk_size)
    meta = dict(cu_seqlens=cu_seqlens, cu_chunk_seqlens=chunks.cu_chunk_seqlens,
                seq_idx=chunks.seq_idx, last_chunk_indices=chunks.last_chunk_indices)
    if framework == "torch":
        inputs = torch_inputs(arrays | meta, {k: str(v.dtype) for k, v in (arrays | meta).items()})
        out = torch.empty_like(inputs["x"])
        states = torch_impl.mamba_chunk_scan_combined_varlen(
            chunk_size=chunk_size, out=out, dt_softplus=True, state_dtype=cache.torch("ssm").dtype, **inputs)
    else:
        _, states = jax_impl.mamba_chunk_scan_combined_varlen(
            chunk_size=chunk_size, dt_softplus=True, state_dtype=str(cache.torch("ssm").dtype)[6:],
            **{k: jnp.asarray(v) for k, v in (arrays | meta).items()})
    cache.write("ssm", states, block_ids=slots)


def decode_on(cache, framework, inputs, options):
    if framework == "torch":
        return torch_impl.selective_state_update(cache.torch("ssm"), **inputs, **options)
    step = cache.run_jax_inplace(SSU_STEP, **{k: bridge.to_jax(v) for k, v in inputs.items()}, **options)
    return bridge.to_torch(step.outputs[0])


@pytest.mark.parametrize("prefill,decode", [("torch", "jax"), ("jax", "torch")])
def test_prefill_in_one_framework_decode_in_the_other(rng, prefill, decode):
    """Prefill (chunked scan) with one framework into the shared cache, then
    decode steps with the other on the same memory; equals doing both in the
    decoding framework."""
    lengths, slots, num_steps = [5, 37], np.array([3, 1]), 2  # 1 and 3 chunks
    arrays = prefill_inputs(rng, lengths)
    steps = [decode_inputs(rng, slots, "float32") for _ in range(num_steps)]
    results = {}
    for run in ((prefill, decode), (decode, decode)):
        cache = MambaStateCache(mamba2_shapes(), "float32", num_blocks=5, device=DEVICE)
        pointer = cache.torch("ssm").data_ptr()
        prefill_into(cache, run[0], arrays, lengths, slots)
        written = cache.torch("ssm").abs().amax(dim=(1, 2, 3)).cpu().numpy()
        assert (written[slots] > 0).all() and (np.delete(written, slots) == 0).all()
        outs = [decode_on(cache, run[1], torch_inputs(a, d), o).clone() for a, d, o in steps]
        assert cache.torch("ssm").data_ptr() == pointer
        results[run] = outs, cache.torch("ssm").clone()
    (mixed_outs, mixed_state), (solo_outs, solo_state) = results.values()
    for t, (mixed, solo) in enumerate(zip(mixed_outs, solo_outs)):
        assert_close(mixed, solo, "float32", f"decode step {t} after {prefill} prefill")
    assert_close(mixed_state, solo_state, "float32", "final state")
