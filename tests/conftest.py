"""Shared fixtures: a tiny prepared dataset written once per session (no Beam)."""
import os

import pytest

import tfmodels  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
MOVIELENS = os.path.abspath(os.path.join(SHARED, "data", "ml-latest-small"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from tfmodels.testing import write_tiny_dataset
    return write_tiny_dataset(str(tmp_path_factory.mktemp("tiny_data")))


@pytest.fixture(scope="session")
def movielens_dir():
    if not os.path.exists(os.path.join(MOVIELENS, "ratings.csv")):
        pytest.skip("ml-latest-small not present (../shared/data/ml-latest-small)")
    return MOVIELENS
