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
            "lbcore/balance/p2c.pyx", "lbcore/balance/maglev.pyx"]


def run(*command: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_ruff():
    result = run(sys.executable, "-m", "ruff", "check", "lbcore", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy():
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def python_lines(pyx: Path, html: Path) -> list[tuple[int, str]]:
    """Lines cython -a marks as touching the Python C-API, with the
    top-level definition each belongs to."""
    scored = re.findall(r'<pre class="cython line score-(\d+)"[^>]*>[^<]*<span class="">(\d+)',
                        html.read_text())
    source = pyx.read_text().split("\n")
    owner, owners = "", []
    for line in source:
        if re.match(r"(cdef|cpdef|def)\s", line) and not line.startswith("cdef extern"):
            owner = line
        owners.append(owner)
    return [(int(n), owners[int(n) - 1]) for score, n in scored if int(score) > 0 and int(n) > 1]


@pytest.mark.parametrize("pyx", COMPILED)
def test_hot_path_makes_no_python_calls(pyx, tmp_path):
    """Every line outside Python entry points (``def``) must be pure C: the
    worker loop and the picks never touch a Python object."""
    shutil.copytree(ROOT / "lbcore", tmp_path / "lbcore",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "*.html", "__pycache__"))
    result = run(sys.executable, "-m", "cython", "-a", "-3", "-I", ".", pyx, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    html = tmp_path / pyx.replace(".pyx", ".html")
    # module level (imports, run once) and def entry points may use Python
    offenders = [(n, owner) for n, owner in python_lines(tmp_path / pyx, html)
                 if owner and not owner.startswith("def ")]
    assert offenders == [], offenders
