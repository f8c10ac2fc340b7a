"""The published kernels the benchmarks run side by side with ours: mamba_ssm's
Triton ops, imported unmodified from ``$MAMBA_SSM_ANCHOR`` (a folder holding
``mamba_ssm/ops/triton/``, e.g. from the PyPI sdist; never part of this
repository). ``None`` when the variable is unset or the files do not import."""

from __future__ import annotations

import importlib
import os
import sys

ANCHOR_ENV = "MAMBA_SSM_ANCHOR"


def mamba_ssm_op(module: str, name: str):
    """``mamba_ssm.ops.triton.<module>.<name>``, or None."""
    folder = os.environ.get(ANCHOR_ENV)
    if not folder:
        return None
    sys.path.insert(0, folder)
    try:
        return getattr(importlib.import_module(f"mamba_ssm.ops.triton.{module}"), name)
    except ImportError as error:
        print(f"mamba_ssm anchor not importable: {error}")
        return None
    finally:
        sys.path.remove(folder)
