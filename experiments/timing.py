"""How the experiments time kernels and measure errors, in one place.

- ``time_torch(fn, repeats)``: median seconds per ``fn()``. On a GPU, after
  warm-up, each sample is enough back-to-back calls to span about a
  millisecond (so launch latency is amortised), captured in one CUDA graph
  (``graph=False`` replays them eagerly, for code that syncs with the host)
  and timed with CUDA events.
- ``time_jax(step, carry, repeats)``: median seconds per ``carry = step(carry)``,
  warm-up (compilation) first; on a GPU each sample is enough back-to-back
  calls to span about a millisecond, dispatched asynchronously and ended by
  ``block_until_ready``, so host dispatch overlaps device work.
- ``copy_bandwidth_GBps`` and ``matmul_TFLOPs``: the device's ceilings,
  measured the same way, that figures are shown as fractions of.
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

ON_GPU = torch.cuda.is_available()
SAMPLE_SECONDS = 1e-3  # a GPU sample spans at least this long
MAX_CALLS_PER_SAMPLE = 200  # bounds the CUDA graph's size for tiny kernels
WARMUP_CALLS = 2 if ON_GPU else 1  # first call compiles; on CPU the interpreter is slow
H100_L2_BYTES = 50 * 2**20


def rel_error(got, want) -> float:
    """max |got - want| / max |want| over all elements, computed in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _calls_per_sample(seconds_per_call: float) -> int:
    if not ON_GPU:
        return 1
    return max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(SAMPLE_SECONDS / max(seconds_per_call, 1e-9))))


def _wall_samples(run, repeats: int, calls: int, finish=lambda: None) -> list[float]:
    """Wall seconds per call: ``repeats`` samples of ``run()`` repeated ``calls`` times."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        finish()
        samples.append((time.perf_counter() - start) / calls)
    return samples


def _event_seconds(run) -> float:
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
        return statistics.median(_wall_samples(fn, repeats, calls=1))
    torch.cuda.synchronize()
    calls = _calls_per_sample(_event_seconds(fn))

    def run_calls():
        for _ in range(calls):
            fn()

    if graph:
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            run_calls()
        run = cuda_graph.replay
        run()  # the first replay uploads the graph
    else:
        run = run_calls
    return statistics.median([_event_seconds(run) / calls for _ in range(repeats)])


def time_jax(step, carry, repeats: int) -> float:
    """Median seconds per ``carry = step(carry)`` (see the module docstring).
    ``carry`` may be donated by ``step``: pass a scratch copy."""
    import jax

    for _ in range(WARMUP_CALLS):
        carry = jax.block_until_ready(step(carry))
    start = time.perf_counter()
    carry = jax.block_until_ready(step(carry))
    calls = _calls_per_sample(time.perf_counter() - start)
    state = [carry]  # the latest carry, threaded through the samples

    def call():
        state[0] = step(state[0])

    return statistics.median(_wall_samples(call, repeats, calls,
                                           finish=lambda: jax.block_until_ready(state[0])))


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
    return 2 * num_bytes / time_torch(lambda: dst.copy_(src), repeats) / 1e9


def matmul_TFLOPs(n: int, repeats: int) -> float:
    """bf16 ``torch.matmul`` of two n x n matrices, in TFLOP/s — the chunked
    scan's ceiling."""
    device = "cuda" if ON_GPU else "cpu"
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    return 2 * n**3 / time_torch(lambda: torch.matmul(a, b, out=c), repeats) / 1e12
