"""The main job: every implementation of every op on the default device,
checked against float64 and timed, next to the device's ceilings measured
in the same run.

    python -m experiments.compare [--quick] [--batches 1 64 256] [--state-dtype float32]
                                  [--ops state_update chunked_scan bridge mixer] [--output FILE.json]

- state update (``experiments.ssu_case``): triton, torch-reference, pallas,
  xla-reference, at each batch; GB/s of state traffic, shown as a fraction of
  the measured copy bandwidth;
- chunked scan: the rows of ``experiments.bench_ssd.run(quick)``, their
  TFLOP/s shown as a fraction of the measured bf16 matmul rate;
- bridge: the rows of ``experiments.bench_bridge.run(quick)``;
- mixer: the rows of ``experiments.bench_mixer.run(quick)``;
- host: the torch ops' eager host cost, ``experiments.bench_host.run(quick)``;
- selective_scan: Mamba-1's prefill scan, ``experiments.bench_selective_scan.run(quick)``;
- chunked_scan_backward: forward + backward of the chunked scan (Triton, Pallas,
  mamba_ssm's when ``$MAMBA_SSM_ANCHOR`` holds it), ``experiments.bench_ssd_backward.run(quick)``.
An op whose module is absent is skipped (and the record says so).

Writes FILE.json (environment, command, ceilings, every row), FILE.md (the
tables) and FILE-<op>.png plots next to it; FILE defaults to
experiments/results/compare-<date>-<device>[-quick].json. Timing: see
``experiments.timing``. On a CPU the shapes are small and the kernels run
interpreted: the times are interpreter times.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import torch

from experiments import plots, ssu_case
from experiments.report import (
    RESULTS, Progress, default_output, environment, format_value, markdown_table)
from experiments.shapes import CPU_HEADS as CPU_SHAPE
from experiments.timing import ON_GPU, copy_bandwidth_GBps, l2_cache_bytes, matmul_TFLOPs

__all__ = ["RESULTS", "environment", "main"]

SSU_OP = "selective_state_update"
BENCH_MODULES = {"chunked_scan": "experiments.bench_ssd", "bridge": "experiments.bench_bridge",
                 "mixer": "experiments.bench_mixer", "host": "experiments.bench_host",
                 "selective_scan": "experiments.bench_selective_scan",
                 "chunked_scan_backward": "experiments.bench_ssd_backward"}
OPS = ("state_update", *BENCH_MODULES)

# (batches, timing repeats, copy bytes, matmul n) per (on a GPU, quick)
SETTINGS = {
    (True, False): ([1, 2, 4, 8, 16, 32, 64, 128, 256], 30, 1 << 30, 8192),
    (True, True): ([1, 64], 5, 256 << 20, 4096),
    (False, False): ([1, 2, 4], 3, 16 << 20, 256),
    (False, True): ([2], 1, 1 << 20, 64),
}

# Column headers and formats of the tables; other keys print as they are.
COLUMN_FORMATS = {
    "max_rel_error_out": ("max rel err out", ".1e"),
    "max_rel_error_state": ("max rel err state", ".1e"),
    "max_rel_error_states": ("max rel err states", ".1e"),
    "median_us": ("median (us)", ".1f"),
    "state_GBps": ("state GB/s", None),
    "fraction_of_copy": ("of copy", ".0%"),
    "TFLOPs": ("TFLOP/s", ".3g"),
    "fraction_of_matmul": ("of matmul", ".1%"),
    "tokens_per_s": ("tokens/s", ".3g"),
    "peak_MiB": ("peak MiB", ".1f"),
    "speedup_vs_mamba_ssm": ("vs mamba_ssm", ".2f"),
    "max_rel_error_grads_vs_triton": ("max rel err grads vs triton", ".1e"),
}


def measure_ceilings(copy_bytes: int, matmul_n: int, repeats: int) -> dict:
    return dict(copy_GBps=copy_bandwidth_GBps(copy_bytes, repeats), copy_bytes=copy_bytes,
                matmul_TFLOPs=matmul_TFLOPs(matmul_n, repeats), matmul_n=matmul_n,
                matmul_dtype="bfloat16")


def compare_state_update(batches, shape, state_dtype, repeats, progress) -> list[dict]:
    """One row per (batch, implementation)."""
    rotate_bytes = 2 * l2_cache_bytes() if ON_GPU else 0
    rows = []
    for batch in batches:
        case = ssu_case.make_decode_case(batch, **shape, state_dtype=state_dtype,
                                         rotate_bytes=rotate_bytes)
        want = ssu_case.float64_reference(case)
        prepared = {}
        for name, (_, framework, _) in ssu_case.IMPLEMENTATIONS.items():
            progress.step(f"state update, batch {batch}, {name}")
            if framework not in prepared:
                prepared = {framework: ssu_case.prepare(case, framework)}  # one framework's cache at a time
            rows.append(dict(op=SSU_OP, implementation=name, **case.shape(),
                             **ssu_case.measure(case, name, prepared[framework], want, repeats)))
    del prepared
    if ON_GPU:
        torch.cuda.empty_cache()  # give torch's cached blocks back before JAX and the benchmarks allocate
    return rows


def bench_rows(op: str, quick: bool, progress) -> list[dict] | None:
    """The rows of the op's benchmark module, or None when it does not exist."""
    module_name = BENCH_MODULES[op]
    if importlib.util.find_spec(module_name) is None:
        return None
    progress.step(f"{op} ({module_name})")
    return importlib.import_module(module_name).run(quick)


def add_fractions(rows: list[dict], ceilings: dict) -> None:
    """Each figure as a fraction of its ceiling."""
    for row in rows:
        if "state_GBps" in row:
            row["fraction_of_copy"] = row["state_GBps"] / ceilings["copy_GBps"]
        if "TFLOPs" in row:
            row["fraction_of_matmul"] = row["TFLOPs"] / ceilings["matmul_TFLOPs"]


def pallas_vs_triton(rows: list[dict], group_keys: tuple[str, ...]) -> list[dict]:
    """Per group: Pallas speed relative to Triton (Triton time / Pallas time)."""
    times = {}
    for row in rows:
        times.setdefault(tuple(row[k] for k in group_keys), {})[row["implementation"]] = row["median_us"]
    return [dict(zip(group_keys, group), pallas_vs_triton=impls["triton"] / impls["pallas"])
            for group, impls in times.items() if {"triton", "pallas"} <= impls.keys()]


def table_section(rows: list[dict]) -> list[str]:
    """Keys equal in every row as a list, the others as a table."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    constant = [k for k in keys if all(k in r and r[k] == rows[0][k] for r in rows)]
    columns = [(k, *COLUMN_FORMATS.get(k, (k, None))) for k in keys if k not in constant]
    return [*(f"- {k}: {rows[0][k]}" for k in constant), "", markdown_table(rows, columns), ""]


def write_plots(stem: Path, op_rows: dict[str, list[dict]], ceilings: dict, device: str) -> list[Path]:
    written = []
    if op_rows.get("state_update"):
        rows = op_rows["state_update"]
        written.append(plots.line_plot(
            stem.with_name(stem.name + "-state_update.png"),
            plots.series(rows, lambda r: r["implementation"], "batch", "state_GBps"),
            title=f"State update on {device} ({rows[0]['state_dtype']} state)", xlabel="batch",
            ylabel="state GB/s (read + write)", log_y=True,
            reference=(ceilings["copy_GBps"], f"copy {format_value(ceilings['copy_GBps'])} GB/s")))
    scan_rows = [r for r in op_rows.get("chunked_scan") or [] if "tokens_per_s" in r]
    if scan_rows:
        written.append(plots.line_plot(
            stem.with_name(stem.name + "-chunked_scan.png"),
            plots.series(scan_rows, lambda r: f"{r['implementation']}, {r.get('layout', '')}",
                         "tokens", "tokens_per_s"),
            title=f"Chunked scan on {device}", xlabel="tokens", ylabel="tokens / s", log_y=True))
    share_rows = [r for r in op_rows.get("bridge") or [] if "size_bytes" in r]
    if share_rows:
        written.append(plots.line_plot(
            stem.with_name(stem.name + "-bridge.png"),
            plots.series(share_rows, lambda r: r.get("implementation", r.get("impl")),
                         "size_bytes", "median_us"),
            title=f"Sharing a cache between torch and JAX on {device}", xlabel="cache bytes",
            ylabel="median us per hand-over (copy: per copy)", log_y=True))
    return written


def markdown(record: dict, op_rows: dict[str, list[dict]], plot_files: list[Path]) -> str:
    env, ceilings = record["environment"], record["ceilings"]
    lines = [f"# Every op, every implementation on {env['device']} "
             f"({'interpreted' if env['interpreted'] else 'compiled'})", "",
             *(f"- {k}: {v}" for k, v in env.items()),
             f"- command: `{record['command']}`",
             f"- timing: {record['timing']}",
             f"- measured copy bandwidth ({ceilings['copy_bytes'] >> 20} MiB Tensor.copy_ run eagerly, read + write): "
             f"{format_value(ceilings['copy_GBps'])} GB/s",
             f"- measured bf16 matmul ({ceilings['matmul_n']}^3 torch.matmul): "
             f"{format_value(ceilings['matmul_TFLOPs'])} TFLOP/s",
             *(f"- skipped: {note}" for note in record["skipped"]), ""]
    if env["interpreted"]:
        lines += ["No GPU: the kernels ran in the Triton / Pallas interpreters; "
                  "the times are interpreter times and say nothing about GPU speed.", ""]
    titles = dict(state_update="State update", chunked_scan="Chunked scan", bridge="Bridge",
                  mixer="Mixer forward (torch vs Flax)", host="Host cost of the eager torch ops",
                  selective_scan="Mamba-1 selective scan",
                  chunked_scan_backward="Chunked scan forward + backward (torch vs mamba_ssm)")
    group_keys = dict(state_update=("batch",), chunked_scan=("tokens", "layout"),
                      chunked_scan_backward=("tokens", "layout"))
    for op, rows in op_rows.items():
        if not rows:
            continue
        lines += [f"## {titles[op]}", "", *table_section(rows)]
        if op in group_keys and all(k in r for r in rows for k in group_keys[op]):
            ratios = pallas_vs_triton(rows, group_keys[op])
            if ratios:
                lines += ["Pallas speed relative to Triton (Triton time / Pallas time):", "",
                          markdown_table(ratios, [*((k, k, None) for k in group_keys[op]),
                                                  ("pallas_vs_triton", "Pallas vs Triton", ".2f")]), ""]
        lines += [f"![{titles[op]}]({p.name})" for p in plot_files if p.stem.endswith(op)] + [""]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized: few batches, few repeats")
    parser.add_argument("--batches", type=int, nargs="+", help="state-update batches")
    parser.add_argument("--state-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--output", type=Path, help="the JSON file; .md and .png go next to it")
    args = parser.parse_args(argv)
    batches, repeats, copy_bytes, matmul_n = SETTINGS[(ON_GPU, args.quick)]
    batches = args.batches or batches
    shape = ssu_case.MAMBA2_2P7B if ON_GPU else CPU_SHAPE
    env = environment()

    steps = 1 + (len(batches) * len(ssu_case.IMPLEMENTATIONS) if "state_update" in args.ops else 0)
    progress = Progress(steps + len([op for op in args.ops if op in BENCH_MODULES]), "compare")
    progress.step("ceilings: copy bandwidth, bf16 matmul")
    ceilings = measure_ceilings(copy_bytes, matmul_n, repeats)
    op_rows, skipped = {}, []
    if "state_update" in args.ops:
        op_rows["state_update"] = compare_state_update(batches, shape, args.state_dtype, repeats, progress)
    for op in BENCH_MODULES:
        if op in args.ops:
            op_rows[op] = bench_rows(op, args.quick, progress)
            if op_rows[op] is None:
                skipped.append(f"{op}: {BENCH_MODULES[op]} does not exist")
    progress.finish()
    all_rows = [row for rows in op_rows.values() for row in rows or []]
    add_fractions(all_rows, ceilings)

    output = args.output or default_output("compare", env, ".json", args.quick)
    stem = output.with_suffix("")
    timing = (f"median of {repeats} samples after warm-up; GPU: CUDA events around CUDA-graph replays "
              "(torch-reference eagerly: it syncs with the host), each sample >= 1 ms; JAX: (wall time of 2n "
              "back-to-back jitted calls - that of n) / n, each run ended by block_until_ready, n calls "
              ">= 4 ms; the state update rotates through "
              "disjoint cache-slot sets totalling >= 2x the L2 so steps never hit their state in L2"
              if ON_GPU else "wall clock of single calls in the interpreters, after one warm-up call")
    record = dict(environment=env, command=" ".join(["python -m experiments.compare", *argv]),
                  quick=args.quick, timing=timing, ceilings=ceilings, skipped=skipped, rows=all_rows)
    plot_files = write_plots(stem, op_rows, ceilings, env["device"])
    record["plots"] = [p.name for p in plot_files]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1))
    text = markdown(record, op_rows, plot_files)
    markdown_file = output.with_suffix(".md")
    markdown_file.write_text(text)
    print(text)
    print(f"wrote {output}, {markdown_file.name}, {', '.join(p.name for p in plot_files)}")
    return record


if __name__ == "__main__":
    main()
