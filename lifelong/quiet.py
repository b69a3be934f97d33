"""TensorFlow's C++ start-up lines, silenced by default in the ``lifelong`` CLI.

Importing TensorFlow on a machine without a GPU prints lines that look like errors
but are not: ``WARNING: All log messages before absl::InitializeLog() is called are
written to STDERR``, ``Could not find cuda drivers on your machine`` (twice),
``failed call to cuInit ... (303)``, oneDNN and CPU-feature notices. Two kinds:

* lines that go through TensorFlow's log filter (cuInit, oneDNN, CPU features):
  ``TF_CPP_MIN_LOG_LEVEL=3`` hides them;
* lines absl writes straight to file descriptor 2 while TensorFlow's shared
  libraries load, before any filter exists (the absl warning, the CUDA-driver
  probe): no environment variable reaches them, so the import of ``tensorflow``
  runs with fd 2 pointed at /dev/null (:class:`_QuietImport`). A Python exception
  raised by that import still reaches the user: it propagates after fd 2 is back.

:func:`configure` is called by the CLI entry point before anything loads
TensorFlow. ``lifelong --verbose ...`` shows everything (``TF_CPP_MIN_LOG_LEVEL=0``).
A ``TF_CPP_MIN_LOG_LEVEL`` the user set is never overridden, and with it set the
import is not silenced either (the user chose what to see).

Imports nothing heavy, and is imported first by :mod:`lifelong.cli` so that
:data:`USER_LOG_LEVEL` is the user's value, not the default
:mod:`tfmodels._env` sets.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import sys
from typing import Optional

_VAR = "TF_CPP_MIN_LOG_LEVEL"
#: the value the user gave (None: unset), read before ``tfmodels`` sets its default
USER_LOG_LEVEL: Optional[str] = os.environ.get(_VAR)


@contextlib.contextmanager
def stderr_fd_silenced():
    """Point file descriptor 2 at /dev/null for the block (C/C++ writes included)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` once and runs its module code with fd 2 silenced."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)                # one use; the real finders do the work
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def quiet_exec(module):
            with stderr_fd_silenced():
                exec_module(module)
        spec.loader.exec_module = quiet_exec      # this spec's loader instance only
        return spec


def configure(verbose: bool) -> None:
    """Silence TensorFlow's start-up lines (``verbose`` False) or show them all."""
    if USER_LOG_LEVEL is not None:
        os.environ[_VAR] = USER_LOG_LEVEL         # undo tfmodels' default, keep the user's
        return
    os.environ[_VAR] = "0" if verbose else "3"
    if not verbose and "tensorflow" not in sys.modules and \
            not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())
