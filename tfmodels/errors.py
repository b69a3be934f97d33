"""The package's one error base class for user-facing problems.

:class:`LifelongError` marks an error the *user* can fix: a bad flag, a missing or
unusable input file, a configuration that cannot work. The ``lifelong`` CLI
(:func:`lifelong.cli.main`) prints such an error as one line
``lifelong <cmd>: error: <reason>`` and exits 2; every other exception is a bug
and keeps its traceback (exit 1). ``lifelong --debug <cmd> ...`` shows the
traceback of a :class:`LifelongError` too.

Every module's own error class derives from it *and* from the builtin it has
always been (``ConfigError`` is still a ``ValueError``, ``UnknownModelError`` a
``KeyError``), so code and tests that catch the builtin keep working::

    class PrepareError(ValueError, LifelongError): ...

Import-free (no TensorFlow, no Beam): :mod:`tfmodels._env` and the CLI import it
before anything heavy.
"""
from __future__ import annotations


class LifelongError(Exception):
    """A problem the user can fix (bad argument, missing or unusable input).

    The CLI reports it as one line and exit code 2; anything that is not a
    ``LifelongError`` is treated as a bug and shows its traceback.
    """


class UsageError(ValueError, LifelongError):
    """A bad flag value or an input that cannot be used, raised by modules that have
    no error class of their own (e.g. :mod:`lifelong.compare`)."""


class MissingInputError(FileNotFoundError, LifelongError):
    """A path given by the user does not exist (still a ``FileNotFoundError``)."""
