"""Tensor parallelism: the mixers at TP = 2 give the TP = 1 outputs and
states (float32), with the sharded loader reading one whole checkpoint,
for n_groups that the ranks divide and n_groups = 1 (replicated), over
prefill, decode and mixed batches, prefix caching and (torch) a decode step
replayed from a CUDA graph (``CapturedDecodeStep``, the all-reduce inside).

The ranks run in subprocesses this file starts (it is also the worker:
``python tests/test_tp.py MODE N_GROUPS SEED STEPS``). On the CPU (the GPUs
hidden from the workers): torch, two processes with the gloo backend,
initialised from the environment as ``torchrun`` sets it (the multi-host
path, on one host); JAX, two CPU devices of one process
(``--xla_force_host_platform_device_count``), or two processes of one CPU
device each (``jax.distributed.initialize``). On two GPUs (skipped
elsewhere): torch, one process per GPU over NCCL; JAX, a mesh of both GPUs
in one process; each one launch for both group counts. Every rank also
runs the unsharded mixer on the same inputs and compares its own shard of
the states."""

import functools
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

CONFIG = dict(hidden_size=16, ssm_state_size=16, conv_kernel_size=4, intermediate_size=32,
              use_conv_bias=True, use_bias=True, num_heads=4, head_dim=8, rms_norm_eps=1e-5, chunk_size=16)
NUM_BLOCKS, PAD, TP = 8, 0, 2
# (query_lens, num_computed_tokens, slots or block tables, num_decodes, padding tokens, mamba_block_size)
STEPS = [([5, 20, 1], [0, 7, 4], [1, 2, 4], 0, 0, None),                        # prefill
         ([1, 1, 1], [3, 9, 2], [3, PAD, 5], 3, 2, None),                       # decode
         ([1, 1, 5, 20, 1], [6, 2, 0, 7, 4], [PAD, 3, 1, 2, 4], 2, 3, None),    # mixed
         ([21, 5], [0, 0], [[1, 2, 3], [4, 5, 6]], 0, 0, 16),                   # prefix caching
         ([1, 13], [5, 21], [[4, 5, 6], [1, 2, 3]], 1, 0, 16),
         ([1, 1], [34, 6], [[1, 2, 3], [4, 5, 6]], 2, 0, 16),
         ([1, 1, 1, 1], [4, 10, 3, 7], [3, PAD, 5, 1], 4, 0, None)]             # decode, captured (torch TP 2)
CAPTURED = 6
ALL_STEPS, CI_STEPS = list(range(len(STEPS))) + [CAPTURED], [2, 4]  # twice: two replays of one graph
# JAX on GPUs: every batch shape is one XLA compilation per mixer; one batch of each kind.
JAX_GPU_STEPS = [0, 1, 2, 4]
# max |TP 2 - TP 1| over max(max |TP 1|, 1). The float32 matmuls run in full precision on GPUs
# too (torch's default: no TF32; the Flax mixer's precision HIGHEST), but cuBLAS picks other
# kernels (split-K) for the sharded shapes and the all-reduce sums in another order.
TOLERANCE = {"cpu": 3e-5, "gpu": 5e-5}
GPU_TIMEOUT = 240  # seconds: a rank that fails leaves the other waiting in a collective
TWO_GPUS = torch.cuda.device_count() >= TP
needs_two_gpus = pytest.mark.skipif(not TWO_GPUS, reason=f"needs {TP} CUDA GPUs")


def _inputs(n_groups: int, seed: int, steps: list):
    """The checkpoint, initial states (TP 1 shapes) and hidden states and
    metadata of ``STEPS[i]`` for i in ``steps`` (each step valid on any states)."""
    from bridge.spec.mixer_metadata import build_mamba2_metadata
    from bridge.spec.mixer_sharding import MixerDims
    from mixer_reference import random_weights

    rng = np.random.default_rng(seed)
    dims = MixerDims(32, n_groups, 4, 8, 16)
    weights = {k: v.astype(np.float32) for k, v in
               random_weights(rng, dims, CONFIG["hidden_size"], CONFIG["conv_kernel_size"], use_bias=True).items()}
    conv = rng.standard_normal((NUM_BLOCKS, CONFIG["conv_kernel_size"] - 1, dims.conv_dim)).astype(np.float32)
    ssm = rng.standard_normal((NUM_BLOCKS, 4, 8, 16)).astype(np.float32)
    batches = []
    for query_lens, computed, slots, num_decodes, padding, block in (STEPS[i] for i in steps):
        pad = [np.ndim(s) == 0 and s == PAD for s in slots]
        meta = build_mamba2_metadata(query_lens, computed, slots, num_decodes, CONFIG["chunk_size"],
                                     padding=pad, mamba_block_size=block)
        hidden = rng.standard_normal((sum(query_lens) + padding, CONFIG["hidden_size"])).astype(np.float32)
        batches.append((hidden, meta))
    return weights, conv, ssm, batches


def _state_rows(mixer, rank):
    """Rank ``rank``'s conv channels and heads in the TP 1 states."""
    heads = mixer.local_heads
    return mixer.dims.checkpoint_rows("conv1d.weight", rank), np.arange(rank * heads, (rank + 1) * heads)


def _compare(got, want, what, platform):
    scale = max(float(np.abs(want).max()), 1.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE[platform] * scale, err_msg=what)


# --- torch ------------------------------------------------------------------------

def _torch_worker(groups: list, seed: int, steps: list, gpu: bool):
    import torch.distributed as dist

    # RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as torchrun sets them.
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if gpu else "gloo", device_id=device if gpu else None)
    for n_groups in groups:
        _torch_case(n_groups, seed, steps, device)
    dist.destroy_process_group()


def _torch_case(n_groups: int, seed: int, steps: list, device):
    import torch.distributed as dist

    import bridge
    import torch_impl

    rank, platform = dist.get_rank(), "gpu" if device.type == "cuda" else "cpu"
    weights, conv0, ssm0, batches = _inputs(n_groups, seed, steps)
    results = {}
    for tp_size in (1, TP):
        mixer = torch_impl.MambaMixer2(**CONFIG, n_groups=n_groups, device=device, tp_size=tp_size)
        mixer.load_weights(weights)
        cache = bridge.MambaStateCache(mixer.get_state_shape(), "float32", NUM_BLOCKS, device=device)
        conv_rows, heads = _state_rows(mixer, rank if tp_size > 1 else 0)
        cache.torch("conv").copy_(torch.from_numpy(conv0[:, :, conv_rows]))
        cache.torch("ssm").copy_(torch.from_numpy(ssm0[:, heads]))
        captured, outs = None, []
        for i, (hidden, meta) in zip(steps, batches):
            hidden = torch.from_numpy(hidden).to(device)
            if i == CAPTURED and tp_size > 1:
                captured = captured or torch_impl.CapturedDecodeStep(mixer, cache, meta.num_decodes)
                outs.append(captured.run(hidden, meta).cpu().numpy())
                continue
            with torch.no_grad():
                outs.append(mixer(hidden, cache, torch_impl.metadata_to_device(meta, device)).cpu().numpy())
        results[tp_size] = outs, cache.torch("conv").cpu().numpy(), cache.torch("ssm").cpu().numpy(), mixer
    (want, conv1, ssm1, _), (got, conv2, ssm2, sharded) = results[1], results[TP]
    what = f"rank {rank}, n_groups {n_groups}"
    for i, g, w in zip(steps, got, want):
        _compare(g, w, f"{what}: output of step {i}", platform)
    conv_rows, heads = _state_rows(sharded, rank)
    _compare(conv2, conv1[:, :, conv_rows], f"{what}: conv states", platform)
    _compare(ssm2, ssm1[:, heads], f"{what}: ssm states", platform)
    # The whole checkpoint gathered back from the ranks.
    whole = sharded.checkpoint_weights()
    for key, value in weights.items():
        np.testing.assert_array_equal(whole[key].cpu().numpy(), value, err_msg=f"checkpoint_weights: {key}")


# --- jax --------------------------------------------------------------------------

def _jax_worker(groups: list, seed: int, steps: list, processes: bool, gpu: bool):
    import jax

    if processes:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(os.environ["COORDINATOR"], num_processes=TP,
                                   process_id=int(os.environ["RANK"]))
    if gpu:
        assert jax.default_backend() == "gpu", f"JAX runs on {jax.default_backend()}, not on the GPUs"
    for n_groups in groups:
        _jax_case(n_groups, seed, steps, processes, "gpu" if gpu else "cpu")


def _jitted(mixer):
    """``mixer(hidden, conv, ssm, metadata)`` jitted (one compilation per
    batch shape), the weights as arguments."""
    import jax
    from flax import nnx

    graphdef, params = nnx.split(mixer)
    step = jax.jit(lambda params, *args: nnx.merge(graphdef, params)(*args))
    return functools.partial(step, params)


def _jax_case(n_groups: int, seed: int, steps: list, processes: bool, platform: str):
    import jax
    from jax.sharding import Mesh

    import jax_impl
    from jax_impl import tp

    weights, conv0, ssm0, batches = _inputs(n_groups, seed, steps)
    plain = jax_impl.MambaMixer2(**CONFIG, n_groups=n_groups)
    plain.load_weights(weights)
    mesh = Mesh(np.array(jax.devices()[:TP]), ("tp",))
    sharded = jax_impl.MambaMixer2(**CONFIG, n_groups=n_groups, mesh=mesh)
    sharded.load_weights(weights)
    # Rank-major global states: block r along the sharded axis is rank r's shard.
    rows = [_state_rows(sharded, rank) for rank in range(TP)]
    conv_sharding, ssm_sharding = sharded.state_shardings()
    conv = tp.put(np.concatenate([conv0[:, :, c] for c, _ in rows], 2), conv_sharding)
    ssm = tp.put(np.concatenate([ssm0[:, h] for _, h in rows], 1), ssm_sharding)
    conv1, ssm1 = jax.numpy.asarray(conv0), jax.numpy.asarray(ssm0)
    plain_step, sharded_step = _jitted(plain), _jitted(sharded)
    for i, (hidden, meta) in zip(steps, batches):
        want, conv1, ssm1 = plain_step(hidden, conv1, ssm1, meta)
        got, conv, ssm = sharded_step(hidden, conv, ssm, meta)
        _compare(np.asarray(got.addressable_shards[0].data), np.asarray(want),
                 f"n_groups {n_groups}: output of step {i}", platform)
    conv1 = np.concatenate([np.asarray(conv1)[:, :, c] for c, _ in rows], 2)
    ssm1 = np.concatenate([np.asarray(ssm1)[:, h] for _, h in rows], 1)
    for name, got, want in (("conv", conv, conv1), ("ssm", ssm, ssm1)):
        for shard in got.addressable_shards:
            _compare(np.asarray(shard.data), want[shard.index],
                     f"n_groups {n_groups}: {name} states on {shard.device}", platform)
    if not processes:  # the whole checkpoint gathered back (one process sees every shard)
        whole = sharded.checkpoint_weights()
        for key, value in weights.items():
            np.testing.assert_array_equal(np.asarray(whole[key]), value, err_msg=f"checkpoint_weights: {key}")


# --- the language models ------------------------------------------------------------

def _lm_worker(framework: str, seed: int):
    """Logits of the cache-free forward and greedy tokens of ``generate``,
    TP 2 vs TP 1, both models loaded from one whole checkpoint."""
    from bridge.spec.lm_config import Mamba2Config

    config = Mamba2Config(vocab_size=64, hidden_size=16, num_layers=2, state_size=16, head_dim=8,
                          chunk_size=16, tie_embeddings=False)
    ids = np.random.default_rng(seed).integers(0, 64, (2, 11))
    if framework == "torch-lm":
        import torch
        import torch.distributed as dist
        import torch_impl

        dist.init_process_group("gloo")
        torch.manual_seed(seed)
        models = [torch_impl.Mamba2LMHeadModel(config, tp_size=tp_size) for tp_size in (1, TP)]
        models[1].load_weights(models[0].checkpoint_weights())
        ids = torch.from_numpy(ids)
        with torch.no_grad():
            logits = [m(ids).numpy() for m in models]
        tokens = [m.generate(ids, max_new_tokens=6).numpy() for m in models]
    else:
        import jax
        import jax_impl
        from flax import nnx
        from jax.sharding import Mesh

        mesh = Mesh(np.array(jax.devices()[:TP]), ("tp",))
        models = [jax_impl.Mamba2LMHeadModel(config, rngs=nnx.Rngs(seed)),
                  jax_impl.Mamba2LMHeadModel(config, mesh=mesh)]
        models[1].load_weights(models[0].checkpoint_weights())
        logits = [np.asarray(m(ids)) for m in models]
        tokens = [np.asarray(m.generate(ids, max_new_tokens=6)) for m in models]
    _compare(logits[1], logits[0], f"{framework}: logits", "cpu")  # the workers hide the GPUs
    np.testing.assert_array_equal(tokens[1], tokens[0], err_msg=f"{framework}: greedy tokens")


# --- launching ----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, groups: list, seed: int, ranks: int, steps=ALL_STEPS, timeout: float = 600):
    """Run the worker in ``ranks`` processes (environment as torchrun / a
    JAX cluster sets it); every one must exit 0 within ``timeout`` seconds.
    When one fails or time runs out, the others are killed (they would wait
    in a collective)."""
    port = _free_port()
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(ranks),
                COORDINATOR=f"127.0.0.1:{port}", OMP_NUM_THREADS="1")
    if mode.endswith("-gpu"):
        base.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off, as the H200 machines ask
        base.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    else:  # the CPU paths, on a GPU machine too
        base.update(CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    if mode in ("jax", "jax-lm"):
        base["XLA_FLAGS"] = base.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={TP}"
    args = [sys.executable, __file__, mode, ",".join(map(str, groups)), str(seed), ",".join(map(str, steps))]
    # Output to files, not pipes: a rank blocked on a full pipe would stall the collectives.
    logs = [tempfile.TemporaryFile("w+") for _ in range(ranks)]
    procs = [subprocess.Popen(args, env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), stdout=log,
                              stderr=subprocess.STDOUT, text=True) for r, log in enumerate(logs)]
    deadline = time.monotonic() + timeout
    while (time.monotonic() < deadline and any(p.poll() is None for p in procs)
           and not any(p.returncode for p in procs)):
        time.sleep(0.1)
    timed_out = time.monotonic() >= deadline
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    for r in sorted(range(ranks), key=lambda r: procs[r].returncode < 0):  # a rank that failed first
        p, out = procs[r], outputs[r]
        state = f"exit {p.returncode}" if p.returncode >= 0 else (
            f"killed after {timeout} s" if timed_out else "killed (another rank failed)")
        assert p.returncode == 0, (f"{mode} rank {r} (n_groups {groups}, seed {seed}, steps {steps}): "
                                   f"{state}:\n{out[-4000:]}")


def _seed():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed: {seed}")
    return seed


# CI (torch): the replicated group, a mixed batch and a prefix-caching one; slow: every case.
CASES = [pytest.param(1, CI_STEPS, id="groups1-ci"),
         pytest.param(1, ALL_STEPS, id="groups1-all", marks=pytest.mark.slow),
         pytest.param(2, ALL_STEPS, id="groups2-all", marks=pytest.mark.slow)]


@pytest.mark.parametrize("n_groups,steps", CASES)
def test_torch_tp2_matches_tp1_on_gloo(n_groups, steps):
    _launch("torch", [n_groups], _seed(), ranks=TP, steps=steps)


@pytest.mark.slow  # the Pallas interpreter under shard_map: minutes on a CPU
@pytest.mark.parametrize("n_groups,steps", CASES)
def test_jax_tp2_on_two_devices_matches_tp1(n_groups, steps):
    _launch("jax", [n_groups], _seed(), ranks=1, steps=steps)


@pytest.mark.slow
def test_jax_tp2_across_two_processes_matches_tp1():
    _launch("jax-processes", [1], _seed(), ranks=TP)


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch-lm", "jax-lm"])
def test_language_model_tp2_matches_tp1(framework):
    _launch(framework, [1], _seed(), ranks=TP if framework == "torch-lm" else 1)


# Two GPUs: both group counts in one launch (one process group, kernels compiled once).
@needs_two_gpus
def test_torch_tp2_matches_tp1_on_two_gpus_over_nccl():
    _launch("torch-gpu", [1, 2], _seed(), ranks=TP, timeout=GPU_TIMEOUT)


@needs_two_gpus
def test_jax_tp2_matches_tp1_on_two_gpus():
    _launch("jax-gpu", [1, 2], _seed(), ranks=1, steps=JAX_GPU_STEPS, timeout=GPU_TIMEOUT)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    mode, seed_arg = sys.argv[1], int(sys.argv[3])
    group_list, step_list = ([int(i) for i in sys.argv[k].split(",")] for k in (2, 4))
    if mode.endswith("-lm"):
        _lm_worker(mode, seed_arg)
    elif mode.startswith("torch"):
        _torch_worker(group_list, seed_arg, step_list, gpu=mode == "torch-gpu")
    else:
        _jax_worker(group_list, seed_arg, step_list, processes=mode == "jax-processes", gpu=mode == "jax-gpu")
