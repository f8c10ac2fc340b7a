"""Generation benchmark: ``torch_impl.Mamba2LMHeadModel`` and
``jax_impl.Mamba2LMHeadModel`` with the same random weights.

    python -m experiments.generate [--quick] [--batches 1 64 256] [--new-tokens 32]
                                   [--layers 64] [--output FILE.json]

On a GPU: a Mamba-2 2.7B-shaped model (hidden 2560, 64 layers, 80 heads of
64, state 128, vocabulary 50288), bf16 weights, float32 states. Per batch
(1 / 64 / 256) and framework: prompt tokens/s (``prefill`` of
``max(16, 4096 / batch)`` tokens per prompt; batch 1 is the 4k prefill) and
decode tokens/s (``generate(prefilled=...)``, greedy, ``--new-tokens`` per
row: torch replays a CUDA graph per step, JAX runs one jitted while loop).
The repeated prefills replay torch's captured prefill of their layout
(``Mamba2LMHeadModel.prefill_graphs``); the 4k row also gives torch's eager
prefill (a layout's first).
Wall clock around each call, synchronised, median of the repeats after a
warm-up (which captures / compiles). On a GPU each framework runs in its own
process (``--frameworks`` picks), so that neither allocator holds memory the
other needs.

Kernel bars (GPU, CUPTI through ``torch.profiler`` as in
``experiments.kernel_timeline``): the batch-1 wall time per decode step
against the sum of one step's kernel device times (torch: a graph replay;
JAX: a generation's kernels less a one-token generation's, per step; bar:
< 1.5x), and the 4k prefill's wall time against the sum of its matmul and
chunked-scan kernels' device times (bar: < 1.3x). Beside it, the time per
prefill of ten enqueued back to back: the device's throughput without the
host's latency (and at the lower clock a busy H200 holds under its power cap),
and the host's latency itself: the gap between a one-element torch kernel
launched just before a prefill and the prefill's first device event.

On a CPU (or with ``--quick``): a tiny model in the interpreters (the times
are interpreter times). Writes FILE.json, FILE.md and FILE.png
(default ``experiments/results/generate-<date>-<device>[-quick].json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from experiments.timing import ON_GPU  # noqa: F401  (sets XLA_PYTHON_CLIENT_PREALLOCATE first)

import numpy as np  # noqa: E402

import torch_impl  # noqa: E402  (before triton: interpreter mode on CPU)
import torch  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jax_impl  # noqa: E402
from bridge.spec.lm_config import Mamba2Config  # noqa: E402
from experiments import plots  # noqa: E402
from experiments.report import Progress, default_output, environment, markdown_table  # noqa: E402

MAMBA2_2P7B_LM = dict(vocab_size=50288, hidden_size=2560, num_layers=64, state_size=128, conv_kernel=4,
                      expand=2, head_dim=64, n_groups=1, chunk_size=256, tie_embeddings=True)
TINY_LM = dict(vocab_size=64, hidden_size=32, num_layers=2, state_size=16, conv_kernel=4, expand=2,
               head_dim=16, n_groups=1, chunk_size=16, tie_embeddings=True)
PREFILL_TOKENS = 4096
BACK_TO_BACK = 10  # prefills per sample of the back-to-back time
# Kernel names (substrings) of the prefill's essential work: matmuls and the chunked scan's stages.
MATMUL_KERNELS = ("gemm", "cutlass", "xmma", "nvjet", "matmul", "dot")
SCAN_KERNELS = ("chunk_cumsum", "chunk_state", "state_passing", "bmm_chunk", "chunk_scan")
FRAMEWORKS = ("torch", "jax")


def settings(quick: bool) -> dict:
    if ON_GPU and not quick:
        return dict(shape=MAMBA2_2P7B_LM, batches=[1, 64, 256], new_tokens=32, repeats=7,
                    dtype="bfloat16")
    return dict(shape=TINY_LM, batches=[1], new_tokens=3, repeats=1, dtype="bfloat16" if ON_GPU else "float32")


def prompt_length(batch: int, quick: bool) -> int:
    return max(16, PREFILL_TOKENS // batch) if ON_GPU and not quick else 8


class Runner:
    """One framework's model behind ``prefill(ids)``, ``decode(prefilled, n)`` and ``sync(result)``."""

    def __init__(self, name, model):
        self.name, self.model = name, model
        self.device = torch_impl.platform.default_device()

    def ids(self, ids: np.ndarray):
        return torch.from_numpy(ids).to(self.device) if self.name == "torch" else ids

    def prefill(self, ids):
        return self.model.prefill(self.ids(ids))

    def decode(self, prefilled, n: int):
        return self.model.generate(max_new_tokens=n, prefilled=prefilled)

    def sync(self, result) -> None:
        if self.name == "torch":
            if ON_GPU:
                torch.cuda.synchronize()
        else:
            jax.block_until_ready(result.logits if hasattr(result, "logits") else result)

    def timed(self, fn, *args) -> tuple[float, object]:
        start = time.perf_counter()
        result = fn(*args)
        self.sync(result)
        return time.perf_counter() - start, result

    def release(self) -> None:
        """Free the model's generation caches (torch keeps one per batch bucket)."""
        if self.name == "torch":
            self.model._caches.clear()
            self.model._steps.clear()
            self.model._prefills.clear()
            if ON_GPU:
                torch.cuda.empty_cache()


def build_models(shape: dict, dtype: str, frameworks=FRAMEWORKS) -> dict:
    """The models of ``frameworks`` with the torch model's random weights
    (seed 0; shared with JAX through DLPack)."""
    config = Mamba2Config(**shape)
    torch.manual_seed(0)
    torch_model = torch_impl.Mamba2LMHeadModel(config, dtype=getattr(torch, dtype),
                                               device=torch_impl.platform.default_device())
    runners = {}
    if "torch" in frameworks:
        runners["torch"] = Runner("torch", torch_model)
    if "jax" in frameworks:
        flax_model = jax_impl.Mamba2LMHeadModel(config, dtype=getattr(jnp, dtype))
        flax_model.load_weights(torch_model.checkpoint_weights())
        runners["jax"] = Runner("jax", flax_model)
    del torch_model
    if ON_GPU:
        torch.cuda.empty_cache()
    return runners


def measure(runner: Runner, batch: int, prompt: int, new_tokens: int, repeats: int, rng) -> tuple[dict, np.ndarray]:
    """Prompt and decode tokens/s of one batch; and the greedy tokens of the last run."""
    ids = rng.integers(0, runner.model.config.vocab_size, (batch, prompt))
    runner.sync(runner.prefill(ids))  # warm-up: compiles; torch captures the layout's second prefill
    runner.sync(runner.decode(runner.prefill(ids), new_tokens))
    prefill_s, decode_s = [], []
    for _ in range(repeats):
        seconds, prefilled = runner.timed(runner.prefill, ids)
        prefill_s.append(seconds)
        seconds, tokens = runner.timed(runner.decode, prefilled, new_tokens)
        decode_s.append(seconds)
    prefill, decode = statistics.median(prefill_s), statistics.median(decode_s)
    row = dict(op="generate", implementation=runner.name, batch=batch, prompt_tokens=prompt,
               new_tokens=new_tokens, prefill_ms=1e3 * prefill, prompt_tokens_per_s=batch * prompt / prefill,
               decode_ms=1e3 * decode, decode_ms_per_token=1e3 * decode / new_tokens,
               decode_tokens_per_s=batch * new_tokens / decode)
    return row, np.asarray(tokens.cpu() if runner.name == "torch" else tokens)


def _kernel_time(events: list[dict], names=None) -> float:
    """The summed device time (us) of the events, of those whose kernel name
    holds one of ``names`` when given."""
    return sum(e["dur"] for e in events if names is None or any(k in e["name"].lower() for k in names))


def _span(events: list[dict]) -> float:
    """First kernel start to last kernel end (us): device time plus the gaps
    in which the device waited for the host."""
    return events[-1]["ts"] + events[-1]["dur"] - events[0]["ts"] if events else 0.0


def _top_kernels(events: list[dict], calls: int, count: int = 8) -> list:
    """[(kernel name, us per call)] of the ``count`` costliest kernels: where the time goes."""
    totals: dict = {}
    for e in events:
        totals[e["name"][:80]] = totals.get(e["name"][:80], 0.0) + e["dur"] / calls
    return sorted(totals.items(), key=lambda item: -item[1])[:count]


def kernel_bars(runner: Runner, batch_one: dict, new_tokens: int, rng) -> list[dict]:
    """The batch-1 rows' wall times (``batch_one``: the 4k prefill and the
    time per decode step) against their kernels' device times (CUPTI), GPU
    only. A profiled span is not used as the step time: the profiler
    stretches it."""
    from experiments.kernel_timeline import device_events

    ids = rng.integers(0, runner.model.config.vocab_size, (1, PREFILL_TOKENS))
    eager = {}
    if runner.name == "torch":  # a layout's first prefill runs eagerly (later ones replay a graph)
        graphs, runner.model.prefill_graphs = runner.model.prefill_graphs, 0
        runner.prefill(ids)  # before the profiler: CUPTI slows every launch after it starts
        seconds = [runner.timed(runner.prefill, ids)[0] for _ in range(5)]
        eager["eager_wall_us"] = 1e6 * statistics.median(seconds)
        runner.model.prefill_graphs = graphs
    # Ten prefills enqueued back to back, one sync: the device's throughput,
    # with the host's latency hidden and the clock it holds under load.
    back_to_back = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(BACK_TO_BACK):
            result = runner.prefill(ids)
        runner.sync(result)
        back_to_back.append((time.perf_counter() - start) / BACK_TO_BACK)
    prefill_events = device_events(lambda: runner.prefill(ids).logits, 1)
    prefill_us = _kernel_time(prefill_events, MATMUL_KERNELS + SCAN_KERNELS)
    # A one-element torch kernel launched just before the call starts on the
    # idle GPU at once: the gap to the call's first device event is the
    # host's latency before the call's work reaches the GPU.
    marker = torch.zeros(1, device=runner.device)

    def marked_prefill():
        marker.add_(1)
        return runner.prefill(ids).logits

    marked = device_events(marked_prefill, 1)
    host_latency_us = marked[1]["ts"] - marked[0]["ts"]
    if runner.name == "torch":  # a graph replay is one step
        model = runner.model
        prefilled = model.prefill(runner.ids(ids[:, :16]))
        step = model._decode_step(prefilled.cache, 1)
        step.bind(prefilled.slots)
        token = torch.zeros(1, dtype=torch.long, device=runner.device)
        step_events = device_events(lambda: step.run(token), 4)
        step_us, step_top = _kernel_time(step_events) / 4, _top_kernels(step_events, 4)
    else:  # the while loop's steps: a generation of n tokens less one of 1 token (no step)
        events = {n: device_events(lambda n=n: runner.decode(runner.prefill(ids[:, :16]), n), 1)
                  for n in (new_tokens, 1)}
        step_us = (_kernel_time(events[new_tokens]) - _kernel_time(events[1])) / (new_tokens - 1)
        step_top = _top_kernels(events[new_tokens], new_tokens)  # the prefill's kernels included
    prefill_wall, step_wall = 1e3 * batch_one["prefill_ms"], 1e3 * batch_one["decode_ms_per_token"]
    return [dict(op="prefill_4k_kernels", implementation=runner.name, wall_us=prefill_wall,
                 kernels_us=prefill_us, kernels="matmuls and chunked-scan stages",
                 all_kernels_us=_kernel_time(prefill_events), span_us=_span(prefill_events),
                 ratio=prefill_wall / max(prefill_us, 1e-9), bar=1.3, top_kernels=_top_kernels(prefill_events, 1),
                 back_to_back_us=1e6 * statistics.median(back_to_back), host_latency_us=host_latency_us,
                 **eager),
            dict(op="decode_step_kernels", implementation=runner.name, wall_us=step_wall,
                 kernels_us=step_us, kernels="all", ratio=step_wall / max(step_us, 1e-9), bar=1.5, top_kernels=step_top)]


def markdown(record: dict) -> str:
    env = record["environment"]
    rows = [r for r in record["rows"] if r["op"] == "generate"]
    lines = [f"# Generation on {env['device']} ({'interpreted' if env['interpreted'] else 'compiled'})", "",
             *(f"- {k}: {v}" for k, v in env.items()), f"- command: `{record['command']}`",
             f"- model: {record['model']}, weights {record['dtype']}, float32 states",
             f"- timing: {record['timing']}", ""]
    if env["interpreted"]:
        lines += ["No GPU: the kernels ran in the Triton / Pallas interpreters; the times are interpreter "
                  "times and say nothing about GPU speed.", ""]
    lines += [markdown_table(rows, [("implementation", "framework", None), ("batch", "batch", None),
                                    ("prompt_tokens", "prompt", None),
                                    ("prompt_tokens_per_s", "prompt tokens/s", ".4g"),
                                    ("new_tokens", "new", None), ("decode_ms_per_token", "ms / step", ".3f"),
                                    ("decode_tokens_per_s", "decode tokens/s", ".4g")]), ""]
    ratios = record["torch_vs_jax"]
    if ratios:
        lines += ["Decode time per step, torch over JAX (bar at batch 1: within 1.2x either way):", "",
                  markdown_table(ratios, [("batch", "batch", None), ("decode_torch_over_jax", "torch / JAX", ".2f"),
                                          ("prefill_torch_over_jax", "prefill torch / JAX", ".2f")]), ""]
    failed = [r for r in record["rows"] if r["op"] == "failed"]
    if failed:
        lines += ["Runs that failed:", "", *(f"- {r['implementation']}, batch {r['batch']}: {r['error']}"
                                            for r in failed), ""]
    bars = [r for r in record["rows"] if r["op"] not in ("generate", "failed")]
    if bars:
        lines += ["Batch 1: wall time against the kernels' device times (CUPTI):", "",
                  markdown_table(bars, [("op", "what", None), ("implementation", "framework", None),
                                        ("wall_us", "wall (us)", ".1f"), ("kernels", "kernels", None),
                                        ("kernels_us", "kernels (us)", ".1f"),
                                        ("ratio", "ratio", ".2f"), ("bar", "bar", None)]), "",
                  "The prefill's device timeline: all its kernels against their span (first start to "
                  "last end; the difference is device time spent waiting for the host):", "",
                  *(f"- {bar['implementation']}: all kernels {bar['all_kernels_us']:.1f} us in a span "
                    f"of {bar['span_us']:.1f} us" for bar in bars if "span_us" in bar),
                  *(f"- {bar['implementation']}: an eager prefill (a layout's first) takes "
                    f"{bar['eager_wall_us']:.1f} us, {bar['eager_wall_us'] / bar['kernels_us']:.2f}x the kernels"
                    for bar in bars if "eager_wall_us" in bar),
                  *(f"- {bar['implementation']}: prefills enqueued back to back (one sync per "
                    f"{BACK_TO_BACK}) take {bar['back_to_back_us']:.1f} us each, "
                    f"{bar['back_to_back_us'] / bar['kernels_us']:.2f}x the kernels: the device's "
                    "throughput, the host's latency hidden, at the clock the GPU holds under load"
                    for bar in bars if "back_to_back_us" in bar),
                  *(f"- {bar['implementation']}: the prefill's first device event starts "
                    f"{bar['host_latency_us']:.1f} us after a one-element kernel launched just before "
                    "the call (the host's latency before the call's work reaches the GPU; profiled)"
                    for bar in bars if "host_latency_us" in bar), ""]
        for bar in bars:
            lines += [f"Costliest kernels, {bar['op']}, {bar['implementation']} (us per call):", "",
                      *(f"- {us:.1f} `{name}`" for name, us in bar["top_kernels"]), ""]
    lines += [f"![generation]({name})" for name in record["plots"]]
    return "\n".join(lines)


def run_frameworks(shape: dict, setup: dict, batches, new_tokens: int, frameworks, quick: bool):
    """(rows, {(framework, batch): greedy tokens}) of ``frameworks`` in this process."""
    rng = np.random.default_rng(0)
    runners = build_models(shape, setup["dtype"], frameworks)
    progress = Progress(len(runners) * (len(batches) + (1 if ON_GPU else 0)), "generate")
    rows, tokens = [], {}
    for name, runner in runners.items():
        for batch in batches:
            progress.step(f"{name}, batch {batch}")
            try:
                row, tokens[name, batch] = measure(runner, batch, prompt_length(batch, quick), new_tokens,
                                                   setup["repeats"], np.random.default_rng(batch))
            except (RuntimeError, MemoryError) as error:  # JaxRuntimeError is a RuntimeError
                if "out of memory" not in str(error).lower():
                    raise
                row = dict(op="failed", implementation=name, batch=batch,
                           error=str(error).splitlines()[0][:300])
                runner.release()
            rows.append(row)
        batch_one = next((r for r in rows if r["op"] == "generate" and r["implementation"] == name
                          and r["batch"] == 1 and r["prompt_tokens"] == PREFILL_TOKENS), None)
        if ON_GPU:
            runner.release()
            progress.step(f"{name}, kernel bars")
            if batch_one is not None:
                rows += kernel_bars(runner, batch_one, new_tokens, rng)
    progress.finish()
    return rows, tokens


def run_apart(argv: list, frameworks) -> tuple[list, dict]:
    """Each framework in its own process (``--frameworks NAME``), so neither
    allocator holds memory the other needs (batch 256 of the 2.7B shape has
    41 GiB of states); the rows and tokens come back through a JSON file."""
    import subprocess
    import tempfile

    rows, tokens = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for name in frameworks:
            part = Path(folder) / f"{name}.json"
            subprocess.run([sys.executable, "-m", "experiments.generate", *argv, "--frameworks", name,
                            "--part", str(part)], check=True)
            record = json.loads(part.read_text())
            rows += record["rows"]
            tokens.update({(name, int(batch)): np.asarray(t) for batch, t in record["tokens"].items()})
    return rows, tokens


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model (what a CPU can run)")
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--layers", type=int, help="override the model's layer count")
    parser.add_argument("--output", help="the JSON file; .md and .png go next to it")
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS),
                        help="on a GPU, more than one runs each in its own process")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # a framework's rows for run_apart
    args = parser.parse_args(argv)
    setup = settings(args.quick)
    shape = dict(setup["shape"], **({"num_layers": args.layers} if args.layers else {}))
    batches, new_tokens = args.batches or setup["batches"], args.new_tokens or setup["new_tokens"]
    if ON_GPU and len(args.frameworks) > 1:
        passed = [a for a in argv if a not in ("--frameworks", *FRAMEWORKS)]
        rows, tokens = run_apart(passed, args.frameworks)
    else:
        rows, tokens = run_frameworks(shape, setup, batches, new_tokens, args.frameworks, args.quick)
    if args.part:
        Path(args.part).write_text(json.dumps(dict(rows=rows, tokens={
            str(b): np.asarray(t).tolist() for (_, b), t in tokens.items()})))
        return None
    env = environment()
    by = {(r["implementation"], r["batch"]): r for r in rows if r["op"] == "generate"}
    ratios = [dict(batch=b, decode_torch_over_jax=by["torch", b]["decode_ms"] / by["jax", b]["decode_ms"],
                   prefill_torch_over_jax=by["torch", b]["prefill_ms"] / by["jax", b]["prefill_ms"],
                   greedy_tokens_agree=float(np.mean(tokens["torch", b] == tokens["jax", b])))
              for b in batches if ("torch", b) in by and ("jax", b) in by]

    output = Path(args.output) if args.output else default_output("generate", env, ".json", args.quick)
    stem = output.with_suffix("")
    gen_rows = [r for r in rows if r["op"] == "generate"]
    plot = plots.line_plot(stem.with_name(stem.name + ".png"),
                           {**{f"{k} decode": v for k, v in plots.series(
                               gen_rows, lambda r: r["implementation"], "batch", "decode_tokens_per_s").items()},
                            **{f"{k} prompt": v for k, v in plots.series(
                                gen_rows, lambda r: r["implementation"], "batch", "prompt_tokens_per_s").items()}},
                           title=f"Mamba-2 generation on {env['device']}", xlabel="batch",
                           ylabel="tokens / s", log_y=True)
    record = dict(environment=env, command=" ".join(["python -m experiments.generate", *argv]),
                  model=shape, dtype=setup["dtype"], rows=rows, torch_vs_jax=ratios, plots=[plot.name],
                  timing="wall clock around each call, synchronised (torch.cuda.synchronize / "
                         f"block_until_ready), median of {setup['repeats']} after a warm-up call"
                         + ("; each framework in its own process" if ON_GPU and len(args.frameworks) > 1
                            else ""))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1))
    text = markdown(record)
    output.with_suffix(".md").write_text(text)
    print(text)
    return record


if __name__ == "__main__":
    main()
