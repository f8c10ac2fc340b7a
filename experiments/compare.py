"""The main job: run every implementation of the state update on the
default device, check each against the float64 reference and time it.

    python -m experiments.compare [--quick] [--batches 1 64 256]

Prints a table (implementation, max relative error vs float64, median time,
effective bandwidth) and writes it as JSON under experiments/results/.
On a CPU the kernels run interpreted: the times are interpreter times.
Timing: the step is replayed without Python in the loop (a CUDA graph in
torch, a ``lax.fori_loop`` under ``jax.jit`` in JAX), warm-up first, then the
median over repeats of (loop time / steps).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform as host_platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

import numpy as np  # noqa: E402

import torch_impl  # noqa: E402,F401  (before triton: interpreter mode on CPU)
import torch  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jax_impl  # noqa: E402
from jax_impl import reference as jax_reference  # noqa: E402
from torch_impl import reference as torch_reference  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ON_GPU = torch_impl.platform.ON_GPU


def make_decode_inputs(batch, nheads, headdim, dstate, ngroups, state_dtype, seed=0):
    """Mamba-2 decode step: tied per-head dt/A/dt_bias, z and D, a cache with
    twice as many slots as sequences, read and written in place at random slots."""
    rng = np.random.default_rng(seed)
    slots = 2 * batch + 1
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    arrays = dict(
        state=r(slots, nheads, headdim, dstate), x=r(batch, nheads, headdim),
        dt=r(batch, nheads) * 0.5, A=-np.exp(r(nheads) * 0.5), B=r(batch, ngroups, dstate),
        C=r(batch, ngroups, dstate), D=r(nheads), dt_bias=r(nheads) * 0.5,
        z=r(batch, nheads, headdim),
        state_batch_indices=rng.permutation(np.arange(1, slots))[:batch].astype(np.int32))
    return arrays, state_dtype


def torch_inputs(arrays, state_dtype, device):
    t = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
    t["state"] = t["state"].to(getattr(torch, state_dtype))
    t["out"] = torch.empty_like(t["x"])
    return t


def jax_inputs(arrays, state_dtype):
    j = {k: jnp.asarray(v) for k, v in arrays.items()}
    j["state"] = j["state"].astype(getattr(jnp, state_dtype))
    return j


def rel_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def time_torch(step, steps, repeats, graph=True):
    """Median seconds per step: replayed from a CUDA graph, or eager
    (``graph=False``, for code that synchronizes with the host)."""
    if not ON_GPU:
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)
    for _ in range(3):
        step()  # compile and warm up
    torch.cuda.synchronize()
    if graph:
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            for _ in range(steps):
                step()
        run = cuda_graph.replay
    else:
        def run():
            for _ in range(steps):
                step()
    run()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / steps)
    return statistics.median(samples)


def time_jax(step, carry, steps, repeats):
    """``step(carry) -> carry``; median seconds per step, the carry donated."""
    if not ON_GPU:
        steps = 1
    loop = jax.jit(lambda c: jax.lax.fori_loop(0, steps, lambda i, c: step(c), c), donate_argnums=0)
    carry = jax.block_until_ready(loop(carry))  # compile and warm up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        carry = jax.block_until_ready(loop(carry))
        samples.append((time.perf_counter() - start) / steps)
    return statistics.median(samples)


def compare_state_update(batch, nheads, headdim, dstate, ngroups, state_dtype, steps, repeats):
    arrays, _ = make_decode_inputs(batch, nheads, headdim, dstate, ngroups, state_dtype)
    options = dict(dt_softplus=True)
    device = torch_impl.platform.default_device()
    t = torch_inputs(arrays, state_dtype, device)
    want_out, want_state = torch_reference.selective_state_update_ref(**t, **options)
    want_out, want_state = want_out.cpu().numpy(), want_state.cpu().numpy()
    bytes_moved = 2 * batch * nheads * headdim * dstate * t["state"].element_size()
    rows = []

    def record(name, out, state, seconds):
        rows.append(dict(op="selective_state_update", implementation=name, batch=batch,
                         nheads=nheads, headdim=headdim, dstate=dstate, state_dtype=state_dtype,
                         max_rel_error_out=rel_error(out, want_out),
                         max_rel_error_state=rel_error(state, want_state),
                         median_us=seconds * 1e6, state_GBps=bytes_moved / seconds / 1e9))

    for name, fn, graph in (
            ("triton", lambda **kw: torch_impl.selective_state_update(**kw, validate_indices=False), True),
            ("torch-reference", torch_reference.selective_state_update_torch_ops, False)):
        first = {k: v.clone() for k, v in t.items()}
        fn(**first, **options)
        work = {k: v.clone() for k, v in t.items()}
        seconds = time_torch(lambda: fn(**work, **options), steps, repeats, graph)
        record(name, first["out"].float().cpu().numpy(), first["state"].float().cpu().numpy(), seconds)

    j = jax_inputs(arrays, state_dtype)
    for name, fn in (("pallas", jax_impl.selective_state_update),
                     ("xla-reference", jax_reference.selective_state_update_jnp)):
        rest = {k: v for k, v in j.items() if k != "state"}
        out, state = jax.jit(lambda s, kw: fn(s, **kw, **options))(j["state"], rest)
        seconds = time_jax(lambda s: fn(s, **rest, **options)[1], jnp.copy(j["state"]), steps, repeats)
        record(name, np.asarray(out, np.float32), np.asarray(state.astype(jnp.float32)), seconds)
    return rows


def copy_bandwidth_GBps(num_bytes=1 << 30, repeats=20):
    """Device-to-device copy, read + write bytes per second."""
    if not ON_GPU:
        return None
    src = torch.empty(num_bytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return 2 * num_bytes / statistics.median(samples) / 1e9


def environment():
    import triton
    device = torch_impl.platform.default_device()
    return dict(date=datetime.date.today().isoformat(),
                device=torch_impl.platform.device_name(device), interpreted=not ON_GPU,
                torch=torch.__version__, triton=triton.__version__, jax=jax.__version__,
                jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__") else jax.__version__,
                numpy=np.__version__, python=host_platform.python_version())


def print_table(rows, copy_GBps):
    header = f"{'op':<24}{'implementation':<17}{'batch':>6}{'err(out)':>11}{'err(state)':>11}{'median':>12}{'GB/s':>9}"
    if copy_GBps:
        header += f"{'of copy':>9}"
    print(header)
    for r in rows:
        line = (f"{r['op']:<24}{r['implementation']:<17}{r['batch']:>6}{r['max_rel_error_out']:>11.1e}"
                f"{r['max_rel_error_state']:>11.1e}{r['median_us']:>10.1f}us{r['state_GBps']:>9.1f}")
        if copy_GBps:
            line += f"{r['state_GBps'] / copy_GBps:>9.0%}"
        print(line)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (CI)")
    parser.add_argument("--batches", type=int, nargs="*")
    parser.add_argument("--state-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--output", type=Path, help="JSON file (default: experiments/results/compare-<date>-<device>.json)")
    args = parser.parse_args(argv)
    if ON_GPU and not args.quick:
        shape = dict(nheads=80, headdim=64, dstate=128, ngroups=1)  # Mamba-2 2.7B
        batches, steps, repeats = args.batches or [1, 16, 64, 256], 20, 30
    else:
        shape = dict(nheads=4, headdim=16, dstate=16, ngroups=1)
        batches, steps, repeats = args.batches or [2], 1, 3
    rows = []
    for batch in batches:
        rows += compare_state_update(batch, **shape, state_dtype=args.state_dtype,
                                     steps=steps, repeats=repeats)
    copy_GBps = copy_bandwidth_GBps()
    env = environment()
    if not ON_GPU:
        print("No GPU: kernels ran in the Triton / Pallas interpreters; times are interpreter times.")
    print_table(rows, copy_GBps)
    output = args.output or RESULTS / (
        f"compare-{env['date']}-{env['device'].replace(' ', '_')}{'-quick' if args.quick else ''}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(dict(environment=env, copy_GBps=copy_GBps, rows=rows), indent=1))
    print(f"wrote {output}")
    return rows


if __name__ == "__main__":
    main()
