"""The source itself: lint, types, and a data path free of Python calls."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPILED = ["lbcore/worker.pyx", "lbcore/balance/wrr.pyx", "lbcore/balance/least_conn.pyx",
            "lbcore/balance/p2c.pyx", "lbcore/balance/maglev.pyx", "lbcore/balance/probe.pyx"]


def run(*command: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


PACKAGES = ("lbcore", "orchestrator", "ctl", "tests", "bench", "mutation")


def test_ruff():
    result = run(sys.executable, "-m", "ruff", "check", *PACKAGES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy():
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def python_lines(pyx: Path, html: Path) -> tuple[int, list[tuple[int, str]]]:
    """(how many lines of the source cython -a scored, the lines it marks as
    touching the Python C-API with the top-level definition each belongs to)."""
    scored = re.findall(r'<pre class="cython line score-(\d+)"[^>]*>[^<]*<span class="">(\d+)',
                        html.read_text())
    source = pyx.read_text().split("\n")
    owner, owners = "", []
    for line in source:
        if re.match(r"(cdef|cpdef|def)\s", line) and not line.startswith("cdef extern"):
            owner = line
        owners.append(owner)
    return len(scored), [(int(n), owners[int(n) - 1]) for score, n in scored if int(score) > 0 and int(n) > 1]


@pytest.mark.parametrize("pyx", COMPILED)
def test_hot_path_makes_no_python_calls(pyx, tmp_path):
    """Every line outside Python entry points (``def``) must be pure C: the
    worker loop and the picks never touch a Python object."""
    shutil.copytree(ROOT / "lbcore", tmp_path / "lbcore",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "*.html", "__pycache__"))
    result = run(sys.executable, "-m", "cython", "-a", "-3", "-I", ".", pyx, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    html = tmp_path / pyx.replace(".pyx", ".html")
    scored, lines = python_lines(tmp_path / pyx, html)
    # a report this pattern no longer reads would score nothing and find no
    # offender: it must have scored (nearly) every line of the source
    source_lines = len((tmp_path / pyx).read_text().split("\n"))
    assert scored >= 0.9 * source_lines, f"cython -a scored {scored} of {source_lines} lines"
    # module level (imports, run once) and def entry points may use Python
    offenders = [(n, owner) for n, owner in lines if owner and not owner.startswith("def ")]
    assert offenders == [], offenders


def test_inline_helpers_make_no_python_calls(tmp_path):
    """The cdef inline helpers of the .pxd files (the pick dispatch and what
    the algorithms share) are compiled into each module that uses them, and
    cython -a annotates only the .pyx: check their C in the worker's module.
    Directives of a .pyx (cdivision) do not reach them: a '%' compiled
    without cdivision takes the GIL to raise ZeroDivisionError."""
    shutil.copytree(ROOT / "lbcore", tmp_path / "lbcore",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "*.html", "__pycache__"))
    result = run(sys.executable, "-m", "cython", "-3", "-I", ".", "lbcore/worker.pyx", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    c = (tmp_path / "lbcore/worker.c").read_text()
    bodies = dict(re.findall(r"^static CYTHON_INLINE [^\n]*?__pyx_f_6lbcore_7balance_\w+?_(\w+)\([^)]*\) \{\n"
                             r"(.*?)^\}\n", c, re.S | re.M))
    declared = set()
    for pxd in (ROOT / "lbcore/balance").glob("*.pxd"):
        declared |= set(re.findall(r"^cdef inline \w+ \*?(\w+)\(", pxd.read_text(), re.M))
    assert declared >= {"pick_backend", "scan_for_any"}
    assert declared <= set(bodies), f"not found in the C: {declared - set(bodies)}"
    offenders = {name: sorted(set(re.findall(r"\b(?:Py\w+|__Pyx_\w+)", bodies[name]))) for name in declared}
    assert {name: refs for name, refs in offenders.items() if refs} == {}
