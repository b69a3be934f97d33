"""Flags of ``lifelong bench`` and their parsing (kept free of TensorFlow imports, so
``lifelong bench --help`` answers fast).

``storage`` / ``train`` (:func:`add_arguments`) time a prepared dataset;
``serving`` / ``precompute`` (:func:`add_serving_arguments`) time exports of
untrained models on synthetic users; :func:`add_identity_server_arguments` are the
flags of the server those benchmarks start (``lifelong serve`` takes them too).
"""
from __future__ import annotations

import argparse
from typing import List

from serving import flags as serving_flags
from tfmodels.errors import UsageError

#: `lifelong bench serving|precompute` take :func:`add_serving_arguments`
SERVING_BENCHES = ("serving", "precompute")


def parse_ints(text: str, flag: str) -> List[int]:
    """``"100,1000"`` -> ``[100, 1000]``; anything else is a :class:`UsageError` naming
    the flag (the CLI prints it as one line)."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--{flag} must be comma separated integers, got {text!r}") from None
    if not values:
        raise UsageError(f"--{flag} is empty")
    return values


def parse_rank_buckets(text: str) -> List[str]:
    """``bench serving --rank_buckets``: comma separated ladders of ``lifelong export
    --rank_buckets`` (:data:`serving.flags.RANK_BUCKETS`), each once."""
    values = [x.strip() for x in str(text).split(",") if x.strip()]
    bad = [x for x in values if x not in serving_flags.RANK_BUCKETS]
    if bad or not values or len(set(values)) < len(values):
        raise UsageError(f"--rank_buckets must be distinct ladders of "
                         f"{','.join(serving_flags.RANK_BUCKETS)}, got {text!r}")
    return values


def check_serving_flags(args) -> None:
    """Parse the list flags of ``bench serving|precompute`` up front, so a typo is one
    line (:class:`UsageError`) before any folder is created or model exported."""
    for flag in ("long_lens", "candidates", "din_hidden", "mlp_hidden"):
        parse_ints(getattr(args, flag), flag)
    parse_rank_buckets(getattr(args, "rank_buckets", serving_flags.RANK_BUCKETS[0]))
    load = getattr(args, "load", "")
    if load:
        check_load_flags(args)


def check_load_flags(args) -> None:
    """``bench serving --load ...``: every load flag checked before anything runs."""
    modes = [m for m in str(args.load).split(",") if m]
    bad = sorted(set(modes) - {"closed", "open"})
    if bad or not modes:
        raise UsageError(f"--load must be closed, open or closed,open; got {args.load!r}")
    if getattr(args, "what", "serving") != "serving":
        raise UsageError("--load is a flag of `lifelong bench serving` only")
    if any(t < 1 for t in parse_ints(args.load_threads, "load_threads")):
        raise UsageError(f"--load_threads must all be >= 1, got {args.load_threads!r}")
    if any(p < 1 for p in parse_ints(args.processes, "processes")):
        raise UsageError(f"--processes must all be >= 1, got {args.processes!r}")
    if "open" in modes and not args.rate > 0:
        raise UsageError(f"--load open needs --rate > 0 (requests/s), got {args.rate}")
    for flag in ("load_seconds", "load_rounds", "load_candidates", "load_long_len",
                 "load_open_threads",
                 "server_workers", "users"):
        if not getattr(args, flag) > 0:
            raise UsageError(f"--{flag} must be > 0, got {getattr(args, flag)}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``lifelong bench storage|train``."""
    p.add_argument("what", choices=["storage", "train"], help="which benchmark")
    p.add_argument("--data", required=False, help="prepared dataset directory")
    p.add_argument("--long_lens", default="100,10000",
                   help="comma separated L values (storage default 100,10000; "
                   "train e.g. 500,1000,2000)")
    p.add_argument("--models", default="din_l", help="train: comma separated models")
    p.add_argument("--steps", type=int, default=20, help="train: timed steps per L")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--short_len", type=int, default=50)
    p.add_argument("--emb_dim", type=int, default=16)
    p.add_argument("--paths", default="new",
                   help="train: comma separated training paths: today (before issue 22 "
                   "item 6), new, new_xla, today_bfc, new_rows, new_s8 (new in session 8), "
                   "new_folded (new before session 8) (default new; 'today,new' = "
                   "before/after)")
    p.add_argument("--input", default="materialised",
                   help="train: materialised (held batches: the model's time) | pipeline | "
                   "both (times the live input pipeline too: the input share of a step)")
    p.add_argument("--jit_compile", default="auto",
                   help="train: XLA for the 'new' path: auto (default; = off) | on | off")
    p.add_argument("--warmup", type=int, default=1, help="train: untimed steps (trace)")
    p.add_argument("--shuffle_buffer", type=int, default=20000,
                   help="train: the pipeline's shuffle buffer (default 20000, TrainConfig's)")
    p.add_argument("--split", default="test", help="storage: which split")
    p.add_argument("--record_formats", action="store_true",
                   help="storage: compare the full and compact (v1, v2) per-user record formats on the "
                   "train split (bytes per behavior, training examples/s of --models' first "
                   "model) instead of the materialised windows")
    p.add_argument("--format_long_len", type=int, default=1000,
                   help="storage --record_formats: L of the training cells (default 1000)")
    p.add_argument("--format_repeats", type=int, default=2,
                   help="storage --record_formats: training cells per format, ABBA order "
                   "(default 2; 0 = bytes only)")
    p.add_argument("--format_input_batches", type=int, default=20,
                   help="storage --record_formats: batches of the input pipeline alone timed "
                   "per format and repeat (default 20; 0 = skip)")
    p.add_argument("--format_input_repeats", type=int, default=None,
                   help="storage --record_formats: input-pipeline cells per format, ABBA "
                   "order (default: --format_repeats, at least 1)")
    p.add_argument("--format_ts_step", type=int, default=0,
                   help="storage --record_formats: also write compact v2 with history "
                   "timestamps rounded to this many seconds (lossy; default 0 = no such copy)")
    p.add_argument("--out", help="write results JSON (and a PNG for train) with this prefix")


def add_serving_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``lifelong bench serving|precompute``."""
    p.add_argument("what", choices=list(SERVING_BENCHES), help="which benchmark")
    p.add_argument("--long_lens", default="100,1000,10000", help="L values (default 100,1000,10000)")
    p.add_argument("--candidates", default="1,100,1000", help="N values (default 1,100,1000)")
    p.add_argument("--rank_models", default="",
                   help="serving: models whose `rank` is timed, or `all` (default: all = every "
                   "registered method with a user cache, named variants left out; with "
                   "--load: avg_pool)")
    p.add_argument("--one_shot_model", default="din_l",
                   help="serving: model whose serving_default is timed (default din_l)")
    p.add_argument("--models", default="",
                   help="precompute: comma separated models (default: every cacheable "
                   "registered model, as bench serving's `all`)")
    p.add_argument("--short_len", type=int, default=50, help="S (default 50)")
    p.add_argument("--emb_dim", type=int, default=8, help="embedding size per field (default 8)")
    p.add_argument("--din_hidden", default="16,8", help="DIN attention MLP (default 16,8)")
    p.add_argument("--mlp_hidden", default="32,16", help="head MLP (default 32,16)")
    p.add_argument("--users", type=int, default=8, help="serving: users cycled through (default 8)")
    p.add_argument("--requests", type=int, default=300,
                   help="serving: sequential requests per configuration (default 300)")
    p.add_argument("--rounds", type=int, default=6,
                   help="serving: interleaved rounds the requests are split into (default 6)")
    p.add_argument("--seconds", type=float, default=1.0,
                   help="serving: throughput window per configuration (default 1.0)")
    p.add_argument("--threads", type=int, default=4, help="serving: client threads (default 4)")
    p.add_argument("--one_shot_budget_s", type=float, default=10.0,
                   help="serving: time budget per one-shot configuration (default 10)")
    p.add_argument("--precompute_users", type=int, default=1000,
                   help="precompute: users (default 1000)")
    p.add_argument("--precompute_long_len", type=int, default=1000,
                   help="precompute: L (default 1000)")
    p.add_argument("--precompute_engines", default="",
                   help="precompute: engines timed, comma separated, of runinference,batched "
                   "(default both; with --incremental: batched)")
    p.add_argument("--precompute_batch_size", type=int, default=64,
                   help="precompute: the batched engine's users per user_tower call (default 64)")
    p.add_argument("--precompute_xla", default="off", choices=("off", "on", "both"),
                   help="precompute: export user_tower with XLA (serving.export "
                   "jit_user_tower): off (default), on, or both (rows for each, one run)")
    p.add_argument("--incremental", action="store_true",
                   help="precompute: time an incremental refresh (--previous_cache) at each "
                   "--changed share of users next to a full refresh, start-up excluded "
                   "(default --models: cformer)")
    p.add_argument("--changed", default="0.01,0.1,1.0",
                   help="precompute --incremental: shares of users whose history changed "
                   "(default 0.01,0.1,1.0)")
    p.add_argument("--incremental_modes", default="fingerprint",
                   help="precompute --incremental: refresh modes timed, comma separated, of "
                   "fingerprint (--records: every user's new record, changed users found by "
                   "their history fingerprint) and delta (--changed_records: the changed "
                   "users' records only, written by the bench) (default fingerprint)")
    p.add_argument("--no_jit_rank", dest="jit_rank", action="store_false",
                   help="serving: export rank WITHOUT XLA (default: `lifelong export --jit_rank`, "
                   "the recommended ranking deployment)")
    p.add_argument("--rank_buckets", default=serving_flags.RANK_BUCKETS[0],
                   help="serving: the exports' `lifelong export --rank_buckets` ladder, or "
                   "several comma separated (fine,pow2): each --rank_models model is then "
                   "exported once per ladder and timed as MODEL.LADDER, interleaved in the "
                   "same server, each against its own identity SavedModel (default fine)")
    p.add_argument("--inter_op", type=int, default=-1,
                   help="serving: the server's --inter_op (default -1, its default)")
    p.add_argument("--intra_op", type=int, default=0,
                   help="serving: the server's --intra_op (default 0, its default)")
    p.add_argument("--load", default="",
                   help="serving: throughput under concurrent load instead of the latency "
                   "table: closed (--load_threads client threads back to back), open "
                   "(--rate requests/s on schedule) or closed,open; rank at "
                   "--load_candidates next to its identity SavedModel on the same server "
                   "(lifelong/bench/serving_load.py)")
    p.add_argument("--load_threads", default="1,4,8,16",
                   help="serving --load closed: client thread counts (default 1,4,8,16)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="serving --load open: offered requests/s (required there)")
    p.add_argument("--load_open_threads", type=int, default=32,
                   help="serving --load open: most requests in flight (default 32)")
    p.add_argument("--load_seconds", type=float, default=2.0,
                   help="serving --load: seconds per row and round (default 2)")
    p.add_argument("--load_rounds", type=int, default=3,
                   help="serving --load: rounds; rank and identity alternate in each, the "
                   "table shows medians and the paired rank / identity ratio (default 3)")
    p.add_argument("--load_candidates", type=int, default=100,
                   help="serving --load: candidates N per rank request (default 100)")
    p.add_argument("--load_long_len", type=int, default=1000,
                   help="serving --load: long length L of the exports (default 1000)")
    p.add_argument("--processes", default="1",
                   help="serving --load: the server's --processes (SO_REUSEPORT processes); "
                   "a list such as 1,2 measures each in turn (default 1)")
    p.add_argument("--server_workers", type=int, default=8,
                   help="serving --load: the server's --workers threads per process (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default artifacts/bench-<what>-<time>)")


def add_identity_server_arguments(p: argparse.ArgumentParser) -> None:
    """:mod:`serving.server`'s flags, then ``--identity`` (:mod:`lifelong.bench.identity`)."""
    serving_flags.add_server_arguments(p)
    p.add_argument("--identity", default="",
                   help="comma separated names of no-model servables returning zeros "
                        "(the gRPC floor for `lifelong bench serving`)")
