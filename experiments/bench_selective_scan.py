"""``selective_scan_fn`` (Mamba-1 prefill) benchmark: ``torch_impl`` (Triton)
and ``jax_impl`` (Pallas) on the same inputs.

    python -m experiments.bench_selective_scan [--quick]

On a GPU: Mamba-1 2.8B shape (dim 5120, dstate 16, one group), bf16 u,
delta, z, B, C, float32 A, D, delta_bias and states; 1 x 16k tokens and
64 x 1k tokens, every sequence resuming a cached state. The output goes into
``z`` (vLLM's in-place contract); the JAX step is jitted with ``z`` and the
states donated. Each row gives the median time, the bytes the scan must
move (u, delta, z, B, C read; the output written; states read and written)
as GB/s and as a fraction of the measured device copy bandwidth. On a CPU
(``--quick`` or no GPU): tiny shapes in the interpreters.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

import numpy as np  # noqa: E402

import torch_impl  # noqa: E402  (before triton: interpreter mode on CPU)
import torch  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments.timing import ON_GPU, copy_bandwidth_GBps, rel_error, time_jax, time_torch  # noqa: E402
from jax_impl.selective_scan import selective_scan_fn as scan_jax  # noqa: E402
from torch_impl.selective_scan import selective_scan_fn as scan_torch  # noqa: E402

MAMBA1_2P8B = dict(dim=5120, dstate=16)
CPU_SHAPE = dict(dim=16, dstate=4)


def cases(quick: bool) -> list[tuple[int, int]]:
    """(sequences, tokens per sequence)."""
    if ON_GPU and not quick:
        return [(1, 16384), (64, 1024)]
    return [(1, 16), (2, 8)]


def inputs(rng, dim: int, dstate: int, batch: int, seqlen: int) -> dict:
    """numpy arrays of one varlen call (float32 values, cast per framework)."""
    T = batch * seqlen
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return dict(u=normal(dim, T), delta=0.5 * normal(dim, T), z=normal(dim, T),
                A=-np.exp(0.5 * normal(dim, dstate)), B=normal(1, dstate, T), C=normal(1, dstate, T),
                D=normal(dim), delta_bias=0.3 * normal(dim), ssm_states=normal(batch + 1, dim, dstate),
                query_start_loc=np.arange(0, T + 1, seqlen, dtype=np.int32),
                cache_indices=np.arange(1, batch + 1, dtype=np.int32),
                has_initial_state=np.ones(batch, bool))


BF16_ARGS = ("u", "delta", "z", "B", "C")


def moved_bytes(dim: int, dstate: int, batch: int, seqlen: int) -> int:
    """What the scan must move: u, delta, z, B, C read and the output
    written (bf16); the states read and written (float32)."""
    T = batch * seqlen
    return 2 * (4 * dim * T + 2 * dstate * T) + 2 * 4 * batch * dim * dstate


def bench_case(arrays: dict, shape: dict, batch: int, seqlen: int, repeats: int, copy_GBps: float):
    device = torch_impl.platform.default_device()
    t_args = {k: torch.from_numpy(v).to(device, torch.bfloat16 if k in BF16_ARGS else None)
              for k, v in arrays.items()}
    j_args = {k: jnp.asarray(v, jnp.bfloat16 if k in BF16_ARGS else None) for k, v in arrays.items()}
    options = dict(delta_softplus=True)

    # One call on fresh inputs for the frameworks' difference; then the timed
    # calls, each writing its output into z (values drift; times do not).
    torch_out = scan_torch(**dict(t_args, z=t_args["z"].clone(), ssm_states=t_args["ssm_states"].clone()),
                           **options).float().cpu().numpy()
    # The other arrays are arguments too: closed over, they would be
    # compile-time constants of the step.
    rest = {k: v for k, v in j_args.items() if k not in ("z", "ssm_states")}
    step = jax.jit(lambda z, states, rest: scan_jax(**rest, z=z, ssm_states=states, **options),
                   donate_argnums=(0, 1))
    scratch = lambda: (jnp.array(j_args["z"]), jnp.array(j_args["ssm_states"]))  # noqa: E731  (donated)
    jax_out = np.asarray(step(*scratch(), rest)[0].astype(jnp.float32))
    seconds_torch = time_torch(lambda: scan_torch(**t_args, **options), repeats)
    seconds_jax = time_jax(lambda carry: step(*carry, rest), scratch(), repeats)
    num_bytes = moved_bytes(shape["dim"], shape["dstate"], batch, seqlen)
    common = dict(op="selective_scan_fn", batch=batch, seqlen=seqlen, **shape, input_dtype="bfloat16",
                  state_dtype="float32", bytes=num_bytes, copy_GBps=copy_GBps,
                  max_rel_diff_torch_vs_jax=rel_error(jax_out, torch_out))
    return [dict(common, implementation=name, median_us=seconds * 1e6, GBps=num_bytes / seconds / 1e9,
                 fraction_of_copy=num_bytes / seconds / 1e9 / copy_GBps)
            for name, seconds in (("triton", seconds_torch), ("pallas", seconds_jax))]


def run(quick: bool) -> list[dict]:
    """Rows of the benchmark (see the module docstring)."""
    full = ON_GPU and not quick
    shape = MAMBA1_2P8B if full else CPU_SHAPE
    repeats = 20 if full else 1
    copy_GBps = copy_bandwidth_GBps((1 << 30) if full else (1 << 20), repeats)
    rng = np.random.default_rng(0)
    rows = []
    for batch, seqlen in cases(quick):
        arrays = inputs(rng, shape["dim"], shape["dstate"], batch, seqlen)
        rows += bench_case(arrays, shape, batch, seqlen, repeats, copy_GBps)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    for row in run(parser.parse_args().quick):
        print(f"{row['implementation']:<8}{row['batch']:>4} x {row['seqlen']:<7}"
              f"{row['median_us']:>12.1f}us{row['GBps']:>9.1f} GB/s  {row['fraction_of_copy']:.2f} of copy"
              f"  diff {row['max_rel_diff_torch_vs_jax']:.1e}")


if __name__ == "__main__":
    main()
