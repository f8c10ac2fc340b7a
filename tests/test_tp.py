"""Tensor parallelism: the mixers at TP = 2 give the TP = 1 outputs and
states (float32), with the sharded loader reading one whole checkpoint,
for n_groups that the ranks divide and n_groups = 1 (replicated), over
prefill, decode and mixed batches and prefix caching.

The ranks run in subprocesses this file starts (it is also the worker:
``python tests/test_tp.py torch|jax|jax-processes N_GROUPS SEED``):
torch, two processes with the gloo backend, initialised from the
environment as ``torchrun`` sets it (the multi-host path, on one host);
JAX, two CPU devices of one process (``--xla_force_host_platform_device_count``),
or two processes of one CPU device each (``jax.distributed.initialize``).
Every rank also runs the unsharded mixer on the same inputs and compares
its own shard of the states."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

CONFIG = dict(hidden_size=16, ssm_state_size=16, conv_kernel_size=4, intermediate_size=32,
              use_conv_bias=True, use_bias=True, num_heads=4, head_dim=8, rms_norm_eps=1e-5, chunk_size=16)
NUM_BLOCKS, PAD, TP = 8, 0, 2
# (query_lens, num_computed_tokens, slots or block tables, num_decodes, padding tokens, mamba_block_size)
STEPS = [([5, 20, 1], [0, 7, 4], [1, 2, 4], 0, 0, None),                        # prefill
         ([1, 1, 1], [3, 9, 2], [3, PAD, 5], 3, 2, None),                       # decode
         ([1, 1, 5, 20, 1], [6, 2, 0, 7, 4], [PAD, 3, 1, 2, 4], 2, 3, None),    # mixed
         ([21, 5], [0, 0], [[1, 2, 3], [4, 5, 6]], 0, 0, 16),                   # prefix caching
         ([1, 13], [5, 21], [[4, 5, 6], [1, 2, 3]], 1, 0, 16),
         ([1, 1], [34, 6], [[1, 2, 3], [4, 5, 6]], 2, 0, 16)]
ALL_STEPS, CI_STEPS = list(range(len(STEPS))), [2, 4]


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


def _compare(got, want, what):
    scale = max(float(np.abs(want).max()), 1.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-5 * scale, err_msg=what)


# --- torch ------------------------------------------------------------------------

def _torch_worker(n_groups: int, seed: int, steps: list):
    import torch
    import torch.distributed as dist

    import bridge
    import torch_impl

    dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as torchrun sets them
    rank = dist.get_rank()
    weights, conv0, ssm0, steps = _inputs(n_groups, seed, steps)
    results = {}
    for tp_size in (1, TP):
        mixer = torch_impl.MambaMixer2(**CONFIG, n_groups=n_groups, tp_size=tp_size)
        mixer.load_weights(weights)
        cache = bridge.MambaStateCache(mixer.get_state_shape(), "float32", NUM_BLOCKS)
        conv_rows, heads = _state_rows(mixer, rank if tp_size > 1 else 0)
        cache.torch("conv").copy_(torch.from_numpy(conv0[:, :, conv_rows]))
        cache.torch("ssm").copy_(torch.from_numpy(ssm0[:, heads]))
        with torch.no_grad():
            outs = [mixer(torch.from_numpy(h), cache, torch_impl.metadata_to_device(m, "cpu")).numpy()
                    for h, m in steps]
        results[tp_size] = outs, cache.torch("conv").numpy(), cache.torch("ssm").numpy(), mixer
    (want, conv1, ssm1, _), (got, conv2, ssm2, sharded) = results[1], results[TP]
    for i, (g, w) in enumerate(zip(got, want)):
        _compare(g, w, f"rank {rank}: output of step {i}")
    conv_rows, heads = _state_rows(sharded, rank)
    _compare(conv2, conv1[:, :, conv_rows], f"rank {rank}: conv states")
    _compare(ssm2, ssm1[:, heads], f"rank {rank}: ssm states")
    # The whole checkpoint gathered back from the ranks.
    whole = sharded.checkpoint_weights()
    for key, value in weights.items():
        np.testing.assert_array_equal(whole[key].numpy(), value, err_msg=f"checkpoint_weights: {key}")
    dist.destroy_process_group()


# --- jax --------------------------------------------------------------------------

def _jax_worker(n_groups: int, seed: int, steps: list, processes: bool):
    import jax

    if processes:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(os.environ["COORDINATOR"], num_processes=TP,
                                   process_id=int(os.environ["RANK"]))
    import jax_impl
    from jax.sharding import Mesh

    from jax_impl import tp

    weights, conv0, ssm0, steps = _inputs(n_groups, seed, steps)
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
    for i, (hidden, meta) in enumerate(steps):
        want, conv1, ssm1 = plain(hidden, conv1, ssm1, meta)
        got, conv, ssm = sharded(hidden, conv, ssm, meta)
        _compare(np.asarray(got.addressable_shards[0].data), np.asarray(want), f"output of step {i}")
    conv1 = np.concatenate([np.asarray(conv1)[:, :, c] for c, _ in rows], 2)
    ssm1 = np.concatenate([np.asarray(ssm1)[:, h] for _, h in rows], 1)
    for name, got, want in (("conv", conv, conv1), ("ssm", ssm, ssm1)):
        for shard in got.addressable_shards:
            _compare(np.asarray(shard.data), want[shard.index], f"{name} states on {shard.device}")
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
    _compare(logits[1], logits[0], f"{framework}: logits")
    np.testing.assert_array_equal(tokens[1], tokens[0], err_msg=f"{framework}: greedy tokens")


# --- launching ----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, n_groups: int, seed: int, ranks: int, steps=ALL_STEPS):
    """Run the worker in ``ranks`` processes (environment as torchrun / a
    JAX cluster sets it); every one must exit 0."""
    port = _free_port()
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(ranks),
                COORDINATOR=f"127.0.0.1:{port}", OMP_NUM_THREADS="1")
    if mode in ("jax", "jax-lm"):
        base["XLA_FLAGS"] = base.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={TP}"
    procs = [subprocess.Popen([sys.executable, __file__, mode, str(n_groups), str(seed),
                               ",".join(map(str, steps))],
                              env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(ranks)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, (f"{mode} rank {r} (n_groups {n_groups}, seed {seed}, steps {steps}) "
                                   f"failed:\n{out[-4000:]}")


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
    _launch("torch", n_groups, _seed(), ranks=TP, steps=steps)


@pytest.mark.slow  # the Pallas interpreter under shard_map: minutes on a CPU
@pytest.mark.parametrize("n_groups,steps", CASES)
def test_jax_tp2_on_two_devices_matches_tp1(n_groups, steps):
    _launch("jax", n_groups, _seed(), ranks=1, steps=steps)


@pytest.mark.slow
def test_jax_tp2_across_two_processes_matches_tp1():
    _launch("jax-processes", 1, _seed(), ranks=TP)


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch-lm", "jax-lm"])
def test_language_model_tp2_matches_tp1(framework):
    _launch(framework, 1, _seed(), ranks=TP if framework == "torch-lm" else 1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    mode, groups, seed_arg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    step_list = [int(i) for i in sys.argv[4].split(",")]
    if mode.endswith("-lm"):
        _lm_worker(mode, seed_arg)
    elif mode == "torch":
        _torch_worker(groups, seed_arg, step_list)
    else:
        _jax_worker(groups, seed_arg, step_list, processes=mode == "jax-processes")
