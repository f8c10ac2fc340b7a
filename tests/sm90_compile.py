"""Compile, for an sm_90 GPU, every Triton kernel a ``torch_impl`` call
launches, on a host without a GPU (Triton ships ptxas). The CPU tests run
the kernels in Triton's interpreter, which accepts some code that compiled
Triton refuses (a tuple holding an absent operand's None, for one); this
catches that class of bug before a GPU run.

``compile_launches(call)`` must run in a process that imported ``torch_impl``
with ``TRITON_INTERPRET=0`` (``run_in_subprocess`` starts one): the call runs
its launcher on CPU tensors as given, and each kernel launch is compiled
instead of run, specialized as a launch on the GPU would be (Triton's
binder). Returns the names of the kernels compiled; ``keep`` (a dict), when
given, receives each compiled binary by kernel name (its ``asm`` holds the
PTX and the cubin).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compile_launches(call, keep: dict | None = None) -> list[str]:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    import torch_impl

    assert not torch_impl.platform.INTERPRET, "import torch_impl with TRITON_INTERPRET=0"
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    compiled = []

    def compile_instead(kernel, *args, grid, warmup, **kwargs):
        # Triton's own binder: the signature and the specializations (ints
        # equal to 1, 16-divisible ints and aligned pointers) of a real launch.
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args,
                                                                  specialization, options)
        binary = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
        compiled.append(kernel.__name__)
        if keep is not None:
            keep[kernel.__name__] = binary

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
