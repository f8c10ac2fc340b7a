"""Tensor parallelism benchmark: the mixer at TP 1 vs TP 2 in both frameworks.

    NCCL_NVLS_ENABLE=0 python -m experiments.bench_tp [--quick]

On a 2-GPU machine: the Mamba-2 2.7B mixer and an 8B-like one (hidden 4096,
intermediate 8192, 128 heads of 64, dstate 128, 8 groups), bf16 weights,
float32 states; prefill of 4096 tokens (one fresh sequence) and a decode
step of 64 sequences. torch: two processes (``torch.multiprocessing.spawn``,
NCCL; TP 1 on rank 0 alone), the decode step captured in a CUDA graph
(``CapturedDecodeStep``: the all-reduce inside) and replayed, the prefill
eager; JAX: this process, a mesh of the two GPUs (TP 1: the first one),
each step jitted with the states donated. Times are medians (rank 0's for
torch; the all-reduce makes the ranks wait for each other). The result
states the speedup at TP 2 per row; the bar: the 8B-like decode at batch 64
>= 1.5x in both frameworks. On a CPU (``--quick`` or no GPU): a tiny mixer
in the interpreters over gloo and two host devices (a smoke test: interpreter
times).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile

import numpy as np

import torch_impl  # before triton: interpreter mode on CPU
from experiments import report
from experiments.shapes import CPU_MIXER, MAMBA2_2P7B_MIXER

ON_GPU = torch_impl.platform.ON_GPU
TP = 2
if not ON_GPU:  # two host devices for the JAX mesh (before jax is imported)
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={TP}"
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

MIXER_8B = dict(MAMBA2_2P7B_MIXER, hidden_size=4096, intermediate_size=8192, num_heads=128, n_groups=8)
BAR = 1.5  # decode at batch 64 of the 8B-like shape, TP 2 over TP 1


def shapes(quick: bool) -> dict:
    return {"mamba2-2.7b": MAMBA2_2P7B_MIXER, "8b-like": MIXER_8B} if ON_GPU and not quick else {"cpu": CPU_MIXER}


def cases(quick: bool):
    """(mode, query_lens, num_computed_tokens)."""
    if ON_GPU and not quick:
        return [("prefill", [4096], [0]), ("decode", [1] * 64, [100] * 64)]
    return [("prefill", [40], [0]), ("decode", [1] * 4, [5] * 4)]


def _metadata(config, mode, query_lens, computed):
    import bridge

    n = len(query_lens)
    return bridge.build_mamba2_metadata(query_lens=query_lens, num_computed_tokens=computed,
                                        state_indices=np.arange(1, n + 1),
                                        num_decodes=n if mode == "decode" else 0,
                                        chunk_size=config["chunk_size"])


def _inputs(config, tokens):
    return np.random.default_rng(0).standard_normal((tokens, config["hidden_size"]), np.float32)


# --- torch: one process per rank ---------------------------------------------------

def _torch_rank(rank: int, port: int, quick: bool, out_file: str) -> None:
    import torch
    import torch.distributed as dist

    import bridge
    from experiments.timing import time_torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(f"cuda:{rank}") if ON_GPU else torch.device("cpu")
    if ON_GPU:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if ON_GPU else "gloo", rank=rank, world_size=TP,
                            device_id=device if ON_GPU else None)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    repeats = 20 if ON_GPU and not quick else 1
    rows = []
    for name, config in shapes(quick).items():
        for tp_size in (1, TP):
            if tp_size == 1 and rank != 0:
                dist.barrier()
                continue
            mixer = torch_impl.MambaMixer2(**config, dtype=dtype, device=device, tp_size=tp_size)
            for mode, query_lens, computed in cases(quick):
                metadata = _metadata(config, mode, query_lens, computed)
                n = len(query_lens)
                cache = bridge.MambaStateCache(mixer.get_state_shape(), "float32", n + 1,
                                               device=device.type + (f":{rank}" if ON_GPU else ""))
                hidden = torch.from_numpy(_inputs(config, sum(query_lens))).to(device, dtype)
                if mode == "decode":
                    step = torch_impl.CapturedDecodeStep(mixer, cache, n)
                    step.run(hidden, metadata)
                    seconds = time_torch(step.replay, repeats, graph=False)
                else:
                    on_device = torch_impl.metadata_to_device(metadata, device)
                    with torch.no_grad():
                        seconds = time_torch(lambda: mixer(hidden, cache, on_device), repeats, graph=False)
                rows.append(dict(framework="torch", shape=name, mode=mode, batch=n, tokens=sum(query_lens),
                                 tp=tp_size, median_us=seconds * 1e6))
            if tp_size == 1:
                dist.barrier()
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def run_torch(quick: bool) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rows.json")
        mp.spawn(_torch_rank, args=(port, quick, out_file), nprocs=TP)
        with open(out_file) as f:
            return json.load(f)


# --- JAX: one process, a mesh of the devices --------------------------------------

def run_jax(quick: bool) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import Mesh

    import jax_impl
    from experiments.timing import time_jax

    devices = jax.devices()[:TP]
    dtype = jnp.bfloat16 if ON_GPU else jnp.float32
    repeats = 20 if ON_GPU and not quick else 1
    rows = []
    for name, config in shapes(quick).items():
        for tp_size in (1, TP):
            mesh = Mesh(np.array(devices), ("tp",)) if tp_size > 1 else None
            with jax.default_device(devices[0]):
                mixer = jax_impl.MambaMixer2(**config, dtype=dtype, mesh=mesh)
                graphdef, params = nnx.split(mixer)
                # The weights as arguments (not constants of the program); the states donated.
                step = jax.jit(lambda conv, ssm, hidden, params, meta:
                               nnx.merge(graphdef, params)(hidden, conv, ssm, meta)[1:], donate_argnums=(0, 1))
                for mode, query_lens, computed in cases(quick):
                    metadata = _metadata(config, mode, query_lens, computed).map_arrays(jnp.asarray)
                    n = len(query_lens)
                    if mesh is None:
                        states = tuple(jnp.zeros((n + 1, *s), jnp.float32) for s in mixer.get_state_shape())
                    else:
                        states = tuple(jnp.zeros((n + 1, *s), jnp.float32, device=sharding) for s, sharding
                                       in zip(mixer.global_state_shape(), mixer.state_shardings()))
                    hidden = jnp.asarray(_inputs(config, sum(query_lens)), dtype)
                    seconds = time_jax(lambda carry, args=(hidden, params, metadata): step(*carry, *args),
                                       states, repeats)
                    rows.append(dict(framework="flax", shape=name, mode=mode, batch=n, tokens=sum(query_lens),
                                     tp=tp_size, median_us=seconds * 1e6))
    return rows


def with_speedups(rows: list[dict]) -> list[dict]:
    """Each TP 2 row gets ``speedup`` (its TP 1 row's time over its own)."""
    key = lambda r: (r["framework"], r["shape"], r["mode"], r["batch"])  # noqa: E731
    tp1 = {key(r): r["median_us"] for r in rows if r["tp"] == 1}
    for r in rows:
        if r["tp"] == TP:
            r["speedup"] = tp1[key(r)] / r["median_us"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    quick = parser.parse_args().quick
    env = report.environment()
    rows = with_speedups(run_torch(quick) + run_jax(quick))
    table = report.markdown_table(rows, [("framework", "framework", None), ("shape", "shape", None),
                                         ("mode", "mode", None), ("batch", "batch", None),
                                         ("tokens", "tokens", None), ("tp", "TP", None),
                                         ("median_us", "median µs", ".1f"), ("speedup", "TP 2 speedup", ".2f")])
    bar = [r for r in rows if r["shape"] == "8b-like" and r["mode"] == "decode" and r["tp"] == TP]
    verdict = "; ".join(f"{r['framework']} {r['speedup']:.2f}x ({'meets' if r['speedup'] >= BAR else 'misses'} "
                        f"the {BAR}x bar)" for r in bar) or "no 8B-like rows (CPU smoke run)"
    text = (f"# Tensor parallelism, TP 1 vs TP {TP}: {env['device']}\n\n{table}\n\n"
            f"8B-like decode at batch 64, TP {TP} speedup: {verdict}.\n")
    path = report.default_output("bench_tp", env, ".md", quick or not ON_GPU)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.with_suffix(".json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    print(text)
    print(f"written: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
