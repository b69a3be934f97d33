"""lifelong.bench.machine_load: the CPU share other processes used during a window."""
import subprocess
import sys
import time

import pytest

from lifelong.bench import machine_load as ML

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_a_spinning_process_counts_as_other_unless_it_takes_part():
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.3)                               # past its start-up
        others = ML.OthersCpu().start()               # the child is "another process"
        taking_part = ML.OthersCpu([child.pid]).start()
        ticks0 = ML._process_ticks(child.pid)
        time.sleep(1.0)
        ticks1 = ML._process_ticks(child.pid)
        share_others, share_rest = others.stop(), taking_part.stop()
    finally:
        child.kill()
        child.wait()
    # the child spun on (up to) one CPU for the whole second: its time is the difference
    assert ticks1 - ticks0 >= 0.3 * ML._TICK
    assert share_others - share_rest > 0.15 / max(1, ML.os.cpu_count() // 2)


def test_no_proc_means_no_figure(monkeypatch):
    monkeypatch.setattr(ML, "_machine_ticks", lambda: None)
    assert ML.OthersCpu().start().stop() is None
    assert ML._process_ticks(2 ** 22 + 12345) is None   # no such process
