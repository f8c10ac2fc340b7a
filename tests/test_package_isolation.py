"""A Flax user needs no torch and a PyTorch user no JAX."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("package,forbidden", [("jax_impl", "torch"), ("torch_impl", "jax"),
                                               ("bridge", "torch"), ("bridge", "jax")])
def test_import_does_not_pull_the_other_framework(package, forbidden):
    pytest.importorskip(package)
    code = f"import sys, {package}; print({forbidden!r} in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", f"import {package} imported {forbidden}"
