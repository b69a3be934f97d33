"""Serving path: split-signature SavedModels, user-cache store, gRPC server and client.

* :mod:`serving.export` -- ``user_tower`` / ``rank`` / ``serving_default`` SavedModels in
  TensorFlow Serving's layout, plus ``models.config``;
* :mod:`serving.cache_store` -- per-user cache entries in SQLite (default) or Redis;
* :mod:`serving.server` -- a local server speaking TF Serving's gRPC API
  (PredictionService Predict / GetModelMetadata, ModelService GetModelStatus), built
  from :mod:`serving.servable`, :mod:`serving.model_manager`, :mod:`serving.validation`,
  :mod:`serving.services`, :mod:`serving.errors` and :mod:`serving.paths`, with
  :mod:`serving.rest` (TF Serving's REST API, ``--rest_api_port``) and
  :mod:`serving.metrics` (Prometheus metrics of the server and the client);
* :mod:`serving.client` -- the thin ranking client (no TensorFlow on its import path);
* :mod:`serving.flags` -- the flags of ``lifelong export`` / ``serve`` (no TensorFlow);
* ``serving/tf_serving.sh`` -- the production command (the real ``tensorflow/serving`` image).

See ``docs/serving.md``. Importing this package imports nothing heavy.
"""
