"""How busy the rest of the machine was while a benchmark measured something.

A latency measured while other processes compete for the CPUs is slower by an amount
that has nothing to do with the code measured (on this 2-core machine a training run
beside the bench made a 1.5 ms ``rank`` read 21 ms). The 1-minute load average lags by
about a minute, so it blames a measurement for the job that ran before it; this reads
the kernel's CPU counters over the measurement window instead: the machine's busy time
minus the time of the processes taking part in the measurement (this process and, e.g.,
its server), as a share of all CPUs' time.

Linux only (``/proc``); elsewhere :meth:`OthersCpu.stop` returns ``None``. Hand-written
instead of psutil, which is not a dependency of the package, for three counters.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Tuple

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_ticks() -> Optional[Tuple[int, int]]:
    """(busy, total) clock ticks over all CPUs since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is
    # already inside user / nice
    total = sum(fields[:8])
    return total - fields[3] - fields[4], total


def _process_ticks(pid: int) -> Optional[int]:
    """utime + stime of a process in clock ticks (its threads included), None if gone."""
    if pid == os.getpid():
        t = os.times()
        return int(round((t.user + t.system) * _TICK))
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()   # after "pid (comm) "
    return int(fields[11]) + int(fields[12])     # fields 14, 15 of proc(5)


class OthersCpu:
    """``start()``, measure, ``stop()`` -> the share (0..1) of all CPUs' time that
    processes other than ``pids`` (default: this one) used in between, or None where
    /proc is not readable."""

    def __init__(self, pids: Iterable[int] = ()):
        self.pids = [os.getpid(), *[p for p in pids if p != os.getpid()]]
        self._start = None

    def _read(self):
        machine = _machine_ticks()
        procs = [_process_ticks(p) for p in self.pids]
        return None if machine is None or None in procs else (machine, sum(procs))

    def start(self) -> "OthersCpu":
        self._start = self._read()
        return self

    def stop(self) -> Optional[float]:
        end = self._read()
        if self._start is None or end is None:
            return None
        (busy0, total0), own0 = self._start
        (busy1, total1), own1 = end
        if total1 <= total0:
            return None
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / (total1 - total0)
