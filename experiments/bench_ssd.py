"""Chunked-scan (SSD prefill) benchmark: Triton, Pallas and the plain-ops
baselines (torch, XLA) on the same inputs, each checked against float64.

    python -m experiments.bench_ssd [--quick] [--backward [--tokens N ...] [--sequences N ...]]

On a GPU: Mamba-2 2.7B heads (nheads 80, headdim 64, dstate 128, ngroups 1,
chunk 256), bf16 inputs, float32 states, 4k / 16k / 64k tokens as one
sequence and as 64 sequences of random lengths. On a CPU: tiny shapes in
the interpreters (the times are interpreter times).

FLOPs counted are the useful ones of the chunked form: per chunk of l tokens
and head, 2 l P N (chunk state) + 2 l P N (start state's part of the output)
+ l (l + 1) P (causal intra-chunk product), plus l (l + 1) N per group (C B^T).

``--backward`` (``backward_rows``; in the main job as op
``chunked_scan_backward``): forward + backward of the differentiable call
(gradients of every input from random cotangents of ``out`` and the final
states), bf16 inputs, Triton and Pallas, next to mamba_ssm's Triton forward +
backward (one sequence only: its backward takes no ``cu_seqlens``) when its
unmodified Triton files are importable from ``$MAMBA_SSM_ANCHOR`` (a folder
holding ``mamba_ssm/``; never part of this repository). Peak memory: torch's
``max_memory_allocated`` over the call, less what was allocated before it
(the inputs), for the two torch implementations. ``--tokens`` /
``--sequences`` keep only those totals and sequence counts (a short GPU run).
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

import jax_impl  # noqa: E402
from bridge.spec.ssd_contract import chunk_metadata  # noqa: E402
from experiments.shapes import (CPU_SSD, MAMBA2_2P7B_SSD, MIXED_SEQUENCES, PREFILL_TOKENS,  # noqa: E402
                                PROFILE_TOKENS)
from experiments.anchors import mamba_ssm_op  # noqa: E402
from experiments.timing import rel_error, time_jax, time_torch  # noqa: E402
from jax_impl import reference as jax_reference  # noqa: E402
from torch_impl import reference as torch_reference  # noqa: E402

ON_GPU = torch_impl.platform.ON_GPU
OP = "mamba_chunk_scan_combined_varlen"


def random_seqlens(total_tokens: int, num_seqs: int, rng) -> np.ndarray:
    """num_seqs positive lengths summing to total_tokens, cut at random points."""
    cuts = np.sort(rng.choice(np.arange(1, total_tokens), size=num_seqs - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total_tokens]]))


def make_inputs(seqlens, nheads, headdim, dstate, ngroups, chunk_size, seed=0):
    """numpy float32 inputs of a Mamba-2 prefill (D per head, dt_bias,
    softplus; no z: the mixer gates in its norm) and int32 chunk metadata."""
    rng = np.random.default_rng(seed)
    cu_seqlens = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
    T = int(cu_seqlens[-1])
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    metadata = chunk_metadata(cu_seqlens, chunk_size)
    arrays = dict(x=r(T, nheads, headdim), dt=r(T, nheads) * 0.5 - 1.0, A=-np.exp(r(nheads) * 0.5),
                  B=r(T, ngroups, dstate), C=r(T, ngroups, dstate), D=r(nheads),
                  dt_bias=r(nheads) * 0.5)
    index = dict(cu_seqlens=cu_seqlens, cu_chunk_seqlens=metadata.cu_chunk_seqlens,
                 seq_idx=metadata.seq_idx, last_chunk_indices=metadata.last_chunk_indices)
    return arrays, index


def useful_flops(cu_chunk_seqlens, nheads, headdim, dstate, ngroups) -> float:
    lengths = np.diff(cu_chunk_seqlens).astype(np.float64)
    per_head = 4 * lengths * headdim * dstate + lengths * (lengths + 1) * headdim
    per_group = lengths * (lengths + 1) * dstate
    return float(nheads * per_head.sum() + ngroups * per_group.sum())


def framework_inputs(framework, arrays, index, input_dtype):
    """``(inputs, metadata)`` of ``make_inputs`` in one framework ("torch" or
    "jax") on its default device: x, dt, B, C in ``input_dtype``, the other
    inputs float32, the chunk metadata int32."""
    half = ("x", "dt", "B", "C")
    if framework == "torch":
        device = torch_impl.platform.default_device()
        return ({k: torch.from_numpy(v).to(device, getattr(torch, input_dtype) if k in half else torch.float32)
                 for k, v in arrays.items()},
                {k: torch.from_numpy(v).to(device) for k, v in index.items()})
    return ({k: jnp.asarray(v, dtype=getattr(jnp, input_dtype) if k in half else jnp.float32)
             for k, v in arrays.items()},
            {k: jnp.asarray(v) for k, v in index.items()})


def scan_calls(arrays, index, chunk_size, input_dtype) -> dict:
    """{"triton": call, "pallas": call}: each ``call()`` runs one chunked scan
    of the kernels on the inputs of ``make_inputs`` and returns ``(out,
    final_states)`` (the Pallas call is jitted, its ``out`` donated and fed
    to the next call)."""
    options = dict(chunk_size=chunk_size, dt_softplus=True)
    t, ti = framework_inputs("torch", arrays, index, input_dtype)
    out = torch.full_like(t["x"], float("nan"))  # poisoned: the scan overwrites every token

    def triton_call():
        states = torch_impl.mamba_chunk_scan_combined_varlen(
            **t, **options, **ti, out=out, state_dtype=torch.float32, validate_metadata=False)
        return out, states

    j, ji = framework_inputs("jax", arrays, index, input_dtype)
    pallas = jax.jit(lambda out, j, ji: jax_impl.mamba_chunk_scan_combined_varlen(
        **j, **options, **ji, out=out, state_dtype=jnp.float32), donate_argnums=0)
    carry = [jnp.full_like(j["x"], jnp.nan)]

    def pallas_call():
        carry[0], states = pallas(carry[0], j, ji)
        return carry[0], states

    return {"triton": triton_call, "pallas": pallas_call}


def bench_case(seqlens, layout, nheads, headdim, dstate, ngroups, chunk_size, input_dtype,
               repeats, with_baselines=True):
    arrays, index = make_inputs(seqlens, nheads, headdim, dstate, ngroups, chunk_size)
    T = int(index["cu_seqlens"][-1])
    options = dict(chunk_size=chunk_size, dt_softplus=True)
    t, ti = framework_inputs("torch", arrays, index, input_dtype)
    want_out, want_states = torch_reference.ssd_chunked_torch_ops(
        **t, **options, **{k: ti[k] for k in ("cu_chunk_seqlens", "seq_idx", "last_chunk_indices")},
        compute_dtype=torch.float64)
    want_out, want_states = want_out.cpu().numpy(), want_states.cpu().numpy()
    flops = useful_flops(index["cu_chunk_seqlens"], nheads, headdim, dstate, ngroups)
    rows = []

    def record(name, out, states, seconds):
        rows.append(dict(op=OP, implementation=name, tokens=T, layout=layout, num_seqs=len(seqlens),
                         nheads=nheads, headdim=headdim, dstate=dstate, ngroups=ngroups,
                         chunk_size=chunk_size, input_dtype=input_dtype, state_dtype="float32",
                         max_rel_error_out=rel_error(out, want_out),
                         max_rel_error_states=rel_error(states, want_states),
                         median_us=seconds * 1e6, TFLOPs=flops / seconds / 1e12,
                         tokens_per_s=T / seconds))

    calls = scan_calls(arrays, index, chunk_size, input_dtype)
    out, states = calls["triton"]()
    record("triton", out.float().cpu().numpy(), states.cpu().numpy(), time_torch(calls["triton"], repeats))
    if with_baselines:
        torch_ops = lambda: torch_reference.ssd_chunked_torch_ops(  # noqa: E731
            **t, **options, **{k: ti[k] for k in ("cu_chunk_seqlens", "seq_idx", "last_chunk_indices")})
        base_out, base_states = torch_ops()
        record("torch-reference", base_out.float().cpu().numpy(), base_states.cpu().numpy(),
               time_torch(torch_ops, repeats, graph=False))
    del t

    out, states = calls["pallas"]()
    record("pallas", np.asarray(out.astype(jnp.float32)), np.asarray(states),
           time_jax(lambda _: calls["pallas"](), None, repeats))
    if with_baselines:
        j, _ = framework_inputs("jax", arrays, index, input_dtype)
        # The chunk metadata is closed over: the plain-ops form needs it concrete.
        xla = jax.jit(lambda j: jax_reference.ssd_chunked_jnp(
            **j, **options, **{k: index[k] for k in ("cu_chunk_seqlens", "seq_idx", "last_chunk_indices")}))
        base_out, base_states = xla(j)
        record("xla-reference", np.asarray(base_out.astype(jnp.float32)), np.asarray(base_states),
               time_jax(lambda carry: xla(j), None, repeats))
    return rows


STAGES = ("chunk_cumsum", "chunk_state", "state_passing", "bmm_chunk", "chunk_scan")


def stage_calls(framework, seqlens, nheads, headdim, dstate, ngroups, chunk_size, input_dtype):
    """``(calls, arrays)`` for one framework ("triton" or "pallas"): each
    ``calls[stage](arrays)`` runs one kernel stage on the outputs of the
    stages before it (held in ``arrays``) and returns its result. JAX calls
    are not jitted: the caller jits, after any config override, with
    ``arrays`` as an argument (closed over, XLA would fold them into the
    program as constants)."""
    if framework == "triton":
        from torch_impl import ssd_bmm as bmm, ssd_chunk_scan as scan, ssd_chunk_state as state
        from torch_impl import ssd_state_passing as passing
    else:
        from jax_impl import ssd_bmm as bmm, ssd_chunk_scan as scan, ssd_chunk_state as state
        from jax_impl import ssd_state_passing as passing
    arrays, index = make_inputs(seqlens, nheads, headdim, dstate, ngroups, chunk_size)
    num_seqs = len(seqlens)
    a, metadata = framework_inputs("torch" if framework == "triton" else "jax", arrays, index, input_dtype)
    a.update(metadata)
    calls = {
        "chunk_cumsum": lambda a: state.chunk_cumsum(a["dt"], a["A"], chunk_size, a["cu_chunk_seqlens"],
                                                     a["dt_bias"], True),
        "chunk_state": lambda a: state.chunk_state(a["B"], a["x"], a["dt_out"], a["dA_cumsum"],
                                                   a["cu_chunk_seqlens"]),
        "state_passing": lambda a: passing.state_passing(a["chunk_states"], a["dA_cumsum"], a["seq_idx"],
                                                         num_seqs, end_states_dtype=a["C"].dtype),
        "bmm_chunk": lambda a: bmm.bmm_chunk(a["C"], a["B"], a["cu_chunk_seqlens"], chunk_size),
        "chunk_scan": lambda a: scan.chunk_scan(a["CB"], a["x"], a["dt_out"], a["dA_cumsum"], a["C"],
                                                a["end_states"], a["cu_chunk_seqlens"], a["seq_idx"],
                                                num_seqs, D=a["D"]),
    }
    if framework == "triton":  # the backward's stage 4 (tuning): two kernels, two configs
        calls["chunk_scan_bwd"] = lambda a: scan.chunk_scan_bwd(
            a["x"], a["B"], a["C"], a["dout"], None, None, a["D"], a["dt_out"], a["dA_cumsum"],
            a["dend_states"], a["cu_chunk_seqlens"])
        calls["chunk_scan_bwd_dC"] = lambda a: scan.chunk_scan_bwd_dC(
            a["x"], a["B"], a["C"], a["dout"], None, a["dt_out"], a["dA_cumsum"], a["end_states"],
            None, a["cu_chunk_seqlens"], a["seq_idx"], num_seqs)
    else:  # one function, both kernels; each stage's call returns what its kernel makes first
        stage4 = lambda a: scan.chunk_scan_bwd(  # noqa: E731
            a["x"], a["dout"], a["dt_out"], a["dA_cumsum"], a["B"], a["C"], a["dend_states"],
            a["end_states"], a["cu_chunk_seqlens"], a["seq_idx"], num_seqs, D=a["D"])
        calls["chunk_scan_bwd"] = stage4
        calls["chunk_scan_bwd_dC"] = lambda a: stage4(a)[::-1]  # dC first
    a["dA_cumsum"], a["dt_out"] = calls["chunk_cumsum"](a)
    a["chunk_states"] = calls["chunk_state"](a)
    a["end_states"], _ = calls["state_passing"](a)
    a["CB"] = calls["bmm_chunk"](a)
    rng = np.random.default_rng(2)  # the backward's cotangents: dout and G_c
    a["dout"] = _as(a["x"], rng.standard_normal(a["x"].shape).astype(np.float32))
    a["dend_states"] = _as(a["x"], rng.standard_normal(a["end_states"].shape).astype(np.float32), True)
    return calls, a


def _as(like, values, float32=False):
    """numpy ``values`` as an array of ``like``'s framework and device (its
    dtype, or float32)."""
    if isinstance(like, torch.Tensor):
        return torch.from_numpy(values).to(like.device, torch.float32 if float32 else like.dtype)
    return jnp.asarray(values, jnp.float32 if float32 else like.dtype)


def time_stage(framework, call, arrays, repeats) -> float:
    """Median seconds of one stage call on ``arrays``."""
    if framework == "triton":
        return time_torch(lambda: call(arrays), repeats)
    jitted = jax.jit(call)
    return time_jax(lambda carry: jitted(arrays), None, repeats)


def stage_shape(quick: bool):
    """(seqlens, shape, repeats) of the per-stage profile and tuning."""
    if ON_GPU and not quick:
        return [PROFILE_TOKENS], MAMBA2_2P7B_SSD, 20
    return [48], CPU_SSD, 1


def print_stage_times(quick: bool):
    """Where the time of one chunked scan goes: each stage, each framework."""
    seqlens, shape, repeats = stage_shape(quick)
    print(f"stage times (us), {sum(seqlens)} tokens:{'triton':>12}{'pallas':>10}")
    calls = {fw: stage_calls(fw, seqlens, **shape, input_dtype="bfloat16") for fw in ("triton", "pallas")}
    for stage in STAGES:
        print(f"{stage:<34}" + "".join(f"{time_stage(fw, calls[fw][0][stage], calls[fw][1], repeats) * 1e6:>10.1f}"
                                       for fw in ("triton", "pallas")))


def run(quick: bool) -> list[dict]:
    """Rows of the chunked-scan comparison (see the module docstring)."""
    rng = np.random.default_rng(0)
    if ON_GPU and not quick:
        shape, totals, repeats = MAMBA2_2P7B_SSD, PREFILL_TOKENS, 20
    else:
        shape = CPU_SSD
        totals, repeats = (48,), 1
    return [row for seqlens, layout in layouts(totals, (1, MIXED_SEQUENCES if ON_GPU and not quick else 3), rng)
            for row in bench_case(seqlens, layout, **shape, input_dtype="bfloat16", repeats=repeats)]


def layouts(totals, seq_counts, rng):
    """(seqlens, layout name) per total token count and sequence count."""
    for total in totals:
        for num_seqs in seq_counts:
            seqlens = [total] if num_seqs == 1 else random_seqlens(total, num_seqs, rng)
            yield seqlens, "1 sequence" if num_seqs == 1 else f"{num_seqs} mixed"


def print_table(rows):
    print(f"{'implementation':<17}{'tokens':>7}{'layout':>14}{'err(out)':>10}{'err(st)':>9}"
          f"{'median':>12}{'TFLOP/s':>9}{'Mtok/s':>8}")
    for r in rows:
        print(f"{r['implementation']:<17}{r['tokens']:>7}{r['layout']:>14}{r['max_rel_error_out']:>10.1e}"
              f"{r['max_rel_error_states']:>9.1e}{r['median_us']:>10.1f}us{r['TFLOPs']:>9.2f}"
              f"{r['tokens_per_s'] / 1e6:>8.2f}")


def mamba_ssm_chunk_scan():
    """mamba_ssm's ``mamba_chunk_scan_combined`` (Triton forward + backward), or None."""
    return mamba_ssm_op("ssd_combined", "mamba_chunk_scan_combined")


DIFF_ARGS = ("x", "dt", "A", "B", "C", "D", "dt_bias")


def backward_calls(arrays, index, chunk_size, input_dtype, with_pallas=True) -> dict:
    """{implementation: call}: each ``call()`` runs forward + backward and
    returns the gradients (dict by input name), from the same random
    cotangents of ``out`` and the final states."""
    rng = np.random.default_rng(1)
    T, H, P = arrays["x"].shape
    Q, N = len(index["cu_seqlens"]) - 1, arrays["B"].shape[2]
    d_out = rng.standard_normal((T, H, P)).astype(np.float32)
    d_states = rng.standard_normal((Q, H, P, N)).astype(np.float32)
    options = dict(chunk_size=chunk_size, dt_softplus=True)
    t, ti = framework_inputs("torch", arrays, index, input_dtype)
    leaves = {k: t[k].requires_grad_() for k in DIFF_ARGS}
    t_dout = torch.from_numpy(d_out).to(t["x"].device, t["x"].dtype)
    t_dstates = torch.from_numpy(d_states).to(t["x"].device)

    def triton_call():
        out, states = torch_impl.mamba_chunk_scan_combined_varlen(
            **leaves, **options, **ti, state_dtype=torch.float32, validate_metadata=False)
        grads = torch.autograd.grad((out, states), list(leaves.values()), (t_dout, t_dstates))
        return dict(zip(leaves, grads))

    calls = {"triton": triton_call}
    anchor = mamba_ssm_chunk_scan() if Q == 1 else None
    if anchor is not None:
        batched = {k: (v.detach().unsqueeze(0) if k in ("x", "dt", "B", "C") else v.detach()).requires_grad_()
                   for k, v in leaves.items()}

        def mamba_ssm_call():
            out, final = anchor(**batched, **options, return_final_states=True)
            grads = torch.autograd.grad((out, final), list(batched.values()),
                                        (t_dout.unsqueeze(0), t_dstates.to(final.dtype)))
            return {k: (g[0] if k in ("x", "dt", "B", "C") else g) for k, g in zip(batched, grads)}

        calls["mamba_ssm"] = mamba_ssm_call
    if with_pallas:
        j, ji = framework_inputs("jax", arrays, index, input_dtype)
        primals = {k: j[k] for k in DIFF_ARGS}
        j_cot = (jnp.asarray(d_out, j["x"].dtype), jnp.asarray(d_states))

        @jax.jit
        def pallas_grads(primals, ji, cotangents):
            def f(primals):
                return jax_impl.mamba_chunk_scan_combined_varlen(
                    **primals, **options, **ji, state_dtype=jnp.float32)
            outputs, vjp = jax.vjp(f, primals)
            # The outputs returned too: unused, XLA would drop the forward's output kernel.
            return vjp(cotangents)[0], outputs

        calls["pallas"] = lambda: pallas_grads(primals, ji, j_cot)[0]
    return calls


def peak_extra_bytes(call) -> float:
    """Peak torch allocation during ``call()`` beyond what was allocated before it."""
    if not ON_GPU:
        return float("nan")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - before)


def backward_case(seqlens, layout, nheads, headdim, dstate, ngroups, chunk_size, input_dtype,
                  repeats, with_pallas=True) -> list[dict]:
    arrays, index = make_inputs(seqlens, nheads, headdim, dstate, ngroups, chunk_size)
    T = int(index["cu_seqlens"][-1])
    calls = backward_calls(arrays, index, chunk_size, input_dtype, with_pallas)
    grads = {name: call() for name, call in calls.items()}  # compiles; the grads for the errors
    rows = []
    for name, call in calls.items():
        if name == "pallas":
            seconds = time_jax(lambda _: call(), None, repeats)
        else:
            seconds = time_torch(call, repeats, graph=False)
        row = dict(op=f"{OP} fwd+bwd", implementation=name, tokens=T, layout=layout,
                   num_seqs=len(seqlens), nheads=nheads, headdim=headdim, dstate=dstate,
                   ngroups=ngroups, chunk_size=chunk_size, input_dtype=input_dtype,
                   median_us=seconds * 1e6, tokens_per_s=T / seconds)
        if name != "pallas":
            row["peak_MiB"] = peak_extra_bytes(call) / 2**20
        if name != "triton":  # the same gradients as Triton's (a sanity check of the timed code)
            row["max_rel_error_grads_vs_triton"] = max(
                rel_error(np.asarray(g.astype(jnp.float32)) if name == "pallas" else g.float().cpu().numpy(),
                          grads["triton"][k].float().cpu().numpy())
                for k, g in grads[name].items())
        rows.append(row)
    by_name = {r["implementation"]: r for r in rows}
    if "mamba_ssm" in by_name:
        for r in rows:
            r["speedup_vs_mamba_ssm"] = by_name["mamba_ssm"]["median_us"] / r["median_us"]
    return rows


def backward_rows(quick: bool, tokens=None, sequences=None) -> list[dict]:
    """Forward + backward rows (see the module docstring); ``tokens`` /
    ``sequences`` (GPU): only those totals / sequence counts."""
    rng = np.random.default_rng(0)
    if ON_GPU and not quick:
        shape, totals, repeats = MAMBA2_2P7B_SSD, tuple(tokens or PREFILL_TOKENS), 10
        counts = tuple(sequences or (1, MIXED_SEQUENCES))
    else:  # the interpreters: one small case (seconds per call)
        shape, totals, repeats, counts = CPU_SSD, (32,), 1, (1,)
    # On a CPU the Pallas backward's tracing takes most of a minute: GPU only.
    return [row for seqlens, layout in layouts(totals, counts, rng)
            for row in backward_case(seqlens, layout, **shape, input_dtype="bfloat16", repeats=repeats,
                                     with_pallas=ON_GPU)]


def print_backward_table(rows):
    print(f"{'implementation':<12}{'tokens':>7}{'layout':>12}{'median':>13}{'peak MiB':>10}"
          f"{'vs mamba_ssm':>14}{'err vs triton':>15}")
    for r in rows:
        print(f"{r['implementation']:<12}{r['tokens']:>7}{r['layout']:>12}{r['median_us']:>11.1f}us"
              f"{r.get('peak_MiB', float('nan')):>10.1f}{r.get('speedup_vs_mamba_ssm', float('nan')):>13.2f}x"
              f"{r.get('max_rel_error_grads_vs_triton', float('nan')):>15.1e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stages", action="store_true", help="time each kernel stage instead")
    parser.add_argument("--backward", action="store_true", help="forward + backward rows instead")
    parser.add_argument("--tokens", type=int, nargs="*", help="with --backward on a GPU: only these totals")
    parser.add_argument("--sequences", type=int, nargs="*",
                        help="with --backward on a GPU: only these sequence counts")
    args = parser.parse_args()
    if args.backward:
        print_backward_table(backward_rows(args.quick, args.tokens, args.sequences))
    elif args.stages:
        print_stage_times(args.quick)
    else:
        print_table(run(args.quick))
