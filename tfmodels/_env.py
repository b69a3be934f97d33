"""Keras-line guard: the package runs tf.keras as Keras 2 (the tf-keras package).

tensorflow-recommenders refuses Keras 3, so ``TF_USE_LEGACY_KERAS=1`` must be set
before TensorFlow is first imported. Importing :mod:`tfmodels` (or ``beam_jobs``,
``serving``) sets it; a caller that explicitly set it to ``0`` gets a clear error
instead of a confusing Keras 2/3 mix-up later (DeepCTR #453, TFRS #712).
"""
import os
import sys

from tfmodels.errors import LifelongError

_VAR = "TF_USE_LEGACY_KERAS"


class KerasLineError(RuntimeError, LifelongError):
    """Raised when the process is configured for Keras 3."""


def ensure_legacy_keras() -> None:
    value = os.environ.get(_VAR)
    if value is not None and value.strip().lower() in ("0", "false", "no", ""):
        raise KerasLineError(
            f"{_VAR}={value!r} was set by the caller, but this package needs tf.keras as "
            "Keras 2 (tf-keras) because tensorflow-recommenders refuses Keras 3. "
            f"Unset it or set {_VAR}=1 before importing tfmodels.")
    os.environ[_VAR] = "1"
    # TensorFlow's C++ INFO lines (CUDA probing, CPU features) drown progress output.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow's BFC allocator for CPU tensors instead of malloc: the [B, L, h] tensors
    # of a training step (over 32 MB at L >= 1,000) were mmap'ed and unmapped by glibc on
    # every step, re-faulting their pages (DIN-L, B 256, L 1,000: 5x fewer page faults,
    # ~25% less CPU per step; issue 22 item 6, docs/benchmarks.md). Same numbers
    # computed; TF_CPU_ALLOCATOR_USE_BFC=false restores malloc.
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        # TensorFlow was imported before us: it decided its Keras line already.
        module = tf.keras.layers.Layer.__module__
        if not module.startswith("tf_keras"):
            raise KerasLineError(
                f"TensorFlow was imported before tfmodels without {_VAR}=1, so tf.keras is "
                f"Keras 3 ({module}). Import tfmodels first or export {_VAR}=1.")


def prefer_onednn_for_training() -> bool:
    """Turn on TensorFlow's oneDNN CPU kernels (``TF_ENABLE_ONEDNN_OPTS=1``) for a process
    about to train, unless the caller set the variable or TensorFlow is already loaded
    (it reads the variable once, at import). TensorFlow enables oneDNN by default only on
    some Intel CPUs; on the 2-core AMD machine of docs/benchmarks.md ("Session 8: the
    DIN unit over valid rows only, and oneDNN kernels") the DIN unit's fwd + bwd took
    14% less CPU with it (771 vs 894 ms, 4 interleaved process pairs); whole training
    steps gained less consistently at that machine's load. Training commands call this
    (``lifelong train``, ``compare``, ``bench accuracy``); serving does not (its small
    per-request ops were not measured with oneDNN). Returns whether oneDNN was chosen here.
    """
    if "tensorflow" in sys.modules or "TF_ENABLE_ONEDNN_OPTS" in os.environ:
        return False
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"
    return True
