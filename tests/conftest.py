import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from frameworks import side  # noqa: E402,F401  (fixture)


@pytest.fixture
def rng(request):
    """Fresh random inputs every run; the seed is printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", seed))
    print(f"random seed: {seed}")
    return np.random.default_rng(seed)
