"""Mixer forward benchmark: ``torch_impl.MambaMixer2`` and ``jax_impl.MambaMixer2``
with the same weights on the same inputs.

    python -m experiments.bench_mixer [--quick] [--dtype float32|bfloat16] [--modes prefill decode]

On a GPU: Mamba-2 2.7B mixer (hidden 2560, intermediate 5120, 80 heads of 64,
dstate 128, 1 group, conv 4, chunk 256), float32 weights (default) and states; prefill
of 4k and 16k tokens (one fresh sequence) and decode of 1, 64 and 256
sequences (one token each, resuming cached states); ``--dtype bfloat16``
for bf16 weights and activations (states stay float32). On a CPU: a tiny mixer
in the interpreters (the times are interpreter times).

torch: the metadata moved to the device once (``torch_impl.metadata_to_device``);
a decode step captured in a CUDA graph (``torch_impl.CapturedDecodeStep``,
as vLLM captures one per batch-size bucket) and timed replayed, a prefill
timed eagerly (``mixer(hidden, cache, metadata)``, no host sync). JAX: the
module's jitted step (``mixer(hidden, conv_state, ssm_state, metadata)``
with the weights, hidden states and metadata as arguments, the states
donated; before 2026-12-01 the weights and hidden states were closed over,
compile-time constants that XLA may lay out at will). Each row
gives the largest difference between the two frameworks' outputs (relative
to the largest |output|; the mixers are tied to float64 by
tests/test_mamba_mixer2.py); torch rows give ``torch_vs_flax``, their time
over Flax's (the bar for a captured decode step: <= 1.1).
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

import bridge  # noqa: E402
import jax_impl  # noqa: E402
from jax_impl import mamba_mixer2 as jax_mixer_module  # noqa: E402
from experiments.shapes import (CPU_MIXER, MAMBA2_2P7B_MIXER, MIXER_DECODE_BATCHES,  # noqa: E402
                                PREFILL_TOKENS)
from experiments.timing import rel_error, time_jax, time_torch  # noqa: E402

ON_GPU = torch_impl.platform.ON_GPU


def cases(quick: bool):
    """(mode, query_lens, num_computed_tokens)."""
    if ON_GPU and not quick:
        return ([("prefill", [n], [0]) for n in PREFILL_TOKENS[:2]]
                + [("decode", [1] * b, [100] * b) for b in MIXER_DECODE_BATCHES])
    return [("prefill", [40], [0]), ("decode", [1] * 3, [5] * 3)]


def bench_case(torch_mixer, jax_mixer, config, mode, query_lens, computed, repeats, rng):
    device, dtype = torch_impl.platform.default_device(), torch_mixer.in_proj_weight.dtype
    num_requests, tokens = len(query_lens), int(sum(query_lens))
    slots = 1 + rng.permutation(2 * num_requests)[:num_requests]  # slot 0 is the null block
    metadata = bridge.build_mamba2_metadata(
        query_lens=query_lens, num_computed_tokens=computed, state_indices=slots,
        num_decodes=num_requests if mode == "decode" else 0, chunk_size=config["chunk_size"])
    cache = bridge.MambaStateCache(torch_mixer.get_state_shape(), "float32",
                                   num_blocks=2 * num_requests + 1, owner="torch", device=device.type)
    for name in ("conv", "ssm"):
        view = cache.torch(name)
        view.copy_(torch.randn(view.shape, generator=torch.Generator().manual_seed(1)).to(view.device))
    hidden = torch.from_numpy(rng.standard_normal((tokens, config["hidden_size"]), np.float32)).to(device, dtype)
    conv0, ssm0 = (jnp.asarray(cache.torch(name).cpu().numpy()) for name in ("conv", "ssm"))

    with torch.no_grad():
        torch_out = torch_mixer(hidden, cache, metadata).float().cpu().numpy()  # from the initial states
    if mode == "decode":
        step = torch_impl.CapturedDecodeStep(torch_mixer, cache, num_requests)
        step.run(hidden, metadata)
        seconds_torch = time_torch(step.replay, repeats, graph=False)
    else:
        on_device = torch_impl.metadata_to_device(metadata, device)
        with torch.no_grad():
            seconds_torch = time_torch(lambda: torch_mixer(hidden, cache, on_device), repeats, graph=False)
    hidden_j = jnp.asarray(hidden.float().cpu().numpy()).astype(str(dtype).removeprefix("torch."))
    metadata_j = metadata.map_arrays(jnp.asarray)
    # The module's own jitted step: weights and hidden states are arguments
    # (closed over, XLA would compile them in as constants and could fold
    # or re-lay-out the projections at compile time).
    step_j = jax_mixer_module._jitted_step
    jax_out, conv, ssm = step_j(conv0, ssm0, hidden_j, jax_mixer, metadata_j)
    jax_out = np.asarray(jax_out.astype(jnp.float32))
    seconds_jax = time_jax(lambda carry: step_j(*carry, hidden_j, jax_mixer, metadata_j)[1:], (conv, ssm),
                           repeats)
    common = dict(op="mamba_mixer2", mode=mode, batch=num_requests, tokens=tokens,
                  weights_dtype=str(dtype).removeprefix("torch."),
                  max_rel_diff_torch_vs_flax=rel_error(jax_out, torch_out))
    torch_timing = "cuda_graph_replay" if mode == "decode" and ON_GPU else "eager"
    return [dict(common, implementation="torch", timing=torch_timing, median_us=seconds_torch * 1e6,
                 tokens_per_s=tokens / seconds_torch, torch_vs_flax=seconds_torch / seconds_jax),
            dict(common, implementation="flax", timing="jit", median_us=seconds_jax * 1e6,
                 tokens_per_s=tokens / seconds_jax)]


def run(quick: bool, dtype: str = "float32", modes=("prefill", "decode")) -> list[dict]:
    """Rows of the mixer comparison (see the module docstring), weights in ``dtype``."""
    config = MAMBA2_2P7B_MIXER if ON_GPU and not quick else CPU_MIXER
    repeats = 20 if ON_GPU and not quick else 1
    torch_mixer = torch_impl.MambaMixer2(**config, dtype=getattr(torch, dtype),
                                         device=torch_impl.platform.default_device())
    jax_mixer = jax_impl.MambaMixer2(**config, dtype=getattr(jnp, dtype))
    jax_mixer.load_weights(torch_mixer.checkpoint_weights())
    rng = np.random.default_rng(0)
    rows = []
    for mode, query_lens, computed in cases(quick):
        if mode in modes:
            rows += bench_case(torch_mixer, jax_mixer, config, mode, query_lens, computed, repeats, rng)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the weights")
    parser.add_argument("--modes", nargs="+", default=["prefill", "decode"], choices=["prefill", "decode"])
    args = parser.parse_args()
    for row in run(args.quick, args.dtype, args.modes):
        ratio = f"  {row['torch_vs_flax']:.2f}x Flax" if "torch_vs_flax" in row else ""
        print(f"{row['implementation']:<6}{row['weights_dtype']:<9}{row['timing']:<18}{row['mode']:<8}{row['batch']:>5}"
              f"{row['tokens']:>7}"
              f"{row['median_us']:>12.1f}us{row['tokens_per_s'] / 1e6:>9.3f} Mtok/s"
              f"  diff {row['max_rel_diff_torch_vs_flax']:.1e}{ratio}")
