"""What the DLPack bridge costs: sharing a cache between torch and JAX, and
the JAX in-place state-update step on a torch-owned cache.

    python -m experiments.bench_bridge [--quick] [--no-save]

Rows (``run(quick)`` returns them; ``__main__`` prints a table and writes
JSON under experiments/results/):

- ``share``: ``bridge.to_jax`` / ``bridge.to_torch`` of a buffer of 1 MB,
  64 MB, 1 GB, 8 GB (quick: 1 MB, 64 MB) — host time per call, pointer check
  and stream handshake included; it should stay flat in the size — next to a
  device copy of the same buffer (``Tensor.copy_``, timed with CUDA events).
- ``jax_inplace_step``: ``jax_impl.selective_state_update`` jitted with the
  state donated, on a JAX-owned array and on a torch-owned
  ``MambaStateCache`` (``run_jax_inplace``, with ``order_torch`` True — torch
  ordered after every step — and False — ordered when ``cache.torch()`` is
  next called). Two figures per row: ``median_us``, a step followed by a wait
  for it (latency: host overhead shows in full), and ``pipelined_us``, the
  time per step of a stream of steps, ``(run(2n) - run(n)) / n`` as in
  ``experiments.timing.time_jax`` (throughput: host work overlaps the device).

Without a GPU the sizes are tiny and the rows say ``device: cpu``; the Pallas
step then runs interpreted, so its times are interpreter times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

import numpy as np  # noqa: E402
import torch  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bridge  # noqa: E402
import jax_impl  # noqa: E402
from experiments.report import RESULTS, environment  # noqa: E402
from experiments.shapes import CPU_HEADS, MAMBA2_2P7B_HEADS  # noqa: E402
from experiments.timing import event_seconds, wall_samples  # noqa: E402

MB = 1 << 20


def _on_gpu() -> bool:
    return torch.cuda.is_available() and jax.default_backend() == "gpu"


def _device_label() -> str:
    return torch.cuda.get_device_name() if _on_gpu() else "cpu"


def _median_us(samples_s: list[float]) -> float:
    return statistics.median(samples_s) * 1e6


def _host_time(fn, runs: int, warmup: int) -> list[float]:
    """Seconds per call of a host-side function (a DLPack hand-over)."""
    for _ in range(warmup):
        fn()
    return wall_samples(fn, runs)


def _device_copy_time(src: torch.Tensor, dst: torch.Tensor, runs: int, warmup: int) -> list[float]:
    """Seconds per ``dst.copy_(src)``: CUDA events on the GPU, else wall time."""
    def copy():
        dst.copy_(src)

    for _ in range(warmup):
        copy()
    if not src.is_cuda:
        return wall_samples(copy, runs)
    torch.cuda.synchronize()
    return [event_seconds(copy) for _ in range(runs)]


def bench_share(sizes: list[int], runs: int, warmup: int) -> list[dict]:
    device = "cuda" if _on_gpu() else "cpu"
    jax_device = jax.devices("gpu" if device == "cuda" else "cpu")[0]
    rows = []
    for size in sizes:
        tensor = torch.empty(size // 4, dtype=torch.float32, device=device)
        tensor.fill_(1.0)
        array = jax.device_put(jnp.ones(size // 4, jnp.float32), jax_device).block_until_ready()
        copy_target = torch.empty_like(tensor)
        if device == "cuda":
            torch.cuda.synchronize()
        timings = {
            "torch->jax (bridge.to_jax)": _host_time(lambda: bridge.to_jax(tensor), runs, warmup),
            "torch->jax (jax.dlpack.from_dlpack)":
                _host_time(lambda: jax.dlpack.from_dlpack(tensor), runs, warmup),
            "jax->torch (bridge.to_torch)": _host_time(lambda: bridge.to_torch(array), runs, warmup),
            "jax->torch (torch.from_dlpack)": _host_time(lambda: torch.from_dlpack(array), runs, warmup),
            "device copy (Tensor.copy_)": _device_copy_time(tensor, copy_target, runs, warmup),
        }
        for impl, samples in timings.items():
            rows.append(dict(op="share", impl=impl, device=_device_label(), size_bytes=size,
                             median_us=_median_us(samples), runs=len(samples)))
        del tensor, array, copy_target
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _decode_inputs(batch, nheads, headdim, dstate, ngroups, seed=0):
    """numpy inputs of one Mamba-2 decode step (tied per-head dt/A/dt_bias),
    sequences in random blocks of a cache with 2 * batch + 1 blocks."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    num_blocks = 2 * batch + 1
    inputs = dict(x=r(batch, nheads, headdim), dt=r(batch, nheads) * 0.5, A=-np.exp(r(nheads) * 0.5),
                  B=r(batch, ngroups, dstate), C=r(batch, ngroups, dstate), D=r(nheads),
                  dt_bias=r(nheads) * 0.5, z=r(batch, nheads, headdim),
                  state_batch_indices=rng.permutation(np.arange(1, num_blocks))[:batch].astype(np.int32))
    return inputs, num_blocks, r(num_blocks, nheads, headdim, dstate)


def _stream_time(step, runs: int, calls: int, finish) -> list[float]:
    """Seconds per ``step()`` in a stream: ``(run(2 calls) - run(calls)) / calls``."""
    def run(n):
        start = time.perf_counter()
        for _ in range(n):
            last = step()
        finish(last)
        return time.perf_counter() - start

    return [(run(2 * calls) - run(calls)) / calls for _ in range(runs)]


def bench_inplace_step(batch, nheads, headdim, dstate, ngroups, runs, warmup) -> list[dict]:
    device = "cuda" if _on_gpu() else "cpu"
    step_fn = jax.jit(jax_impl.selective_state_update, donate_argnums=0,
                      static_argnames=("dt_softplus",))
    arrays, num_blocks, initial_state = _decode_inputs(batch, nheads, headdim, dstate, ngroups)
    jax_device = jax.devices("gpu" if device == "cuda" else "cpu")[0]
    inputs = {k: jax.device_put(jnp.asarray(v), jax_device) for k, v in arrays.items()}
    shape = f"batch={batch},nheads={nheads},headdim={headdim},dstate={dstate},blocks={num_blocks}"

    conv_placeholder = (1, 1)  # the step touches only the SSM state
    cache = bridge.MambaStateCache([conv_placeholder, (nheads, headdim, dstate)], "float32", num_blocks,
                                   owner="torch", device=device)
    cache.torch("ssm").copy_(torch.from_numpy(initial_state))

    def torch_owned(order_torch):
        return lambda: cache.run_jax_inplace(step_fn, **inputs, dt_softplus=True,
                                             order_torch=order_torch).outputs

    # An XLA-owned state (device_put of a numpy array may alias host memory on CPU).
    state = [jax.jit(lambda a: a + 0)(jax.device_put(jnp.asarray(initial_state), jax_device))]

    def jax_owned():
        out, state[0] = step_fn(state[0], **inputs, dt_softplus=True)
        return out, state[0]

    def finish(outputs):
        jax.block_until_ready(outputs)
        if device == "cuda":
            torch.cuda.synchronize()  # torch's stream too: it may wait on the steps

    rows = []
    variants = (("JAX-owned array", jax_owned),
                ("torch-owned cache, order_torch=True", torch_owned(True)),
                ("torch-owned cache, order_torch=False", torch_owned(False)))
    for impl, step in variants:
        synced = _host_time(lambda: finish(step()), runs, warmup)
        pipelined = _stream_time(step, max(3, runs // 10), 10 if device == "cuda" else 1, finish)
        rows.append(dict(op="jax_inplace_step", impl=impl, device=_device_label(), shape=shape,
                         median_us=_median_us(synced),
                         pipelined_us=_median_us(pipelined), runs=len(synced)))
    total = cache.steps_aliased + cache.steps_written_back
    note = ("zero copies" if cache.steps_written_back == 0 else
            f"XLA did not alias: {cache.steps_written_back}/{total} steps written back")
    for row in rows[1:]:
        row.update(steps_aliased=cache.steps_aliased, steps_written_back=cache.steps_written_back,
                   note=note)
    return rows


def run(quick: bool) -> list[dict]:
    """All rows; ``quick`` keeps the sizes small (two share sizes, a small step)."""
    if _on_gpu():
        sizes = [MB, 64 * MB] if quick else [MB, 64 * MB, 1024 * MB, 8192 * MB]
        step = dict(MAMBA2_2P7B_HEADS, batch=64 if quick else 256)
        runs, warmup, step_runs = (50, 5, 20) if quick else (200, 20, 100)
    else:
        sizes = [64 * 1024, MB]
        step = dict(CPU_HEADS, batch=2)  # interpreted Pallas
        runs, warmup, step_runs = (20, 3, 3) if quick else (100, 10, 10)
    return bench_share(sizes, runs, warmup) + bench_inplace_step(**step, runs=step_runs,
                                                                 warmup=max(1, step_runs // 10))


def _format(rows: list[dict]) -> str:
    lines = ["| op | impl | size / shape | median (us) | pipelined (us/step) | note |",
             "| --- | --- | --- | ---: | ---: | --- |"]
    for row in rows:
        what = f"{row['size_bytes'] / MB:g} MB" if "size_bytes" in row else row["shape"]
        pipelined = f"{row['pipelined_us']:.1f}" if "pipelined_us" in row else ""
        lines.append(f"| {row['op']} | {row['impl']} | {what} | {row['median_us']:.1f} | {pipelined} "
                     f"| {row.get('note', '')} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)
    rows = run(args.quick)
    env = environment()
    header = "\n".join([*(f"- {k}: {v}" for k, v in env.items()),
                        f"- command: `{' '.join(['python -m experiments.bench_bridge', *argv])}`"])
    text = f"# DLPack bridge costs on {_device_label()}\n\n{header}\n\n{_format(rows)}\n"
    print(text)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        stem = f"bridge-{env['date']}-{_device_label().replace(' ', '_')}"
        (RESULTS / f"{stem}.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
        (RESULTS / f"{stem}.md").write_text(text)
        print(f"wrote {RESULTS / stem}.json/.md")


if __name__ == "__main__":
    main()
