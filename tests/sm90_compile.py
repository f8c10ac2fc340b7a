"""Compile, for an sm_90 GPU, every Triton kernel a ``torch_impl`` call
launches, on a host without a GPU (Triton ships ptxas). The CPU tests run
the kernels in Triton's interpreter, which accepts some code that compiled
Triton refuses (a tuple holding an absent operand's None, for one); this
catches that class of bug before a GPU run.

``compile_launches(call)`` must run in a process that imported ``torch_impl``
with ``TRITON_INTERPRET=0`` (``run_in_subprocess`` starts one): the call runs
its launcher on CPU tensors as given, and each kernel launch is compiled
instead of run (the signature from the arguments' types, no alignment
assumptions). Returns the names of the kernels compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POINTER_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
                 "int32": "i32", "int64": "i64", "int8": "i8", "uint8": "u8", "bool": "i1"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")


def _signature(kernel, args, kwargs) -> tuple[dict, dict]:
    import torch
    bound = dict(zip(kernel.arg_names, args), **kwargs)
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = bound[param.name] if param.name in bound else param.default
        if param.is_constexpr or value is None:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + POINTER_TYPES[str(value.dtype).removeprefix("torch.")]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            signature[param.name] = "fp32"
    return signature, constexprs


def compile_launches(call) -> list[str]:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    import torch_impl

    assert not torch_impl.platform.INTERPRET, "import torch_impl with TRITON_INTERPRET=0"
    compiled = []

    def compile_instead(kernel, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
        signature, constexprs = _signature(kernel, args, kwargs)
        triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32), options=options)
        compiled.append(kernel.__name__)

    JITFunction.run = compile_instead
    torch_impl.platform.check_kernel_device = lambda tensors: torch.device("cpu")
    torch_impl.platform._DIRECT = False  # launches go through JITFunction.run, replaced above
    call()
    return compiled


def run_in_subprocess(code: str, timeout: float = 300) -> str:
    """Runs ``code`` (which calls ``compile_launches``) in a fresh Python with
    TRITON_INTERPRET=0; returns its stdout, raising with its stderr on failure."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    if done.returncode:
        raise AssertionError(f"compile for sm_90 failed:\n{done.stderr[-4000:]}")
    return done.stdout
