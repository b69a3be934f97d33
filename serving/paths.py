"""Path containment for the model base folder, shared by the exporter (what it writes)
and the server's model manager (what it loads)."""
from __future__ import annotations

import os


def inside(base: str, path: str) -> bool:
    """True when ``path`` resolves (symlinks followed) strictly below ``base``.

    The base itself does not count: a model or version folder that resolves to the
    base is rejected like one outside it. The comparison is on whole path components,
    so ``/a/bc`` is not inside ``/a/b``.
    """
    b, p = os.path.realpath(base), os.path.realpath(path)
    return p.startswith(b + os.sep)
