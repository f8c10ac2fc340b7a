"""The device's own timeline of back-to-back calls of each implementation:
every kernel with its start, its duration and the idle gap before it, as
CUPTI records them through ``torch.profiler`` (which sees JAX's kernels too:
both frameworks share the process's CUDA context). It separates what a wall
clock cannot: kernel time from launch gaps, and one framework's kernels from
the other's.

    python -m experiments.kernel_timeline [--op state_update|chunked_scan|chunked_scan_backward]
        [--batch 64] [--tokens 4096] [--calls 4]

GPU only. For each of Triton and Pallas: the kernels of ``--calls`` calls
(after warm-up), and the device time per call (first kernel's start to last
kernel's end, over the calls). The state update rotates through disjoint
cache-slot sets as ``experiments.compare`` does (one call = one step per set);
the chunked scan runs ``--tokens`` tokens as one sequence; its backward
(forward + backward, with mamba_ssm's when carried) prints the device time
per kernel name instead of the timeline.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

import torch  # noqa: E402
import jax  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from experiments import bench_ssd, ssu_case  # noqa: E402
from experiments.shapes import MAMBA2_2P7B_SSD  # noqa: E402
from experiments.timing import l2_cache_bytes  # noqa: E402

DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")
WARMUP_CALLS = 3


def device_events(call, calls: int) -> list[dict]:
    """CUPTI's device events (kernels, copies, memsets) of ``calls`` calls
    after warm-up, sorted by start; ``ts`` and ``dur`` in microseconds."""
    for _ in range(WARMUP_CALLS):
        jax.block_until_ready(call())
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            last = call()
        jax.block_until_ready(last)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    return sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_EVENTS),
                  key=lambda e: e["ts"])


def print_timeline(name: str, events: list[dict], calls: int, max_lines: int = 30) -> None:
    if not events:
        print(f"{name}: no device events")
        return
    start = events[0]["ts"]
    span = events[-1]["ts"] + events[-1]["dur"] - start
    busy = sum(e["dur"] for e in events)
    print(f"{name}: {len(events)} device events in {calls} calls; {span / calls:.1f} us per call, "
          f"of which kernels {busy / calls:.1f} us")
    print(f"{'start (us)':>12}{'gap':>9}{'duration':>10}  kernel")
    previous_end = start
    for e in events[:max_lines]:
        print(f"{e['ts'] - start:12.1f}{e['ts'] - previous_end:9.1f}{e['dur']:10.1f}  {e['name'][:70]}")
        previous_end = e["ts"] + e["dur"]


def state_update_calls(batch: int) -> dict:
    case = ssu_case.make_decode_case(batch, **ssu_case.MAMBA2_2P7B, state_dtype="float32",
                                     rotate_bytes=2 * l2_cache_bytes())
    return {name: ssu_case.rotation(name, ssu_case.prepare(case, framework))[0]
            for name, framework in (("triton", "torch"), ("pallas", "jax"))}


def chunked_scan_calls(tokens: int) -> dict:
    shape = MAMBA2_2P7B_SSD
    arrays, index = bench_ssd.make_inputs([tokens], **shape)
    return bench_ssd.scan_calls(arrays, index, shape["chunk_size"], "bfloat16")


def chunked_scan_backward_calls(tokens: int) -> dict:
    """Forward + backward (``bench_ssd.backward_calls``: Triton, Pallas, and
    mamba_ssm's when its files are carried), bf16, one sequence."""
    shape = MAMBA2_2P7B_SSD
    arrays, index = bench_ssd.make_inputs([tokens], **shape)
    return bench_ssd.backward_calls(arrays, index, shape["chunk_size"], "bfloat16")


def print_kernel_totals(name: str, events: list[dict], calls: int, count: int = 12) -> None:
    """Per kernel name: device time per call, the costliest first; and the
    span per call (first start to last end: kernel time plus the gaps)."""
    if not events:
        print(f"{name}: no device events")
        return
    totals: dict = {}
    for e in events:
        totals[e["name"][:70]] = totals.get(e["name"][:70], 0.0) + e["dur"] / calls
    span = (events[-1]["ts"] + events[-1]["dur"] - events[0]["ts"]) / calls
    print(f"{name}: kernels {sum(totals.values()):.1f} us per call in a span of {span:.1f} us; "
          f"the costliest:")
    for kernel, us in sorted(totals.items(), key=lambda item: -item[1])[:count]:
        print(f"{us:12.1f}  {kernel}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", choices=["state_update", "chunked_scan", "chunked_scan_backward"],
                        default="state_update")
    parser.add_argument("--batch", type=int, default=64, help="state update: sequences per step")
    parser.add_argument("--tokens", type=int, default=4096, help="chunked scan: tokens")
    parser.add_argument("--calls", type=int, default=4)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernel_timeline: needs a CUDA GPU (CUPTI)")
    if args.op == "chunked_scan_backward":  # many kernels: totals per kernel rather than the timeline
        for name, call in chunked_scan_backward_calls(args.tokens).items():
            print_kernel_totals(f"{args.op} {name}", device_events(call, args.calls), args.calls)
        return
    calls = state_update_calls(args.batch) if args.op == "state_update" else chunked_scan_calls(args.tokens)
    for name, call in calls.items():
        print_timeline(f"{args.op} {name}", device_events(call, args.calls), args.calls)


if __name__ == "__main__":
    main()
