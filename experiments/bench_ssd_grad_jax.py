"""Chunked-scan forward + backward in JAX (Pallas forward stages and the
Pallas backward stages through ``jax.custom_vjp``), for the training rows of
issue 12, beside the torch rows of ``experiments.bench_ssd``.

    python -m experiments.bench_ssd_grad_jax [--quick]

On a GPU: Mamba-2 2.7B heads (80 x 64, dstate 128, ngroups 1, chunk 256),
bf16 x / dt / B / C, float32 A / D / dt_bias, softplus, no z (the mixer
gates in its norm), 4k / 16k / 64k tokens as one sequence and as 64 of
random lengths; one timed step is ``jax.vjp`` of the scan (out and final
states) pulled back with a random d_out (and zero d_states), all gradients
(x, dt, A, B, C, D, dt_bias) returned. Each row's gradients are compared
with the plain-ops XLA reference's (``jax_impl.reference.ssd_chunked_jnp``,
float32 on the bf16-rounded inputs) when ``with_reference``, after all rows
are timed. Peak memory:
the compiled step's own (arguments + outputs + temporaries, from XLA's
memory analysis) and the device's ``peak_bytes_in_use`` so far (process
wide, monotone over the rows). On a CPU: tiny shapes in the interpreter.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jax_impl  # noqa: E402
from bridge.spec.ssd_contract import chunk_metadata  # noqa: E402
from experiments.shapes import CPU_SSD, MAMBA2_2P7B_SSD, MIXED_SEQUENCES, PREFILL_TOKENS  # noqa: E402
from experiments.timing import rel_error, time_jax  # noqa: E402
from jax_impl import platform  # noqa: E402
from jax_impl.reference import ssd_chunked_jnp  # noqa: E402

OP = "mamba_chunk_scan_combined_varlen fwd+bwd"
ON_GPU = platform.ON_GPU
HALF = ("x", "dt", "B", "C")
GRADS = ("x", "dt", "A", "B", "C", "D", "dt_bias")


def _inputs(seqlens, nheads, headdim, dstate, ngroups, chunk_size, input_dtype, seed=0):
    """(differentiable inputs, int32 metadata, d_out) as jax arrays."""
    rng = np.random.default_rng(seed)
    cu_seqlens = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
    T = int(cu_seqlens[-1])
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    arrays = dict(x=r(T, nheads, headdim), dt=r(T, nheads) * 0.5 - 1.0, A=-np.exp(r(nheads) * 0.5),
                  B=r(T, ngroups, dstate), C=r(T, ngroups, dstate), D=r(nheads),
                  dt_bias=r(nheads) * 0.5)
    meta = chunk_metadata(cu_seqlens, chunk_size)
    metadata = dict(cu_seqlens=cu_seqlens, cu_chunk_seqlens=meta.cu_chunk_seqlens,
                    seq_idx=meta.seq_idx, last_chunk_indices=meta.last_chunk_indices)
    inputs = {k: jnp.asarray(v, getattr(jnp, input_dtype) if k in HALF else jnp.float32)
              for k, v in arrays.items()}
    d_out = jnp.asarray(r(T, nheads, headdim), getattr(jnp, input_dtype))
    return inputs, metadata, d_out


def _random_seqlens(total: int, num_seqs: int, rng) -> np.ndarray:
    cuts = np.sort(rng.choice(np.arange(1, total), size=num_seqs - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def _peak_bytes():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _compiled_bytes(compiled):
    """Arguments + outputs + temporaries of one compiled step (None if XLA
    does not say)."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001  (not every backend reports it)
        return None


def _step(index, chunk_size):
    options = dict(chunk_size=chunk_size, dt_softplus=True, state_dtype=jnp.float32)

    def step(inputs, d_out):
        (out, states), vjp = jax.vjp(
            lambda i: jax_impl.mamba_chunk_scan_combined_varlen(**i, **index, **options), inputs)
        return vjp((d_out, jnp.zeros_like(states)))[0]
    return step


def bench_case(seqlens, layout, nheads, headdim, dstate, ngroups, chunk_size, input_dtype,
               repeats) -> dict:
    inputs, metadata, d_out = _inputs(seqlens, nheads, headdim, dstate, ngroups, chunk_size,
                                      input_dtype)
    T = int(metadata["cu_seqlens"][-1])
    index = {k: jnp.asarray(v) for k, v in metadata.items()}
    compiled = jax.jit(_step(index, chunk_size)).lower(inputs, d_out).compile()
    seconds = time_jax(lambda _: compiled(inputs, d_out), None, repeats)
    return dict(op=OP, implementation="pallas", tokens=T, layout=layout, num_seqs=len(seqlens),
                nheads=nheads, headdim=headdim, dstate=dstate, ngroups=ngroups,
                chunk_size=chunk_size, input_dtype=input_dtype, state_dtype="float32",
                median_us=seconds * 1e6, tokens_per_s=T / seconds,
                step_bytes=_compiled_bytes(compiled), peak_bytes_in_use=_peak_bytes())


def gradient_errors(seqlens, nheads, headdim, dstate, ngroups, chunk_size, input_dtype) -> dict:
    """max relative error of each gradient against the plain-ops XLA
    reference's (float32 on the same bf16-rounded inputs)."""
    inputs, metadata, d_out = _inputs(seqlens, nheads, headdim, dstate, ngroups, chunk_size,
                                      input_dtype)
    got = jax.jit(_step({k: jnp.asarray(v) for k, v in metadata.items()}, chunk_size))(inputs, d_out)

    def reference(inputs, d_out):  # the chunk metadata closed over: it must be concrete
        f32 = {k: v.astype(jnp.float32) for k, v in inputs.items()}
        _, vjp = jax.vjp(lambda i: ssd_chunked_jnp(
            **i, chunk_size=chunk_size, dt_softplus=True,
            **{k: metadata[k] for k in ("cu_chunk_seqlens", "seq_idx", "last_chunk_indices")}), f32)
        return vjp((d_out.astype(jnp.float32),
                    jnp.zeros((len(seqlens), nheads, headdim, dstate), jnp.float32)))[0]

    want = jax.jit(reference)(inputs, d_out)
    return {f"max_rel_error_d{k}": rel_error(got[k].astype(jnp.float32), want[k]) for k in GRADS}


def backward_rows_jax(quick: bool, with_reference: bool = True) -> list[dict]:
    """Rows of the forward + backward benchmark (see the module docstring).
    All rows are timed before any reference runs (the reference's memory
    would otherwise show in the process-wide peak)."""
    rng = np.random.default_rng(0)
    if ON_GPU and not quick:
        shape, totals, mixed, repeats = MAMBA2_2P7B_SSD, PREFILL_TOKENS, MIXED_SEQUENCES, 20
    else:
        shape, totals, mixed, repeats = CPU_SSD, (48,), 3, 1
    cases, rows = [], []
    for total in totals:
        for num_seqs in (1, mixed):
            seqlens = [total] if num_seqs == 1 else _random_seqlens(total, num_seqs, rng)
            layout = "1 sequence" if num_seqs == 1 else f"{num_seqs} mixed"
            cases.append(seqlens)
            rows.append(bench_case(seqlens, layout, **shape, input_dtype="bfloat16",
                                   repeats=repeats))
    if with_reference:
        for seqlens, row in zip(cases, rows):
            row.update(gradient_errors(seqlens, **shape, input_dtype="bfloat16"))
    return rows


def print_table(rows):
    print(f"{'implementation':<10}{'tokens':>7}{'layout':>14}{'err(dx)':>9}{'err(dB)':>9}"
          f"{'err(dA)':>9}{'median':>12}{'step MiB':>10}{'peak MiB':>10}")
    mib = lambda b: float("nan") if b is None else b / 2**20  # noqa: E731
    for r in rows:
        print(f"{r['implementation']:<10}{r['tokens']:>7}{r['layout']:>14}"
              f"{r.get('max_rel_error_dx', float('nan')):>9.1e}"
              f"{r.get('max_rel_error_dB', float('nan')):>9.1e}"
              f"{r.get('max_rel_error_dA', float('nan')):>9.1e}{r['median_us']:>10.1f}us"
              f"{mib(r['step_bytes']):>10.1f}{mib(r['peak_bytes_in_use']):>10.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    print_table(backward_rows_jax(parser.parse_args().quick))
