"""Installable package: tfmodels (Keras models), beam_jobs (Beam pipelines), serving (gRPC),
lifelong (the application on top: CLI, compare, replay, benchmarks, reports)."""
from setuptools import find_packages, setup

# One compatible set, checked to install and import together on Python 3.11
# (see ../shared/DESIGN.md "Stack"). tfx-bsl 1.21 pins apache-beam[gcp] 2.x and
# tensorflow-serving-api < 2.20.
INSTALL_REQUIRES = [
    "tensorflow==2.21.0",
    "tf-keras==2.21.0",
    "tensorflow-recommenders==0.7.7",
    "tfx-bsl==1.21.0",
    "apache-beam[gcp]==2.77.0",
    "tensorflow-serving-api==2.19.1",
    "tensorboard==2.21.0",          # TF 2.21 no longer bundles it; Keras TensorBoard callback
    "numpy>=1.26",
    "scikit-learn>=1.5",
    "numba>=0.60",                  # compiled k-means of the TWIN V2 clustering job (beam_jobs/cluster_numba.py)
    "matplotlib>=3.8",
    "prometheus_client>=0.20",      # serving metrics at /monitoring/prometheus/metrics (issue 20)
]
# redis-py is in "test" too: tests/test_cache_store.py runs the Redis store against a
# real redis-server (scripts/setup_env.sh installs ".[test]").
# pytest-xdist: ./test.sh runs the suite in 2 worker processes (one file per worker at a
# time), which keeps both cores busy through the single-threaded tracing and Python parts.
EXTRAS = {"test": ["pytest>=8", "pytest-xdist>=3.6", "hypothesis>=6.100", "redis>=5"],
          "redis": ["redis>=5"]}

setup(
    name="lifelong-ctr",
    version="0.1.0",
    description="Lifelong user-behavior CTR prediction: Keras models, Beam jobs, TF Serving",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["tfmodels*", "beam_jobs*", "serving*", "lifelong*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["lifelong=lifelong.cli:main"]},
)
