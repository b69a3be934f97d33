"""Apache Beam jobs: sample building, clustering, user-cache precompute."""
import tfmodels  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
