"""The mixer's two projections at decode batch sizes, float32 and bf16:
torch's ``F.linear`` under cuBLAS and under cuBLASLt
(``torch.backends.cuda.preferred_blas_library``) against the jitted
``jnp.matmul`` of the Flax mixer (precision HIGHEST in float32, as
``jax_impl.mamba_mixer2``), all in one run. Where issue 11's torch decode
step loses to Flax: which GEMM each library picks for a skinny product.

    python -m experiments.bench_projection

Mamba-2 2.7B: in_proj (10576, 2560), out_proj (2560, 5120); batches
``MIXER_DECODE_BATCHES``; each time a median of CUDA-graph (torch) or
steady-stream (JAX) samples (``experiments.timing``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from experiments.shapes import MAMBA2_2P7B_MIXER, MIXER_DECODE_BATCHES
from experiments.timing import time_jax, time_torch

REPEATS = 20


def projection_shapes(mixer=MAMBA2_2P7B_MIXER) -> dict:
    """{name: (out_features, in_features)} of the mixer's two projections."""
    inner, groups, state = mixer["intermediate_size"], mixer["n_groups"], mixer["ssm_state_size"]
    return {"in_proj": (2 * inner + 2 * groups * state + mixer["num_heads"], mixer["hidden_size"]),
            "out_proj": (mixer["hidden_size"], inner)}


def torch_us(x, weight, library: str) -> float:
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(library)
    try:
        return time_torch(lambda: F.linear(x, weight), REPEATS) * 1e6
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


def jax_us(x, weight) -> float:
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    matmul = jax.jit(lambda x, w: jnp.matmul(x, w.T, precision=precision))
    return time_jax(lambda _: matmul(x, weight), None, REPEATS) * 1e6


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_projection: needs a CUDA GPU")
    rng = np.random.default_rng(0)
    print(f"{'dtype':<9}{'proj':<9}{'batch':>6}{'cuBLAS us':>11}{'cuBLASLt us':>13}{'XLA us':>9}")
    for dtype in ("float32", "bfloat16"):
        for name, (out_features, in_features) in projection_shapes().items():
            w = rng.standard_normal((out_features, in_features)).astype(np.float32) * 0.02
            tw = torch.from_numpy(w).to("cuda", getattr(torch, dtype))
            jw = jnp.asarray(w, getattr(jnp, dtype))
            for batch in MIXER_DECODE_BATCHES:
                x = rng.standard_normal((batch, in_features)).astype(np.float32)
                tx, jx = torch.from_numpy(x).to("cuda", tw.dtype), jnp.asarray(x, jw.dtype)
                print(f"{dtype:<9}{name:<9}{batch:>6}{torch_us(tx, tw, 'cublas'):>11.1f}"
                      f"{torch_us(tx, tw, 'cublaslt'):>13.1f}{jax_us(jx, jw):>9.1f}", flush=True)


if __name__ == "__main__":
    main()
