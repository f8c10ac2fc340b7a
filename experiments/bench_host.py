"""Host cost of the torch ops' eager path (issue 11's bars), in the main job:

- ``selective_state_update`` at batch 1 (Mamba-2 2.7B heads, float32 state,
  slot indices): wall time per eager call in a steady stream of calls, next to
  the same call through the original mamba_ssm launcher when its Triton files
  are importable (``experiments.anchors``), and the kernel's own device time;
- ``mamba_chunk_scan_combined_varlen`` at 4k tokens (bf16): wall time per
  eager call against its time replayed from a CUDA graph.

A steady stream: ``n`` back-to-back calls and one synchronize, divided by
``n`` (the host's cost per call when the host is the bottleneck; the device's
when it is). Median of the samples after warm-up. On a CPU the kernels run
interpreted and the figures are interpreter times.

    python -m experiments.bench_host [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import torch_impl  # before triton: interpreter mode on CPU
import torch

from bridge.spec.ssd_contract import chunk_metadata
from experiments.anchors import mamba_ssm_op
from experiments.shapes import CPU_HEADS, CPU_SSD, MAMBA2_2P7B_HEADS, MAMBA2_2P7B_SSD, PREFILL_TOKENS
from experiments.timing import ON_GPU, time_torch

SSU_SHAPE = MAMBA2_2P7B_HEADS if ON_GPU else CPU_HEADS
SSD_SHAPE = MAMBA2_2P7B_SSD if ON_GPU else CPU_SSD
SSD_TOKENS = PREFILL_TOKENS[0] if ON_GPU else 2 * CPU_SSD["chunk_size"]


def stream_seconds(fn, calls: int, samples: int) -> float:
    """Median wall seconds per call of ``calls`` back-to-back ``fn()`` and one sync."""
    sync = torch.cuda.synchronize if ON_GPU else (lambda: None)
    fn()
    sync()
    results = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        results.append((time.perf_counter() - start) / calls)
    return statistics.median(results)


def mamba_ssm_state_update():
    """mamba_ssm's ``selective_state_update`` launcher, or None."""
    return mamba_ssm_op("selective_state_update", "selective_state_update")


def ssu_rows(quick: bool) -> list[dict]:
    device = torch_impl.platform.default_device()
    H, P, N = SSU_SHAPE["nheads"], SSU_SHAPE["headdim"], SSU_SHAPE["dstate"]
    batch = 1
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    state = rand(batch + 1, H, P, N)
    x, z = rand(batch, H, P), rand(batch, H, P)
    # The tied-head layout as vLLM's mixer passes it: stride-0 expansions.
    dt = rand(batch, H)[..., None].expand(batch, H, P)
    A = (-torch.rand(H, generator=gen)).to(device)[:, None, None].expand(H, P, N)
    dt_bias = rand(H)[:, None].expand(H, P)
    D = rand(H)[:, None].expand(H, P)
    B, C = rand(batch, 1, N), rand(batch, 1, N)
    slots = torch.arange(1, batch + 1, dtype=torch.int32, device=device)
    out = torch.empty_like(x)
    kwargs = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=True, state_batch_indices=slots)

    def ours():
        torch_impl.selective_state_update(state, x, dt, A, B, C, out=out, **kwargs)

    calls, samples = (20, 3) if quick or not ON_GPU else (500, 15)
    rows = [dict(op="host_state_update", implementation="torch_impl (default path)", batch=batch,
                 wall_us_per_call=stream_seconds(ours, calls, samples) * 1e6)]
    anchor = mamba_ssm_state_update()
    if anchor is not None and ON_GPU:
        anchor(state.clone(), x, dt, A, B, C, **kwargs)  # compiles
        rows.append(dict(op="host_state_update", implementation="mamba_ssm 2.3.2 launcher",
                         batch=batch, wall_us_per_call=stream_seconds(
                             lambda: anchor(state, x, dt, A, B, C, **kwargs), calls, samples) * 1e6))
    if ON_GPU:
        rows.append(dict(op="host_state_update", implementation="kernel (CUDA graph)", batch=batch,
                         wall_us_per_call=time_torch(ours, samples) * 1e6))
    return rows


def ssd_rows(quick: bool) -> list[dict]:
    device = torch_impl.platform.default_device()
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    H, P, N, chunk = (SSD_SHAPE[k] for k in ("nheads", "headdim", "dstate", "chunk_size"))
    T = SSD_TOKENS
    gen = torch.Generator().manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    x, z = rand(T, H, P), rand(T, H, P)
    dt = rand(T, H)
    B, C = rand(T, 1, N), rand(T, 1, N)
    A = (-torch.rand(H, generator=gen)).to(device)
    D, dt_bias = torch.randn(H, generator=gen).to(device), torch.randn(H, generator=gen).to(device)
    cu_seqlens = np.array([0, T], dtype=np.int32)
    meta = chunk_metadata(cu_seqlens, chunk)
    index = lambda a: torch.from_numpy(np.asarray(a, np.int32)).to(device)  # noqa: E731
    out = torch.empty_like(x)
    args = (x, dt, A, B, C, chunk, index(cu_seqlens), index(meta.cu_chunk_seqlens),
            index(meta.last_chunk_indices), index(meta.seq_idx), out)
    kwargs = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=True)

    def call():
        torch_impl.mamba_chunk_scan_combined_varlen(*args, **kwargs)

    calls, samples = (3, 3) if quick or not ON_GPU else (50, 15)
    eager = stream_seconds(call, calls, samples)
    row = dict(op="host_chunked_scan", implementation="torch_impl (default path)", tokens=T,
               wall_us_per_call=eager * 1e6)
    if ON_GPU:
        graph = time_torch(call, samples)
        row.update(graph_us_per_call=graph * 1e6, eager_over_graph=eager / graph)
    return [row]


def run(quick: bool) -> list[dict]:
    return ssu_rows(quick) + ssd_rows(quick)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    for row in run(args.quick):
        print(row)


if __name__ == "__main__":
    main()
