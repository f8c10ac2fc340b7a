"""First-use autotuning of the state update's launch config and the explicit
warm-up, on scratch buffers (never the caller's state). The lookup order and
the cache: ``bridge.spec.launch_config``. Mirror: ``jax_impl/autotune.py``."""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Callable, Optional, Sequence

import torch

from bridge.spec import launch_config as lc
from torch_impl import platform

REPEATS = 5  # timed samples per candidate, median taken


def on_gpu(device: torch.device) -> bool:
    return device.type == "cuda" and not platform.INTERPRET


def scratch_timer(shape: lc.SsuShape, device: torch.device) -> Callable[[], float]:
    """Seconds per step of ``selective_state_update`` on scratch buffers of
    ``shape`` with the config the lookup gives: each sample rotates through
    disjoint slot sets of a scratch cache (``SsuShape.scratch_sets``) so the
    state comes from memory, captured in one CUDA graph (a small batch's
    kernel is shorter than an eager launch) and timed with CUDA events."""
    from torch_impl.selective_state_update import selective_state_update  # imports this module

    sets = shape.scratch_sets(lc.SCRATCH_ROTATE_BYTES if on_gpu(device) else 0)
    inputs = {k: torch.from_numpy(v).to(device) for k, v in shape.scratch_inputs(sets).items()}
    index_sets = list(inputs.pop("index_sets"))
    state = torch.zeros((1 + sets * shape.batch, shape.nheads, shape.headdim, shape.dstate),
                        dtype=getattr(torch, shape.state_dtype), device=device)
    out = torch.empty_like(inputs["x"])

    def rotate():
        for indices in index_sets:
            selective_state_update(state, **inputs, out=out, dt_softplus=True,
                                   state_batch_indices=indices, validate_indices=False)

    def time_step() -> float:
        with platform.on_device(device):
            rotate()  # compiles the pinned config
            if not on_gpu(device):
                start = time.perf_counter()
                rotate()
                return (time.perf_counter() - start) / sets
            graph = torch.cuda.CUDAGraph()
            with platform.cuda_graph(graph):
                rotate()
            graph.replay()  # the first replay uploads the graph
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            samples = []
            for _ in range(REPEATS):
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3 / sets)
            return statistics.median(samples)
    return time_step


@dataclasses.dataclass(frozen=True)
class SsuTuner:
    """Times launch configs on ``device`` (``bridge.spec.launch_config.SsuTuner``)."""
    device: torch.device

    def blocked(self) -> Optional[str]:
        if torch.cuda.is_current_stream_capturing():
            return "inside CUDA-graph capture"
        if torch.compiler.is_compiling():
            return "inside torch.compile tracing"
        return None

    def scratch_timer(self, shape: lc.SsuShape) -> Callable[[], float]:
        return scratch_timer(shape, self.device)


_TUNERS = functools.lru_cache(maxsize=None)(SsuTuner)  # one per device: the launch path asks per call


def tuner(device: torch.device) -> Optional[SsuTuner]:
    """The tuner of ``device``; None off the GPU, where timings mean nothing
    (no autotuning there, and no warning)."""
    return _TUNERS(device) if on_gpu(device) else None


def warmup_launch_configs(*, nheads: int, headdim: int, dstate: int, state_dtype: str = "float32",
                          batches: Sequence[int] = lc.WARMUP_BATCHES, is_blackwell: bool = False,
                          device=None) -> dict[int, lc.LaunchConfig]:
    """``{batch: (BLOCK_SIZE_M, num_warps)}`` of the state update for a
    state of (nheads, headdim, dstate) in ``state_dtype`` ('float32',
    'float16' or 'bfloat16') at each batch, autotuned now on ``device``
    (default: the current GPU) where no override, shipped or cached file
    answers, and written to the user cache. Call it before capturing CUDA
    graphs or compiling; RuntimeError without a GPU."""
    from torch_impl.selective_state_update import SSU_CONFIGS  # imports this module

    device = platform.default_device() if device is None else torch.device(device)
    return SSU_CONFIGS.warmup(nheads=nheads, headdim=headdim, dstate=dstate, state_dtype=state_dtype,
                              batches=batches, tuner=tuner(device), is_blackwell=is_blackwell,
                              device_name=platform.device_name(device))
