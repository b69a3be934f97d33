"""Lifelong user-behavior CTR prediction: Keras layers and models, schema, input pipeline.

Importing this package sets ``TF_USE_LEGACY_KERAS=1`` before TensorFlow loads
(see :mod:`tfmodels._env`). This package never imports Beam or the gRPC server.
"""
from tfmodels._env import ensure_legacy_keras as _ensure_legacy_keras

_ensure_legacy_keras()

__version__ = "0.1.0"
