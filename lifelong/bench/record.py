"""What a benchmark records besides its table: the command line that produced it and
its results file.

* ``storage`` / ``train`` (:func:`write_prefixed`): ``<--out>.json`` with the command
  line and the results (the caller adds its PNG);
* ``serving`` / ``precompute`` (:func:`run_in_folder`): a results folder
  (``--out``, default ``artifacts/bench-<what>-<time>``) with ``results.json``
  holding the results, the command line, the CPU count and the machine load before
  and after (ratios from one run are what to compare on a shared machine).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from typing import Callable, Dict, List


def command_line() -> str:
    """``lifelong bench <what> ...`` as typed (``sys.argv`` after ``lifelong bench``)."""
    return "lifelong bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])


def write_prefixed(out: str, command: str, results: List[Dict]) -> None:
    """``<out>.json``: the command line and the results."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump({"command": command, "results": results}, f, indent=2)


def run_in_folder(args, measure: Callable[[object], Dict],
                  show: Callable[[Dict, str], None]) -> int:
    """Create ``args.out``, run ``measure(args)``, write ``results.json`` (results +
    command + machine load), then ``show(results, command)`` and one summary line."""
    command = command_line()
    args.out = args.out or os.path.join("artifacts",
                                        f"bench-{args.what}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(args.out, exist_ok=True)
    env = {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    t0 = time.perf_counter()
    res = measure(args)
    env.update(loadavg_end=os.getloadavg(), wall_s=time.perf_counter() - t0)
    res.update(command=command, env=env)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=2, default=str)
    show(res, command)
    print(f"results: {os.path.join(args.out, 'results.json')} (wall {env['wall_s']:.0f}s, load "
          f"{env['loadavg_start'][0]:.1f} -> {env['loadavg_end'][0]:.1f})")
    return 0
