"""The application floor (named after the ``lifelong`` console command).

Everything that orchestrates several parts lives here: the CLI, ``compare``,
``replay``, the benchmarks and the method reports. It may import every floor
below (``tfmodels``, ``beam_jobs``, ``serving``); nothing below imports it
(docs/architecture.md, tests/test_layering.py).
"""
