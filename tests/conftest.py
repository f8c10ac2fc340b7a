import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from frameworks import side  # noqa: E402,F401  (fixture)


SLOW_ENV = "MAMBA_TWIN_SLOW"


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the cases marked slow")


def pytest_collection_modifyitems(config, items):
    """CI (CPU, interpreters) runs a representative subset; ``--slow`` (the GPU
    runs) runs every case."""
    if config.getoption("--slow") or os.environ.get(SLOW_ENV, "0") not in ("", "0"):
        return
    skip = pytest.mark.skip(reason=f"slow: run with --slow or {SLOW_ENV}=1")
    for item in items:
        marker = item.get_closest_marker("slow")
        if marker is None:
            continue
        # slow(side="jax"): slow for that framework only (the `side` fixture's parameter).
        only = marker.kwargs.get("side")
        callspec = getattr(item, "callspec", None)
        if only is None or (callspec is not None and callspec.params.get("side") == only):
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """Fresh random inputs every run; the seed is printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", seed))
    print(f"random seed: {seed}")
    return np.random.default_rng(seed)
