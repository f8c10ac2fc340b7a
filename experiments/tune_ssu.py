"""Tune the state update's launch configs (BLOCK_SIZE_M, num_warps) on this GPU.

    python -m experiments.tune_ssu [--save-configs] [--backend triton|pallas|both]
        [--batches 1 2 4 ...] [--state-dtypes float32 bfloat16] [--output-dir DIR]
        [--block-sizes 4 8 ...] [--num-warps 1 2 4 8] [--quick] [--report FILE.md]

For each backend, state dtype and batch (Mamba-2 2.7B heads by default:
nheads 80, headdim 64, dstate 128), every candidate (BLOCK_SIZE_M a power of
two up to headdim, num_warps 1-8, or the ``--block-sizes`` x ``--num-warps``
given) is pinned with ``override_ssm_config`` and
measured as the comparison measures the state update
(``experiments.ssu_case``): checked against float64, then timed rotating
through disjoint cache-slot sets on a scratch copy of a random cache, so no
real state is touched. JAX re-traces per candidate (block sizes are static).
A candidate that does not compile or whose result is off is dropped; the
fastest of the rest wins.

``--save-configs`` writes, per backend and cache dtype, the file that
``bridge.spec.launch_config`` reads, keyed by effective batch (batch * nheads):
``<package>/configs/selective_state_update/headdim=..,dstate=..,device_name=..,cache_dtype=...json``
or, with ``--output-dir DIR``, ``DIR/<triton|pallas>/selective_state_update/<same name>``
(point ``$MAMBA_TWIN_TUNED_CONFIG_FOLDER`` at DIR, or make DIR the user cache,
``${XDG_CACHE_HOME:-~/.cache}/mamba_twin``, which the lookup reads after the
shipped files: the CLI warm-up). Entries of batches not tuned in this run are
kept, so a long tuning can be split over runs. (The packages' first-use
autotune, ``warmup_launch_configs``, times fewer candidates, without this
script's float64 check and report, and writes the same files.)

The report (Markdown and JSON; default
experiments/results/tune_ssu-<date>-<device>[-quick].md) gives per batch the
heuristic config and its time, the tuned one, and the gain.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from bridge.spec import launch_config as lc
from experiments import ssu_case
from experiments.report import Progress, default_output, environment, markdown_table
from experiments.shapes import CPU_HEADS as CPU_SHAPE, DECODE_BATCHES
from experiments.timing import ON_GPU, copy_bandwidth_GBps, l2_cache_bytes

# backend -> (implementation in ssu_case, module holding its SSU_CONFIGS table)
BACKENDS = {"triton": ("triton", "torch_impl.selective_state_update"),
            "pallas": ("pallas", "jax_impl.selective_state_update")}
BLOCK_SIZES_M = (1, 2, 4, 8, 16, 32, 64)
NUM_WARPS = (1, 2, 4, 8)
# A candidate's result must match float64 as the heuristic's does.
ERROR_LIMITS = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 2e-2}


def config_table(backend: str) -> lc.LaunchConfigTable:
    return importlib.import_module(BACKENDS[backend][1]).SSU_CONFIGS


def device_name(backend: str) -> str:
    """The name the backend's lookup uses for this device."""
    if backend == "triton":
        import torch_impl
        return torch_impl.platform.device_name(torch_impl.platform.default_device())
    import jax_impl
    return jax_impl.platform.device_name()


def candidate_configs(headdim: int, dstate: int, effective_batch: int, quick: bool,
                      block_sizes_m=BLOCK_SIZES_M, num_warps=NUM_WARPS) -> list[lc.LaunchConfig]:
    """The heuristic first, then the grid (quick: one more only)."""
    heuristic = lc.default_ssu_launch_config(headdim, dstate, effective_batch)
    grid = [(m, w) for m in block_sizes_m if m <= max(headdim, 1) for w in num_warps]
    others = [config for config in grid if config != heuristic]
    return [heuristic, *others[:1 if quick else None]]


def tune_one(case, backend, prepared, want, candidates, repeats, copy_GBps, progress) -> dict:
    """Every candidate on one (backend, state dtype, batch); the winner and the gain."""
    implementation = BACKENDS[backend][0]
    table = config_table(backend)
    limit = ERROR_LIMITS[case.state_dtype]
    measured = []
    for config in candidates:
        progress.step(f"{backend} {case.state_dtype} batch {case.batch} config {config}")
        entry = dict(BLOCK_SIZE_M=config[0], num_warps=config[1])
        with table.override(config):
            try:
                entry.update(ssu_case.measure(case, implementation, prepared, want, repeats))
            except Exception as error:  # noqa: BLE001  (compile failures: registers, shared memory)
                entry["dropped"] = f"{type(error).__name__}: {str(error)[:200]}"
        if "dropped" not in entry and max(entry["max_rel_error_out"], entry["max_rel_error_state"]) > limit:
            entry["dropped"] = f"error above {limit:g}"
        measured.append(entry)
    heuristic = measured[0]
    best = min((e for e in measured if "dropped" not in e), key=lambda e: e["median_us"])
    return dict(backend=backend, state_dtype=case.state_dtype, batch=case.batch,
                effective_batch=case.batch * case.nheads,
                heuristic=f"{heuristic['BLOCK_SIZE_M']}, {heuristic['num_warps']}",
                heuristic_us=heuristic.get("median_us"),
                tuned=f"{best['BLOCK_SIZE_M']}, {best['num_warps']}", tuned_us=best["median_us"],
                tuned_GBps=best["state_GBps"], fraction_of_copy=best["state_GBps"] / copy_GBps,
                gain=heuristic["median_us"] / best["median_us"] if "median_us" in heuristic else None,
                best=dict(BLOCK_SIZE_M=best["BLOCK_SIZE_M"], num_warps=best["num_warps"]),
                candidates=measured)


def save_configs(rows: list[dict], backend: str, shape: dict, output_dir: Path | None,
                 env: dict) -> list[Path]:
    """Merge the winners into the backend's config files, one per cache dtype."""
    table = config_table(backend)
    folder = (output_dir / table.backend if output_dir else table.bundled_dir) / table.op
    by_file: dict[Path, list[dict]] = {}
    for row in rows:
        name = lc.config_file_name(shape["headdim"], shape["dstate"],
                                   lc.canonical_cache_dtype(row["state_dtype"]),
                                   lc.device_name_key(device_name(backend)))
        by_file.setdefault(folder / name, []).append(row)
    for path, file_rows in by_file.items():
        lc.write_configs(path, {r["effective_batch"]: r["best"] for r in file_rows},
                         {"tuned_with": {k: env[k] for k in ("date", "device", "torch", "triton", "jax")}})
    return list(by_file)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save-configs", action="store_true", help="write the winners as config files")
    parser.add_argument("--backend", choices=["triton", "pallas", "both"], default="both")
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--state-dtypes", nargs="+", choices=list(ERROR_LIMITS))
    parser.add_argument("--nheads", type=int)
    parser.add_argument("--headdim", type=int)
    parser.add_argument("--dstate", type=int)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=list(BLOCK_SIZES_M),
                        help="BLOCK_SIZE_M candidates (powers of two)")
    parser.add_argument("--num-warps", type=int, nargs="+", default=list(NUM_WARPS))
    parser.add_argument("--output-dir", type=Path, help="write configs to DIR/<backend>/selective_state_update/")
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized: batches 1 and 64 (CPU: one tiny batch), two candidates, float32")
    parser.add_argument("--report", type=Path, help="Markdown report; the JSON goes next to it")
    args = parser.parse_args(argv)

    shape = dict(ssu_case.MAMBA2_2P7B if ON_GPU else CPU_SHAPE)
    shape.update({k: getattr(args, k) for k in ("nheads", "headdim", "dstate") if getattr(args, k)})
    batches = args.batches or ([1, 64] if ON_GPU and args.quick else [1] if args.quick else list(DECODE_BATCHES))
    state_dtypes = args.state_dtypes or (["float32"] if args.quick else ["float32", "bfloat16"])
    backends = list(BACKENDS) if args.backend == "both" else [args.backend]
    repeats = 10 if ON_GPU else 1
    candidates = {batch: candidate_configs(shape["headdim"], shape["dstate"], batch * shape["nheads"],
                                           args.quick, args.block_sizes, args.num_warps)
                  for batch in batches}
    env = environment()
    copy_GBps = copy_bandwidth_GBps((1 << 30) if ON_GPU else (1 << 20), repeats)
    rotate_bytes = 2 * l2_cache_bytes() if ON_GPU else 0

    progress = Progress(len(state_dtypes) * len(backends) * sum(map(len, candidates.values())), "tune_ssu")
    rows = []
    for state_dtype in state_dtypes:
        for batch in batches:
            case = ssu_case.make_decode_case(batch, **shape, state_dtype=state_dtype,
                                             rotate_bytes=rotate_bytes)
            want = ssu_case.float64_reference(case)
            for backend in backends:
                framework = ssu_case.IMPLEMENTATIONS[BACKENDS[backend][0]][1]
                rows.append(tune_one(case, backend, ssu_case.prepare(case, framework), want,
                                     candidates[batch], repeats, copy_GBps, progress))
    progress.finish()

    saved = []
    if args.save_configs:
        for backend in backends:
            saved += save_configs([r for r in rows if r["backend"] == backend], backend, shape,
                                  args.output_dir, env)
    report = args.report or default_output("tune_ssu", env, ".md", args.quick)
    columns = [("backend", "backend", None), ("state_dtype", "state", None), ("batch", "batch", None),
               ("effective_batch", "batch x nheads", None),
               ("heuristic", "heuristic (BLOCK_SIZE_M, warps)", None), ("heuristic_us", "heuristic us", ".1f"),
               ("tuned", "tuned (BLOCK_SIZE_M, warps)", None), ("tuned_us", "tuned us", ".1f"),
               ("tuned_GBps", "tuned state GB/s", None), ("fraction_of_copy", "of copy", ".0%"),
               ("gain", "gain (heuristic / tuned time)", ".2f")]
    command = " ".join(["python -m experiments.tune_ssu", *argv])
    text = "\n".join([
        f"# State-update launch configs tuned on {env['device']} "
        f"({'interpreted' if env['interpreted'] else 'compiled'})", "",
        *(f"- {k}: {v}" for k, v in env.items()), f"- command: `{command}`",
        f"- shape: {shape}; candidates: {max(map(len, candidates.values()))} per batch "
        f"(BLOCK_SIZE_M {args.block_sizes} up to headdim x num_warps {args.num_warps}); heuristic: "
        "bridge.spec.launch_config.default_ssu_launch_config",
        f"- timing: as experiments.compare (median of {repeats}, state rotated through disjoint "
        "slot sets on a scratch cache)",
        f"- measured copy bandwidth: {copy_GBps:.3g} GB/s",
        *(f"- wrote {path}" for path in saved),
        *(["", "No GPU: interpreter timings; the configs say nothing about a GPU."]
          if env["interpreted"] else []), "",
        markdown_table(rows, columns), ""])
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)
    report.with_suffix(".json").write_text(json.dumps(
        dict(environment=env, command=command, shape=shape, copy_GBps=copy_GBps,
             saved=[str(p) for p in saved], rows=rows), indent=1))
    print(text)
    print(f"wrote {report} and {report.with_suffix('.json').name}")
    return rows


if __name__ == "__main__":
    main()
