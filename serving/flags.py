"""Flags of ``lifelong export`` and ``lifelong serve`` (``python -m serving.export`` /
``serving.server``), kept free of TensorFlow and gRPC imports so that
``lifelong <cmd> --help`` answers without loading them. :mod:`serving.export` and
:mod:`serving.server` expose these as their ``add_arguments``.
"""
from __future__ import annotations

import argparse

#: TF Serving's gRPC port
DEFAULT_PORT = 8500
#: `export --rank_buckets` ladders (serving.export.rank_bucket); the first is the default
RANK_BUCKETS = ("fine", "pow2")


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", help="run directory written by `lifelong train` (trained weights)")
    p.add_argument("--model", help="without --run: export an UNTRAINED registered model "
                   "(smoke tests, benchmarks); needs --data for the vocabulary")
    p.add_argument("--data", help="prepared dataset (vocabulary sizes) for --model")
    p.add_argument("--short_len", type=int, default=50, help="S for --model (default 50)")
    p.add_argument("--long_len", type=int, default=1000, help="L for --model (default 1000)")
    p.add_argument("--emb_dim", type=int, default=16, help="embedding size for --model")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed for --model")
    p.add_argument("--base", default="saved_models", help="model base path (default saved_models)")
    p.add_argument("--name", help="served model name (default: the registry name)")
    p.add_argument("--version", help="version number (default: next free)")
    p.add_argument("--config_base", default="/models",
                   help="base_path prefix written to models.config (default /models)")
    p.add_argument("--num_versions", type=int, default=2,
                   help="versions each server keeps loaded (models.config policy; default 2)")
    p.add_argument("--batching_params", help="copy this TF Serving BatchingParameters file into "
                   "the version (batching_params.pbtxt): TF Serving then batches its requests; "
                   "only for serving_default deployments (rank requests cannot be batched)")
    p.add_argument("--warmup_max_candidates", type=int, default=10_000,
                   help="write TF Serving warmup records (assets.extra/"
                   "tf_serving_warmup_requests): one rank request per XLA candidate bucket "
                   "8, 16, ... up to this N, one user_tower, one serving_default; replayed "
                   "by TF Serving and `lifelong serve` before the version is AVAILABLE "
                   "(default 10000, the server's --max_candidates default; 0 = none)")
    p.add_argument("--jit_rank", action="store_true",
                   help="compile the rank signature's computation with XLA (faster ranking; "
                   "TF Serving then needs --xla_cpu_compilation_enabled=true)")
    p.add_argument("--rank_buckets", choices=RANK_BUCKETS, default=RANK_BUCKETS[0],
                   help="with --jit_rank: the candidate counts rank is padded to (one XLA "
                   "compilation each): fine = 8, 16, ..., 64, then 4 steps per octave (80, 96, "
                   "112, 128, 160, ...; 37 up to 10,000); pow2 = 8, 16, 32, ... (12 up to "
                   "10,000; the earlier ladder). Default fine")
    p.add_argument("--jit_user_tower", action="store_true",
                   help="compile the user_tower signature's model part (embeddings, the long "
                   "module's user_cache) with XLA, batch padded to powers of two (faster "
                   "precompute for C-Former; TF Serving then needs "
                   "--xla_cpu_compilation_enabled=true)")


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="saved_models", help="model base path (default saved_models)")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default 127.0.0.1; the server has no TLS/auth)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port (default 8500; 0 = any)")
    p.add_argument("--rest_api_port", type=int, default=0,
                   help="also serve TF Serving's REST API and the Prometheus metrics "
                   "(/monitoring/prometheus/metrics) on this port (default 0 = off, as TF "
                   "Serving; its docs use 8501)")
    p.add_argument("--poll_s", type=float, default=2.0,
                   help="seconds between checks for new versions (default 2; 0 = never)")
    p.add_argument("--num_versions", type=int, default=2,
                   help="versions kept without models.config (default 2)")
    p.add_argument("--max_request_mb", type=float, default=64.0,
                   help="largest request accepted, MiB (default 64)")
    p.add_argument("--max_candidates", type=int, default=10_000,
                   help="most rows (candidates) per request (default 10000)")
    p.add_argument("--max_elements", type=int, default=32_000_000,
                   help="most tensor elements per request (default 32M)")
    p.add_argument("--workers", type=int, default=8, help="request threads (default 8)")
    p.add_argument("--processes", type=int, default=1,
                   help="server processes sharing the gRPC port with SO_REUSEPORT (default 1); "
                   "each has --workers threads and its own copy of the models; the kernel "
                   "spreads client connections, not requests, over them; not with "
                   "--rest_api_port (serving/server_procs.py)")
    p.add_argument("--inter_op", type=int, default=-1,
                   help="TF session inter-op threads, as TF Serving's "
                   "--tensorflow_inter_op_parallelism (default -1: ops run in the request's "
                   "thread, the lowest latency for small ranking graphs; 0 = TF's default)")
    p.add_argument("--intra_op", type=int, default=0,
                   help="TF session intra-op threads (default 0 = one per core)")
