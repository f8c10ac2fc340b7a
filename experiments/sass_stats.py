"""Instruction mix of the selective scan compiled for an sm_90 GPU on this
host (no GPU needed): the Triton kernel as a launch would specialize it
(``tests/sm90_compile.py``), or the Pallas kernel's Triton IR, lowered for
CUDA, compiled by Triton (not by the compiler inside XLA, whose output
differs: see ``experiments/results/gpu-2026-12-01c-NVIDIA_H200.md``).
Prints the registers and stack per thread and, for each basic block of the
assembly with at least ``--min-block`` instructions, its size and most
common opcodes (the token loop's blocks: the unmasked and the edge tile).

    python -m experiments.sass_stats [--framework torch|jax] [--batch 64] [--seqlen 64]
                                     [--dim 5120] [--dstate 16] [--min-block 200]

The shape only sets the launch's tiles (``scan_tiles``); inputs are bf16 as
in ``experiments.bench_selective_scan``.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TORCH_COMPILE = """
import sys
import numpy as np, torch
from sm90_compile import compile_launches
from experiments.bench_selective_scan import BF16_ARGS, inputs
from torch_impl.selective_scan import selective_scan_fn
arrays = inputs(np.random.default_rng(0), {dim}, {dstate}, {batch}, {seqlen})
args = {{k: torch.from_numpy(v).to(torch.bfloat16 if k in BF16_ARGS else None) for k, v in arrays.items()}}
kept = {{}}
compile_launches(lambda: selective_scan_fn(**args, delta_softplus=True), kept)
open(sys.argv[1], "wb").write(kept["_selective_scan_kernel"].asm["cubin"])
"""


def _tool(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def torch_cubin(shape: dict, path: Path) -> None:
    """The Triton kernel's cubin, compiled in a process without the interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    subprocess.run([sys.executable, "-c", TORCH_COMPILE.format(**shape), str(path)], env=env, cwd=ROOT,
                   check=True)


def jax_cubin(shape: dict, path: Path) -> None:
    """The Pallas kernel's Triton IR, lowered for CUDA and compiled by Triton."""
    from experiments.bench_selective_scan import BF16_ARGS, inputs  # first: imports torch_impl before triton

    import jax
    import jax.numpy as jnp
    import numpy as np
    import triton
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect
    from triton.backends.compiler import GPUTarget

    import jax_impl
    from jax_impl.selective_scan import selective_scan_fn

    jax_impl.platform.INTERPRET = False  # lower the kernel as on a GPU
    arrays = inputs(np.random.default_rng(0), shape["dim"], shape["dstate"], shape["batch"], shape["seqlen"])
    specs = {k: jax.ShapeDtypeStruct(v.shape, jnp.bfloat16 if k in BF16_ARGS else v.dtype)
             for k, v in arrays.items()}
    step = jax.jit(lambda **kw: selective_scan_fn(**kw, delta_softplus=True, validate_indices=False))
    module = step.trace(**specs).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    calls = [op for op in module.body.operations[0].regions[0].blocks[0].operations
             if op.operation.name == "stablehlo.custom_call"]
    config = calls[0].attributes["mhlo.backend_config"]
    context = mlir.make_ir_context()
    tt_dialect.register_dialect(context)
    with context:  # bytecode -> text, which Triton's own MLIR parses
        text = ir.Module.parse(bytes(config["ir"].value_bytes)).operation.get_asm(enable_debug_info=False)
    ttir = path.with_suffix(".ttir")
    ttir.write_text(text)
    warps = int(str(config["num_warps"]).split(":")[0])
    compiled = triton.compile(str(ttir), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    path.write_bytes(compiled.asm["cubin"])


def block_stats(sass: str) -> list[tuple[str, int, collections.Counter]]:
    """(label, instruction count, opcode counts) per basic block."""
    blocks = [("entry", collections.Counter())]
    for line in sass.splitlines():
        label = re.match(r"^\s*\.(L_x_\d+):", line)
        if label:
            blocks.append((label.group(1), collections.Counter()))
            continue
        op = re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if op:
            blocks[-1][1][op.group(1)] += 1
    return [(name, sum(ops.values()), ops) for name, ops in blocks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--framework", choices=["torch", "jax"], default="torch")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--dim", type=int, default=5120)
    parser.add_argument("--dstate", type=int, default=16)
    parser.add_argument("--min-block", type=int, default=200)
    args = parser.parse_args()
    shape = dict(batch=args.batch, seqlen=args.seqlen, dim=args.dim, dstate=args.dstate)
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        (torch_cubin if args.framework == "torch" else jax_cubin)(shape, cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], check=True, capture_output=True,
                              text=True).stdout
    print(f"{args.framework} selective scan, sm_90: {usage.strip().splitlines()[-1].strip()}")
    for name, count, ops in block_stats(sass):
        if count >= args.min_block:
            print(f"{name:>8} {count:5d}  " + " ".join(f"{op} {n}" for op, n in ops.most_common(14)))


if __name__ == "__main__":
    main()
