"""How the experiments time kernels and measure errors, in one place.

- ``time_torch(fn, repeats)``: median seconds per ``fn()``. On a GPU, after
  warm-up, each sample is enough back-to-back calls to span about a
  millisecond (so launch latency is amortised), captured in one CUDA graph
  (``graph=False`` replays them eagerly, for code that syncs with the host)
  and timed with CUDA events.
- ``time_jax(step, carry, repeats)``: median seconds per ``carry = step(carry)``,
  warm-up (compilation) first. On a GPU each sample is the difference of two
  runs of back-to-back asynchronous calls, ``n`` and ``2n`` (spanning about
  4 and 8 ms), each ended by ``block_until_ready``, divided by ``n``: the
  fixed cost of a run (the first dispatch's latency, the final wait, about
  0.2-0.4 ms on the H100) cancels, leaving the time per call of a steady
  stream, which is device time when the device is the bottleneck. (Ending
  a run of a few calls with a wait and dividing, as before 2026-11-25,
  charged that fixed cost to the calls: +25-60% on 0.1-0.3 ms kernels,
  seen against the CUPTI timeline.)
- ``copy_bandwidth_GBps`` and ``matmul_TFLOPs``: the device's ceilings,
  timed with CUDA events, that figures are shown as fractions of. The copy is
  timed eagerly: captured in a CUDA graph, ``Tensor.copy_`` becomes a memcpy
  node that runs on a copy engine, measured at 2416 GB/s on the H100 against
  2941 GB/s for the eager copy kernel and 2990 GB/s for an elementwise copy.
- ``rel_error``: max |got - want| / max |want|, in float64.

On a CPU every sample is a single call timed by the wall clock: kernels run
in the Triton / Pallas interpreters and the times are interpreter times.
"""

from __future__ import annotations

import math
import os
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

import numpy as np  # noqa: E402
import torch  # noqa: E402

import torch_impl  # noqa: E402  (the CUDA-graph capture mode)

ON_GPU = torch.cuda.is_available()
SAMPLE_SECONDS = 1e-3  # a GPU sample spans at least this long
JAX_RUN_SECONDS = 4e-3  # the shorter of a JAX sample's two runs spans about this long
MAX_CALLS_PER_SAMPLE = 200  # bounds the CUDA graph's size for tiny kernels
WARMUP_CALLS = 2 if ON_GPU else 1  # first call compiles; on CPU the interpreter is slow
H100_L2_BYTES = 50 * 2**20


def rel_error(got, want) -> float:
    """max |got - want| / max |want| over all elements, computed in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _calls_per_sample(seconds_per_call: float, sample_seconds: float = SAMPLE_SECONDS) -> int:
    if not ON_GPU:
        return 1
    return max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(sample_seconds / max(seconds_per_call, 1e-9))))


def wall_samples(fn, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` single calls (CPU timing; host-side work)."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def event_seconds(run) -> float:
    """Device seconds of ``run()``, timed with CUDA events on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def time_torch(fn, repeats: int, graph: bool = True) -> float:
    """Median seconds per ``fn()`` call (see the module docstring)."""
    for _ in range(WARMUP_CALLS):
        fn()
    if not ON_GPU:
        return statistics.median(wall_samples(fn, repeats))
    torch.cuda.synchronize()
    calls = _calls_per_sample(event_seconds(fn))

    def run_calls():
        for _ in range(calls):
            fn()

    if graph:
        cuda_graph = torch.cuda.CUDAGraph()
        with torch_impl.platform.cuda_graph(cuda_graph):
            run_calls()
        run = cuda_graph.replay
        run()  # the first replay uploads the graph
    else:
        run = run_calls
    return statistics.median([event_seconds(run) / calls for _ in range(repeats)])


def time_jax(step, carry, repeats: int) -> float:
    """Median seconds per ``carry = step(carry)`` (see the module docstring).
    ``carry`` may be donated by ``step``: pass a scratch copy."""
    import jax

    for _ in range(WARMUP_CALLS):
        carry = jax.block_until_ready(step(carry))
    state = [carry]  # the latest carry, threaded through the samples

    def run(calls: int) -> float:
        """Wall seconds of ``calls`` back-to-back calls and the wait for the last."""
        start = time.perf_counter()
        for _ in range(calls):
            state[0] = step(state[0])
        jax.block_until_ready(state[0])
        return time.perf_counter() - start

    if not ON_GPU:
        return statistics.median([run(1) for _ in range(repeats)])
    calls = _calls_per_sample(run(1), JAX_RUN_SECONDS)
    return statistics.median([(run(2 * calls) - run(calls)) / calls for _ in range(repeats)])


def l2_cache_bytes() -> int:
    """The GPU's L2 size (the H100's when torch does not report it)."""
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(properties, "L2_cache_size", 0) or H100_L2_BYTES


def copy_bandwidth_GBps(num_bytes: int, repeats: int) -> float:
    """Device-to-device copy (``Tensor.copy_``) of ``num_bytes``: read + write
    bytes per second, in GB/s — the state update's ceiling."""
    device = "cuda" if ON_GPU else "cpu"
    src = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * num_bytes / time_torch(lambda: dst.copy_(src), repeats, graph=False) / 1e9


def matmul_TFLOPs(n: int, repeats: int) -> float:
    """bf16 ``torch.matmul`` of two n x n matrices, in TFLOP/s — the chunked
    scan's ceiling."""
    device = "cuda" if ON_GPU else "cpu"
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    return 2 * n**3 / time_torch(lambda: torch.matmul(a, b, out=c), repeats) / 1e12
