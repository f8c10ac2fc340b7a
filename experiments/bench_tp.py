"""Tensor parallelism benchmark: the mixer at TP 1 vs TP 2 in both frameworks.

    NCCL_NVLS_ENABLE=0 python -m experiments.bench_tp [--quick] [--torch-seconds S] [--jax-seconds S]

On a 2-GPU machine: the Mamba-2 2.7B mixer and an 8B-like one (hidden 4096,
intermediate 8192, 128 heads of 64, dstate 128, 8 groups), bf16 weights,
float32 states; a decode step of 64 sequences and a prefill of 4096 tokens
(one fresh sequence); the 8B-like shape and the decode first (the bar's row).
Each row is printed when measured. Each framework runs in its own processes,
time-boxed (``--torch-seconds``, ``--jax-seconds``): rows measured by then
are kept, the others are listed as missing.

torch: one process per GPU over NCCL. TP 1 first, the shapes dealt out to
the GPUs and measured side by side (no collective joins them), then TP 2 on
both. The decode step is captured in a CUDA graph (``CapturedDecodeStep``:
the all-reduce inside, warmed up on a side stream before the capture) and
replayed, the prefill runs eagerly; every sample is a fixed number of
calls, so that both ranks enter the same collectives (a count each rank
chose from its own timing could differ and leave one waiting). JAX: one
process, started after torch's have exited, a mesh of the two GPUs (TP 1:
the first one), each step jitted with the states donated, its inputs
placed on the devices beforehand. Times are medians (rank 0's at TP 2).
The result states the speedup at TP 2 per row; the bar: the 8B-like decode
at batch 64 >= 1.5x in both frameworks. On a CPU (``--quick`` or no GPU):
a tiny mixer in the interpreters over gloo and two host devices (a smoke
test: interpreter times).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import torch_impl  # before triton: interpreter mode on CPU
from experiments import report, timing
from experiments.shapes import CPU_MIXER, MAMBA2_2P7B_MIXER

ON_GPU = torch_impl.platform.ON_GPU
TP = 2
if not ON_GPU:  # two host devices for the JAX mesh (before jax is imported)
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={TP}"
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

MIXER_8B = dict(MAMBA2_2P7B_MIXER, hidden_size=4096, intermediate_size=8192, num_heads=128, n_groups=8)
BAR = 1.5  # decode at batch 64 of the 8B-like shape, TP 2 over TP 1
CALLS_PER_SAMPLE = 20  # torch: fixed, the same on every rank
REPEATS = 10


def shapes(quick: bool) -> dict:
    return {"8b-like": MIXER_8B, "mamba2-2.7b": MAMBA2_2P7B_MIXER} if ON_GPU and not quick else {"cpu": CPU_MIXER}


def cases(quick: bool):
    """(mode, query_lens, num_computed_tokens)."""
    if ON_GPU and not quick:
        return [("decode", [1] * 64, [100] * 64), ("prefill", [4096], [0])]
    return [("decode", [1] * 4, [5] * 4), ("prefill", [40], [0])]


def repeats(quick: bool) -> int:
    return REPEATS if ON_GPU and not quick else 1


def _metadata(config, mode, query_lens, computed):
    import bridge

    n = len(query_lens)
    return bridge.build_mamba2_metadata(query_lens=query_lens, num_computed_tokens=computed,
                                        state_indices=np.arange(1, n + 1),
                                        num_decodes=n if mode == "decode" else 0,
                                        chunk_size=config["chunk_size"])


def _inputs(config, tokens):
    return np.random.default_rng(0).standard_normal((tokens, config["hidden_size"]), np.float32)


def _emit(rows_path: str, **row) -> None:
    """Print a measured row now and append it to the rows file (one JSON line)."""
    print(f"{row['framework']:<6}{row['shape']:<13}{row['mode']:<8} batch {row['batch']:>3}  "
          f"tokens {row['tokens']:>5}  TP {row['tp']}  {row['median_us']:>10.1f} us", flush=True)
    with open(rows_path, "a") as f:
        f.write(json.dumps(row) + "\n")


# --- torch: one process per rank ---------------------------------------------------

def _time_calls(fn, repeats: int) -> float:
    """Median seconds per ``fn()``: samples of ``CALLS_PER_SAMPLE`` calls timed
    with CUDA events (on a CPU, single calls by the wall clock)."""
    for _ in range(timing.WARMUP_CALLS):
        fn()
    if not ON_GPU:
        return statistics.median(timing.wall_samples(fn, repeats))

    def sample():
        for _ in range(CALLS_PER_SAMPLE):
            fn()

    return statistics.median(timing.event_seconds(sample) / CALLS_PER_SAMPLE for _ in range(repeats))


def _torch_rows(name, config, tp_size, device, quick, rows_path, emit=True):
    import torch

    import bridge

    mixer = torch_impl.MambaMixer2(**config, dtype=torch.bfloat16 if ON_GPU else torch.float32, device=device,
                                   tp_size=tp_size)
    for mode, query_lens, computed in cases(quick):
        metadata = _metadata(config, mode, query_lens, computed)
        n = len(query_lens)
        cache = bridge.MambaStateCache(mixer.get_state_shape(), "float32", n + 1, device=device)
        hidden = torch.from_numpy(_inputs(config, sum(query_lens))).to(device, mixer.in_proj_weight.dtype)
        if mode == "decode":
            step = torch_impl.CapturedDecodeStep(mixer, cache, n)
            step.run(hidden, metadata)
            fn = step.replay
        else:
            fn = functools.partial(mixer, hidden, cache, torch_impl.metadata_to_device(metadata, device))
        with torch.no_grad():
            seconds = _time_calls(fn, repeats(quick))
        if emit:
            _emit(rows_path, framework="torch", shape=name, mode=mode, batch=n, tokens=sum(query_lens),
                  tp=tp_size, median_us=seconds * 1e6)


def torch_worker(rank: int, port: int, quick: bool, rows_path: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if ON_GPU else torch.device("cpu")
    if ON_GPU:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if ON_GPU else "gloo", rank=rank, world_size=TP,
                            device_id=device if ON_GPU else None)
    named = list(shapes(quick).items())
    for name, config in named[rank::TP]:
        _torch_rows(name, config, 1, device, quick, rows_path)
    dist.barrier()
    for name, config in named:
        _torch_rows(name, config, TP, device, quick, rows_path, emit=rank == 0)
    dist.destroy_process_group()


# --- JAX: one process, a mesh of the devices --------------------------------------

def jax_worker(quick: bool, rows_path: str) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import jax_impl

    devices = jax.devices()[:TP]
    dtype = jnp.bfloat16 if ON_GPU else jnp.float32

    def jitted(graphdef):
        # The weights as arguments (not constants of the program); the states donated.
        return jax.jit(lambda conv, ssm, hidden, params, meta:
                       nnx.merge(graphdef, params)(hidden, conv, ssm, meta)[1:], donate_argnums=(0, 1))

    for name, config in shapes(quick).items():
        for tp_size in (1, TP):
            mesh = Mesh(np.array(devices), ("tp",)) if tp_size > 1 else None
            inputs_at = devices[0] if mesh is None else NamedSharding(mesh, PartitionSpec())  # replicated
            with jax.default_device(devices[0]):
                mixer = jax_impl.MambaMixer2(**config, dtype=dtype, mesh=mesh)
            graphdef, params = nnx.split(mixer)
            step = jitted(graphdef)
            if mesh is None:
                layout = [(shape, devices[0]) for shape in mixer.get_state_shape()]
            else:
                layout = list(zip(mixer.global_state_shape(), mixer.state_shardings()))
            for mode, query_lens, computed in cases(quick):
                n = len(query_lens)
                metadata = _metadata(config, mode, query_lens, computed).map_arrays(
                    lambda a: jax.device_put(a, inputs_at))
                hidden = jax.device_put(jnp.asarray(_inputs(config, sum(query_lens)), dtype), inputs_at)
                states = tuple(jnp.zeros((n + 1, *shape), jnp.float32, device=at) for shape, at in layout)
                seconds = timing.time_jax(lambda carry, args=(hidden, params, metadata): step(*carry, *args),
                                          states, repeats(quick))
                _emit(rows_path, framework="flax", shape=name, mode=mode, batch=n, tokens=sum(query_lens),
                      tp=tp_size, median_us=seconds * 1e6)


# --- the parent: each part time-boxed, then the report ------------------------------

def _run_part(part: str, seconds: float, quick: bool, rows_path: str) -> None:
    """The ``part`` workers (torch: one per rank; JAX: one), killed after ``seconds``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "experiments.bench_tp", "--worker", part, "--port", str(port),
               "--rows", rows_path] + (["--quick"] if quick else [])
    env = dict(os.environ)
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off, as the H200 machines ask
    procs = [subprocess.Popen(command + ["--rank", str(rank)], env=env) for rank in range(TP if part == "torch" else 1)]
    deadline = time.monotonic() + seconds
    # Until all are done, one failed (the other would wait in a collective) or time is up.
    while time.monotonic() < deadline and None in [p.poll() for p in procs] and not any(p.returncode for p in procs):
        time.sleep(0.1)
    for rank, p in enumerate(procs):
        if p.poll() is None:
            p.kill()
            p.wait()
        if p.returncode:
            print(f"{part} rank {rank}: exit {p.returncode} after {seconds - deadline + time.monotonic():.0f} s",
                  flush=True)


def with_speedups(rows: list[dict]) -> list[dict]:
    """Each TP 2 row whose TP 1 row was measured gets ``speedup`` (TP 1's time over its own)."""
    key = lambda r: (r["framework"], r["shape"], r["mode"], r["batch"])  # noqa: E731
    tp1 = {key(r): r["median_us"] for r in rows if r["tp"] == 1}
    for r in rows:
        if r["tp"] == TP and key(r) in tp1:
            r["speedup"] = tp1[key(r)] / r["median_us"]
    return rows


def report_text(rows: list[dict], quick: bool, device: str) -> str:
    """The table, the missing rows and the bar's verdict."""
    table = report.markdown_table(rows, [("framework", "framework", None), ("shape", "shape", None),
                                         ("mode", "mode", None), ("batch", "batch", None),
                                         ("tokens", "tokens", None), ("tp", "TP", None),
                                         ("median_us", "median µs", ".1f"), ("speedup", "TP 2 speedup", ".2f")])
    measured = {(r["framework"], r["shape"], r["mode"], r["tp"]) for r in rows}
    missing = [f"{f} {s} {m} TP {t}" for f in ("torch", "flax") for s in shapes(quick)
               for m, _, _ in cases(quick) for t in (1, TP) if (f, s, m, t) not in measured]
    speedups = {r["framework"]: r["speedup"] for r in rows
                if r["shape"] == "8b-like" and r["mode"] == "decode" and "speedup" in r}
    verdict = "; ".join(f"{f} not measured" if f not in speedups else
                        f"{f} {speedups[f]:.2f}x ({'meets' if speedups[f] >= BAR else 'misses'} the {BAR}x bar)"
                        for f in ("torch", "flax"))
    if "8b-like" not in shapes(quick):
        verdict = "no 8B-like rows (CPU smoke run)"
    return (f"# Tensor parallelism, TP 1 vs TP {TP}: {device}\n\n{table}\n\n"
            + (f"Not measured within the time box: {', '.join(missing)}.\n\n" if missing else "")
            + f"8B-like decode at batch 64, TP {TP} speedup: {verdict}.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--torch-seconds", type=float, default=110, help="time box of the torch part")
    parser.add_argument("--jax-seconds", type=float, default=110, help="time box of the JAX part")
    parser.add_argument("--worker", choices=("torch", "jax"), help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "torch":
        return torch_worker(args.rank, args.port, args.quick, args.rows)
    if args.worker == "jax":
        return jax_worker(args.quick, args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = os.path.join(tmp, "rows.jsonl")
        open(rows_path, "w").close()
        _run_part("torch", args.torch_seconds, args.quick, rows_path)  # torch first: JAX holds no GPU yet
        _run_part("jax", args.jax_seconds, args.quick, rows_path)
        with open(rows_path) as f:
            rows = with_speedups([json.loads(line) for line in f])
    env = report.environment()
    text = report_text(rows, args.quick, env["device"])
    path = report.default_output("bench_tp", env, ".md", args.quick or not ON_GPU)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.with_suffix(".json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    print(text)
    print(f"written: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
