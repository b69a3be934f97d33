"""The four floors of ../shared/DESIGN.md ("Which part may know which"), held by tests.

* ``tfmodels/`` imports neither Beam, gRPC, ``beam_jobs``, ``serving`` nor the
  application ``lifelong``;
* ``beam_jobs/`` and ``serving/`` import ``tfmodels`` and not each other, nor ``lifelong``;
* ``lifelong/`` (the application on top) may import everything.

Checked twice: statically (every ``import`` / ``from`` statement of every file,
function-level imports included, walked with :mod:`ast`), and at run time (a fresh
interpreter that imports every module of ``tfmodels`` has no ``apache_beam`` or
``grpc`` in ``sys.modules``). The checker itself is tested on a planted violation,
so a rule that silently stopped matching would fail here too.
"""
import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: package -> top-level modules it must never import
FORBIDDEN = {
    "tfmodels": ("apache_beam", "grpc", "beam_jobs", "serving", "lifelong"),
    "beam_jobs": ("serving", "lifelong", "grpc"),
    "serving": ("beam_jobs", "lifelong", "apache_beam"),
}


def imported_modules(path: pathlib.Path):
    """``(line, dotted module)`` of every import statement in one file (absolute
    imports; relative imports resolve inside the file's own package, which is allowed)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def violations(root: pathlib.Path, rules=FORBIDDEN):
    """Every import across the floors under ``root``: ``"file:line imports module"``."""
    out = []
    for package, forbidden in rules.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, module in imported_modules(path):
                top = module.split(".")[0]
                if top in forbidden:
                    out.append(f"{path.relative_to(root)}:{line} imports {module}")
    return out


def test_no_import_crosses_the_floors():
    found = violations(ROOT)
    assert not found, "imports across the floors (shared/DESIGN.md):\n" + "\n".join(found)


def test_the_checker_catches_a_planted_violation(tmp_path):
    """The static check can fail: one forbidden import per rule, at module level and
    inside a function, each reported with its file and line."""
    for package, forbidden in FORBIDDEN.items():
        (tmp_path / package).mkdir()
        (tmp_path / package / "ok.py").write_text("import os\nfrom . import sibling\n")
        (tmp_path / package / "bad.py").write_text(
            f"import numpy\nimport {forbidden[0]}\n\ndef f():\n"
            f"    from {forbidden[-1]}.x import y\n")
    found = violations(tmp_path)
    expected = []
    for package, forbidden in FORBIDDEN.items():
        expected += [f"{package}/bad.py:2 imports {forbidden[0]}",
                     f"{package}/bad.py:5 imports {forbidden[-1]}.x"]
    assert sorted(found) == sorted(expected)


def test_importing_every_tfmodels_module_loads_no_beam_and_no_grpc():
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).replace(".__init__", "")
        for p in (ROOT / "tfmodels").rglob("*.py"))
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('apache_beam', 'grpc', 'beam_jobs', 'serving', 'lifelong'))\n"
            "print(len(" + repr(modules) + "), bad)\n"
            "sys.exit(1 if bad else 0)\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert res.stdout.strip().endswith("[]")


@pytest.mark.parametrize("package", ["beam_jobs", "serving"])
def test_side_floors_do_not_import_each_other_at_run_time(package):
    """Importing every module of one side floor leaves the other side out."""
    other = "serving" if package == "beam_jobs" else "beam_jobs"
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).replace(".__init__", "")
        for p in (ROOT / package).rglob("*.py"))
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in ({other!r}, 'lifelong'))\n"
            "print(bad)\nsys.exit(1 if bad else 0)\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
