"""Imports go one way: ctl -> orchestrator -> lbcore, never back (see
ARCHITECTURE.md). lbctl speaks to the control plane through its admin API
(orchestrator.control) and reads config files through its settings API
(orchestrator.settings); the data plane imports nothing of either, and
starts an embedded control plane as a process, not as an import."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lbcore", "orchestrator", "ctl")
# package -> packages it must not import
FORBIDDEN = {"lbcore": {"orchestrator", "ctl"}, "orchestrator": {"ctl"}, "ctl": {"lbcore"}}
# the only modules of another package that ctl may import
CTL_MAY_IMPORT = {"orchestrator.control", "orchestrator.settings"}

# import x / from x import / cimport x / from x cimport, at any indent
# (a function's local import counts), with what follows on the line
_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+c?import\s+(.*)|c?import\s+([\w., ]+))", re.M)


def imports(path: Path) -> set[str]:
    """The modules a .py, .pyx or .pxd file imports (``from a import b``
    counts as ``a`` and ``a.b``: b may be a module)."""
    found: set[str] = set()
    for module, names, plain in _IMPORT.findall(path.read_text()):
        if module:
            found.add(module)
            found |= {f"{module}.{n}" for n in re.findall(r"\w+", names.split("#")[0])}
        else:
            found |= {m.split(" as ")[0].strip() for m in plain.split(",") if m.strip()}
    return found


def violations(root: Path) -> list[str]:
    wrong = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if path.suffix not in (".py", ".pyx", ".pxd") or "build" in path.parts:
                continue
            where = path.relative_to(root)
            for module in sorted(imports(path)):
                top = module.split(".")[0]
                if top in FORBIDDEN[package]:
                    wrong.append(f"{where}: imports {module}")
                elif package == "ctl" and top == "orchestrator" and module != "orchestrator" \
                        and not any(module == m or module.startswith(m + ".") for m in CTL_MAY_IMPORT) \
                        and not any(m.startswith(module + ".") for m in CTL_MAY_IMPORT):
                    allowed = ", ".join(sorted(CTL_MAY_IMPORT))
                    wrong.append(f"{where}: imports {module} (ctl may import {allowed})")
    return wrong


def test_imports_go_one_way():
    assert violations(ROOT) == []


def test_the_scan_sees_imports_of_every_kind():
    """Not vacuous: the scan finds the imports the packages really make."""
    assert "lbcore.wire" in imports(ROOT / "orchestrator/server.py")
    assert "orchestrator.control" in imports(ROOT / "ctl/lbctl.py")
    assert "lbcore.balance.pick" in imports(ROOT / "lbcore/worker.pyx")  # a cimport
    assert "lbcore.balance.context" in imports(ROOT / "lbcore/balance/wrr.pxd")


def test_a_wrong_way_import_is_found(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "lbcore/agent.py").write_text("def f():\n    from orchestrator.store import SqliteStore\n")
    (tmp_path / "lbcore/worker.pyx").write_text("from ctl cimport lbctl\n")
    (tmp_path / "orchestrator/server.py").write_text("import ctl.lbctl as lbctl\n")
    (tmp_path / "ctl/lbctl.py").write_text("from lbcore.config import load_config\n"
                                           "from orchestrator import server\n")
    assert sorted(violations(tmp_path)) == [
        "ctl/lbctl.py: imports lbcore.config",
        "ctl/lbctl.py: imports lbcore.config.load_config",
        "ctl/lbctl.py: imports orchestrator.server "
        "(ctl may import orchestrator.control, orchestrator.settings)",
        "lbcore/agent.py: imports orchestrator.store",
        "lbcore/agent.py: imports orchestrator.store.SqliteStore",
        "lbcore/worker.pyx: imports ctl",
        "lbcore/worker.pyx: imports ctl.lbctl",
        "orchestrator/server.py: imports ctl.lbctl",
    ]


def test_every_path_architecture_names_exists():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:lbcore|orchestrator|ctl|tests|bench)/[\w./]+)`", text))
    # a bare test file name in a list after a path stands for one in the same folder
    named |= {f"tests/orchestrator/{n}" for n in re.findall(r"`(test_\w+\.py)`", text)}
    assert len(named) > 30
    assert sorted(p for p in named if not (ROOT / p).exists()) == []
    modules = {str(p.relative_to(ROOT)) for package in PACKAGES for p in (ROOT / package).rglob("*")
               if p.suffix in (".py", ".pyx", ".pxd") and p.name != "__init__.py" and "build" not in p.parts}
    unmapped = sorted(m for m in modules if m not in named and Path(m).name not in text)
    assert unmapped == [], "modules ARCHITECTURE.md does not mention"


def test_lbctl_loads_neither_numpy_nor_the_store():
    """Every lbctl command starts a Python: it imports the admin and settings
    APIs, not the data plane's numpy views nor the control plane's store."""
    probe = ("import sys, ctl.lbctl; "
             "print(sorted(m for m in ('numpy', 'orchestrator.store', 'zmq') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['zmq']"
