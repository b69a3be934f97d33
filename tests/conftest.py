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


# The longest files first: ./test.sh hands whole files to 2 xdist workers in collection
# order (--dist loadfile), so starting the long ones first keeps the two workers' ends
# close (longest-processing-time-first). Every worker sorts the same way (a stable sort
# by a fixed list), as xdist requires identical collections.
# Order: summed test seconds per file of a `./test.sh --durations=0` run (session 7).
LONG_FILES = ("test_models.py", "test_serving.py", "test_prepare.py", "test_learning.py",
              "test_cli.py", "test_lrea.py", "test_model_configs.py", "test_train.py",
              "test_multiworker.py", "test_bench_accuracy.py", "test_cformer.py",
              "test_prepare_cross_domain.py", "test_replay.py", "test_encode.py",
              "test_cross_domain.py", "test_compact_readers.py", "test_cross_domain_configs.py",
              "test_incremental_refresh.py", "test_crp.py", "test_staleness.py",
              "test_precompute.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)
    items.sort(key=rank)
