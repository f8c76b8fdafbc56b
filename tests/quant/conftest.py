import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    # Fixed seed: the error bounds are tight, so a run must not depend on luck.
    return np.random.default_rng(20261127)
