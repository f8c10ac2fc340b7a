"""The torch ops under torch.compile(fullgraph=True) and CUDA-graph capture
match eager. The state update also runs through torch.compile's
``aot_eager`` backend and ``torch.library.opcheck`` on CPU (its op is opaque
to the compiler, so Triton's interpreter runs it); the rest needs CUDA."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch_impl = pytest.importorskip("torch_impl")  # before triton: sets interpreter mode

from bridge.spec.ssd_contract import chunk_metadata  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="inductor and CUDA graphs need a GPU")
DEVICE = torch_impl.platform.default_device()
S, H, P, N, G = 6, 4, 16, 16, 2          # slots, heads, headdim, dstate, groups
CONV_DIM, WIDTH, HIDDEN = 32, 4, 32
CHUNK, PREFILL_LENS = 16, (20, 28)


def _tensors(rng):
    """Fresh inputs of every op, float32 on the kernel device (int32 indices)."""
    def r(*shape, scale=1.0):
        return torch.tensor(rng.standard_normal(shape) * scale, dtype=torch.float32, device=DEVICE)

    def i32(values):
        return torch.tensor(values, dtype=torch.int32, device=DEVICE)

    T = sum(PREFILL_LENS)
    cu = np.concatenate([[0], np.cumsum(PREFILL_LENS)])
    meta = chunk_metadata(cu, CHUNK)
    return dict(
        # selective_state_update: 3 decode tokens on slots 1..3
        ssm_state=r(S, H, P, N), x=r(3, H, P), dt=r(3, H, scale=0.5), A=-torch.exp(r(H, scale=0.5)),
        B=r(3, G, N), C=r(3, G, N), D=r(H), dt_bias=r(H, scale=0.5), z=r(3, H, P),
        slots=i32([1, 2, 3]), ssu_out=torch.full((3, H, P), float("nan"), device=DEVICE),
        # mamba_chunk_scan_combined_varlen: two prefill sequences
        px=r(T, H, P), pdt=r(T, H, scale=0.5), pB=r(T, G, N), pC=r(T, G, N),
        cu_seqlens=i32(cu), cu_chunk_seqlens=i32(meta.cu_chunk_seqlens), seq_idx=i32(meta.seq_idx),
        last_chunk_indices=i32(meta.last_chunk_indices),
        ssd_out=torch.full((T, H, P), float("nan"), device=DEVICE),
        # causal_conv1d_fn / _update: the prefill, then one decode token per slot
        conv_x=r(T, CONV_DIM).T, conv_weight=r(CONV_DIM, WIDTH), conv_bias=r(CONV_DIM),
        conv_states=r(S, CONV_DIM, WIDTH - 1), has_initial_state=torch.tensor([True, False], device=DEVICE),
        conv_slots=i32([4, 5]), conv_x_decode=r(3, CONV_DIM),
        # rms_norm_gated
        norm_x=r(T, HIDDEN), norm_weight=r(HIDDEN), norm_z=r(T, HIDDEN),
    )


def _ssu(t):
    return torch_impl.selective_state_update(
        t["ssm_state"], t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["dt_bias"], t["z"],
        dt_softplus=True, state_batch_indices=t["slots"], out=t["ssu_out"])


class Step(torch.nn.Module):
    """One call of every op; returns their outputs (the states are updated in place)."""

    def forward(self, t):
        ssu_out = _ssu(t)
        ssd_states = torch_impl.mamba_chunk_scan_combined_varlen(
            t["px"], t["pdt"], t["A"], t["pB"], t["pC"], CHUNK, t["cu_seqlens"], t["cu_chunk_seqlens"],
            t["last_chunk_indices"], t["seq_idx"], t["ssd_out"], D=t["D"], dt_bias=t["dt_bias"],
            dt_softplus=True)
        conv_out = torch_impl.causal_conv1d_fn(
            t["conv_x"], t["conv_weight"], t["conv_bias"], t["conv_states"], t["cu_seqlens"],
            t["conv_slots"], t["has_initial_state"], "silu")
        conv_decode = torch_impl.causal_conv1d_update(
            t["conv_x_decode"], t["conv_states"], t["conv_weight"], t["conv_bias"], "silu",
            conv_state_indices=t["slots"])
        normed = torch_impl.rms_norm_gated(t["norm_x"], t["norm_weight"], t["norm_z"], group_size=16)
        return ssu_out, ssd_states, conv_out, conv_decode, normed


def _clone(t):
    return {k: v.clone() for k, v in t.items()}


def _assert_same(got, want, what):
    for name in want:
        np.testing.assert_allclose(got[name].double().cpu().numpy(), want[name].double().cpu().numpy(),
                                   rtol=1e-5, atol=1e-5, equal_nan=True, err_msg=f"{what}: {name}")


def test_ssu_op_passes_opcheck(rng):
    """Schema (mutated arguments), fake implementation and dispatch of the op."""
    t = _tensors(rng)
    args = (t["ssm_state"], t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["dt_bias"], t["z"],
            t["ssu_out"], t["slots"], None, None, None, None, True, 0, 10, False)
    torch.library.opcheck(torch.ops.mamba_twin.selective_state_update.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_ssu_fullgraph_matches_eager(rng):
    """No graph break in the state update's Python (checks, config, launch)."""
    t = _tensors(rng)
    backend = "inductor" if CUDA else "aot_eager"
    torch._dynamo.reset()
    compiled = torch.compile(_ssu, fullgraph=True, backend=backend)
    eager_inputs, compiled_inputs = _clone(t), _clone(t)
    want = _ssu(eager_inputs)
    got = compiled(compiled_inputs)
    assert torch.isfinite(want).all()
    _assert_same({"out": got, "state": compiled_inputs["ssm_state"]},
                 {"out": want, "state": eager_inputs["ssm_state"]}, "compiled ssu")


@needs_cuda
def test_module_fullgraph_matches_eager(rng):
    t = _tensors(rng)
    torch._dynamo.reset()
    compiled = torch.compile(Step(), fullgraph=True)
    eager_inputs, compiled_inputs = _clone(t), _clone(t)
    want = Step()(eager_inputs)
    got = compiled(compiled_inputs)
    names = ("ssu_out", "ssd_states", "conv_out", "conv_decode", "normed")
    _assert_same(dict(zip(names, got)), dict(zip(names, want)), "compiled step outputs")
    _assert_same(compiled_inputs, eager_inputs, "compiled step states")


@needs_cuda
def test_ssu_cuda_graph_replay_matches_eager(rng):
    static = _tensors(rng)
    initial_state = static["ssm_state"].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _ssu(_clone(static))  # compile the kernel before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _ssu(static)
    for _ in range(2):  # fresh inputs in the static buffers, then replay
        fresh = _tensors(rng)
        fresh["ssm_state"] = initial_state.clone()
        want_inputs = _clone(fresh)
        want = _ssu(want_inputs)
        for name, tensor in fresh.items():
            static[name].copy_(tensor)
        graph.replay()
        torch.cuda.synchronize()
        _assert_same({"out": static["ssu_out"], "state": static["ssm_state"]},
                     {"out": want, "state": want_inputs["ssm_state"]}, "replayed ssu")
