"""The benchmark's no-model servable: the gRPC floor of ``lifelong bench serving``.

:class:`IdentityServable` decodes a request like any other (the server's request
checks still run) and returns ``ctr`` zeros [N], so timing it measures gRPC plus
(de)serialization and nothing else. It is a benchmark instrument, not part of a
deployment, so it lives here and not in ``serving/`` (which never imports
``lifelong``): this module adds ``--identity`` to :mod:`serving.server`'s flags and
hands the servables to :func:`serving.server.run`. ``lifelong serve`` takes its flags
from here, so ``lifelong serve --identity a,b`` works as before; the benchmark starts
its server process as ``python -m lifelong.bench.identity``.
"""
from __future__ import annotations

import argparse
import sys
from typing import List

import numpy as np

from lifelong.bench import flags as bench_flags
from serving import server
from serving.servable import Servable, SignatureInfo, TensorSpecInfo


class IdentityServable(Servable):
    """No model: decodes the request like any other and returns ``ctr`` zeros [N].

    The floor of gRPC + (de)serialization for the benchmark: N is the first
    dimension of ``target_item_id`` (else of the first input).
    """

    def __init__(self, name: str, version: int = 1):
        self.name, self.version = name, int(version)
        any_sig = SignatureInfo({}, {"ctr": TensorSpecInfo(1, (None,))}, any_inputs=True)
        self.signatures = {"rank": any_sig, "serving_default": any_sig, "user_tower": any_sig}

    def run(self, signature, inputs):
        x = inputs.get("target_item_id")
        if x is None:
            x = next(iter(inputs.values())) if inputs else np.zeros([0])
        n = x.shape[0] if x.ndim else 1
        return {"ctr": np.zeros([n], np.float32)}


def servables(names: str) -> List[IdentityServable]:
    """One :class:`IdentityServable` per name of a comma separated list."""
    return [IdentityServable(n) for n in names.split(",") if n]


# :mod:`serving.server`'s flags, then ``--identity``; defined in the TF-free
# lifelong/bench/flags.py so that `lifelong serve --help` is fast.
add_arguments = bench_flags.add_identity_server_arguments


def run(args) -> int:
    return server.run(args, static=servables(args.identity),
                      static_spec=["lifelong.bench.identity", "servables", args.identity])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m lifelong.bench.identity")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
