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


def check_serving_flags(args) -> None:
    """Parse the list flags of ``bench serving|precompute`` up front, so a typo is one
    line (:class:`UsageError`) before any folder is created or model exported."""
    for flag in ("long_lens", "candidates", "din_hidden", "mlp_hidden"):
        parse_ints(getattr(args, flag), flag)


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
    p.add_argument("--split", default="test", help="storage: which split")
    p.add_argument("--out", help="write results JSON (and a PNG for train) with this prefix")


def add_serving_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``lifelong bench serving|precompute``."""
    p.add_argument("what", choices=list(SERVING_BENCHES), help="which benchmark")
    p.add_argument("--long_lens", default="100,1000,10000", help="L values (default 100,1000,10000)")
    p.add_argument("--candidates", default="1,100,1000", help="N values (default 1,100,1000)")
    p.add_argument("--rank_models", default="avg_pool",
                   help="serving: models whose `rank` is timed (default avg_pool)")
    p.add_argument("--one_shot_model", default="din_l",
                   help="serving: model whose serving_default is timed (default din_l)")
    p.add_argument("--models", default="",
                   help="precompute: comma separated models (default: every registered model)")
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
    p.add_argument("--no_jit_rank", dest="jit_rank", action="store_false",
                   help="serving: export rank WITHOUT XLA (default: `lifelong export --jit_rank`, "
                   "the recommended ranking deployment)")
    p.add_argument("--inter_op", type=int, default=-1,
                   help="serving: the server's --inter_op (default -1, its default)")
    p.add_argument("--intra_op", type=int, default=0,
                   help="serving: the server's --intra_op (default 0, its default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default artifacts/bench-<what>-<time>)")


def add_identity_server_arguments(p: argparse.ArgumentParser) -> None:
    """:mod:`serving.server`'s flags, then ``--identity`` (:mod:`lifelong.bench.identity`)."""
    serving_flags.add_server_arguments(p)
    p.add_argument("--identity", default="",
                   help="comma separated names of no-model servables returning zeros "
                        "(the gRPC floor for `lifelong bench serving`)")
