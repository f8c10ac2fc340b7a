"""Tune the chunked scan's per-stage launch configs on this GPU.

    python -m experiments.tune_ssd [--backend triton|pallas|both] [--stages ...]
                                   [--save-configs] [--output-dir DIR] [--quick]

Each candidate config of a stage is pinned with the package's
``ssd_common.SSD_CONFIGS.override`` and timed on the stage alone (Mamba-2 2.7B heads,
16k tokens, bf16; see ``bench_ssd.stage_shape``); a candidate whose result
differs from the default config's beyond bf16 rounding is dropped. With
``--save-configs`` the fastest of each stage goes into the file the lookup
reads: ``<package>/configs/mamba_chunk_scan_combined/device_name=<gpu>.json``
(or ``DIR/<backend>/mamba_chunk_scan_combined/...``; with DIR the user cache,
``${XDG_CACHE_HOME:-~/.cache}/mamba_twin``, the lookup reads it after the
shipped files), merged with what is there. Prints default vs tuned time per stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np

from experiments import bench_ssd
from experiments.report import Progress
from bridge.spec.ssd_launch_config import DEFAULT_STAGE_CONFIGS, stage_config


def _grid(stage, **choices):
    keys = list(choices)
    return [stage_config(stage, dict(zip(keys, values))) for values in itertools.product(*choices.values())]


CANDIDATES = {
    "chunk_state": _grid("chunk_state", BLOCK_SIZE_M=[64], BLOCK_SIZE_N=[64, 128], BLOCK_SIZE_K=[32, 64],
                         num_warps=[4, 8], num_stages=[2, 3]),
    "state_passing": _grid("state_passing", BLOCK_SIZE_M=[16, 32, 64], BLOCK_SIZE_N=[32, 64, 128], num_warps=[2, 4],
                           num_stages=[1]),
    "chunk_scan": _grid("chunk_scan", BLOCK_SIZE_M=[32, 64, 128], BLOCK_SIZE_N=[64], BLOCK_SIZE_K=[32, 64],
                        num_warps=[2, 4, 8], num_stages=[2, 3, 4, 5]),
    # The backward's stage 4 (two kernels, a config each; Triton's and Pallas's alike).
    **{stage: _grid(stage, BLOCK_SIZE_M=[64, 128], BLOCK_SIZE_K=[32, 64], num_warps=[4, 8],
                    num_stages=[1, 2, 3])
       for stage in ("chunk_scan_bwd", "chunk_scan_bwd_dC")},
}
QUICK_CANDIDATES = {"chunk_scan": _grid("chunk_scan", BLOCK_SIZE_M=[16], BLOCK_SIZE_N=[16], BLOCK_SIZE_K=[16],
                                        num_warps=[4], num_stages=[1, 2])}


def _package(backend):
    if backend == "triton":
        from torch_impl import platform, ssd_common
        return ssd_common.SSD_CONFIGS, platform.device_name(platform.default_device())
    from jax_impl import platform, ssd_common
    return ssd_common.SSD_CONFIGS, platform.device_name()


def _as_numpy(result):
    first = result[0] if isinstance(result, tuple) else result
    return np.asarray(first.float().cpu() if hasattr(first, "cpu") else first.astype(np.float32),
                      np.float64)


def tune_backend(backend, stages, quick):
    """{stage: (default_us, best_us, best_config)} on this device."""
    configs, _ = _package(backend)
    seqlens, shape, repeats = bench_ssd.stage_shape(quick)
    calls, arrays = bench_ssd.stage_calls(backend, seqlens, **shape, input_dtype="bfloat16")
    candidates = QUICK_CANDIDATES if quick else CANDIDATES
    results = {}
    progress = Progress(sum(len(candidates.get(stage, [])) for stage in stages), f"tune_ssd {backend}")
    for stage in stages:
        want = _as_numpy(calls[stage](arrays))
        scale = np.abs(want).max()
        default_us = bench_ssd.time_stage(backend, calls[stage], arrays, repeats) * 1e6
        best = (default_us, DEFAULT_STAGE_CONFIGS[stage])
        for config in candidates.get(stage, []):
            progress.step(f"{stage} {config}")
            with configs.override(stage, config):
                try:
                    got = _as_numpy(calls[stage](arrays))
                    seconds = bench_ssd.time_stage(backend, calls[stage], arrays, repeats)
                except Exception as error:  # a config the compiler rejects (e.g. out of shared memory)
                    print(f"  {config}: {type(error).__name__}")
                    continue
            if np.abs(got - want).max() > 2e-2 * scale:
                print(f"  {config}: result differs from the default's, dropped")
                continue
            if seconds * 1e6 < best[0]:
                best = (seconds * 1e6, config)
        results[stage] = (default_us, best[0], best[1])
    progress.finish()
    return results


def save(backend, results, output_dir):
    configs, device_name = _package(backend)
    path = configs.file_path(device_name, Path(output_dir) / backend if output_dir else None)
    saved = json.loads(path.read_text()) if path.exists() else {}
    saved.update({stage: dataclasses.asdict(config) for stage, (_, _, config) in results.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["triton", "pallas", "both"], default="both")
    parser.add_argument("--stages", nargs="*", default=None)
    parser.add_argument("--save-configs", action="store_true")
    parser.add_argument("--output-dir", help="write DIR/<backend>/... instead of the package folder")
    parser.add_argument("--quick", action="store_true", help="tiny shape, two candidates (CI)")
    args = parser.parse_args(argv)
    stages = args.stages or list(QUICK_CANDIDATES if args.quick else CANDIDATES)
    all_results = {}
    for backend in (["triton", "pallas"] if args.backend == "both" else [args.backend]):
        results = tune_backend(backend, stages, args.quick)
        all_results[backend] = results
        print(f"{backend:<8}{'stage':<15}{'default us':>12}{'tuned us':>10}  config")
        for stage, (default_us, best_us, config) in results.items():
            print(f"{'':<8}{stage:<15}{default_us:>12.1f}{best_us:>10.1f}  {config}")
        if args.save_configs:
            save(backend, results, args.output_dir)
    return all_results


if __name__ == "__main__":
    main()
