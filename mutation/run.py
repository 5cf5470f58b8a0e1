"""The mutation check: does the suite catch each bug of mutants.toml?

    python3 mutation/run.py                  # every mutant (about 10-15 minutes)
    python3 mutation/run.py NAME [NAME ...]  # some

For each mutant, in a scratch copy of this working tree (compiled modules
included, so only what a mutant touches is compiled again): apply its edits
(each text must occur exactly once), rebuild the Cython modules if a .pyx,
.pxd or .h changed, run its tests, and say CAUGHT (a test failed), MISSED
(all passed) or, for a mutant marked equivalent, EQUIVALENT (all passed, as
it must). The table and totals are printed and written to
mutation/RESULTS.md. Not part of the test suite: it takes minutes.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "mutation" / "mutants.toml"
RESULTS = ROOT / "mutation" / "RESULTS.md"
IGNORE = shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".mypy_cache",
                                ".ruff_cache", ".hypothesis", ".benchmarks", "results", "*.html")
COMPILED = (".pyx", ".pxd", ".h")
TEST_TIMEOUT_S = 900


def apply(scratch: Path, edits: list[dict[str, str]]) -> bool:
    """Apply every edit; True if one touched compiled code."""
    compiled = False
    for edit in edits:
        path = scratch / edit["file"]
        text = path.read_text()
        if text.count(edit["find"]) != 1:
            raise ValueError(f"{edit['file']}: the text to replace occurs {text.count(edit['find'])} times")
        path.write_text(text.replace(edit["find"], edit["replace"]))
        compiled |= path.suffix in COMPILED
    return compiled


def pytest_args(tests: list[str]) -> list[str]:
    args: list[str] = []
    for test in tests:
        path, _, keyword = test.partition("::-k ")
        args += [path, "-k", keyword] if keyword else [path]
    return args


def run_one(mutant: dict, base: Path) -> tuple[str, float, str]:
    start = time.monotonic()
    scratch = base / mutant["name"]
    shutil.copytree(ROOT, scratch, ignore=IGNORE, symlinks=True)
    try:
        if apply(scratch, mutant["edits"]):
            built = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=scratch,
                                   capture_output=True, text=True, timeout=1200)
            if built.returncode != 0:
                return "ERROR", time.monotonic() - start, "does not build: " + built.stderr.strip()[-300:]
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                               *pytest_args(mutant["tests"])],
                              cwd=scratch, capture_output=True, text=True, timeout=TEST_TIMEOUT_S)
    except (ValueError, subprocess.TimeoutExpired) as exc:
        return "ERROR", time.monotonic() - start, str(exc)[:300]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode == 5:
        return "ERROR", time.monotonic() - start, "no test ran: " + summary
    if done.returncode != 0:
        return "CAUGHT", time.monotonic() - start, summary
    return ("EQUIVALENT" if mutant.get("equivalent") else "MISSED"), time.monotonic() - start, summary


def built(root: Path) -> bool:
    """The tree's compiled modules import: a copy of a tree that was never
    built fails every test at import, and every mutant would look caught."""
    probe = subprocess.run([sys.executable, "-c", "import lbcore.worker, lbcore.balance.wrr, lbcore._layout"],
                           cwd=root, capture_output=True, text=True, timeout=60)
    return probe.returncode == 0


def main(names: list[str]) -> int:
    if not built(ROOT):
        print(f"{ROOT}: its compiled modules do not import; build it first "
              "(python3 setup.py build_ext --inplace)", file=sys.stderr)
        return 2
    mutants = tomllib.loads(TABLE.read_text())["mutant"]
    if names:
        mutants = [m for m in mutants if m["name"] in names]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fulcrum-mutants-") as tmp:
        for mutant in mutants:
            verdict, seconds, summary = run_one(mutant, Path(tmp))
            rows.append((mutant, verdict, seconds, summary))
            print(f"{verdict:<10} {mutant['name']:<46} {mutant['guards']:<30} {seconds:5.0f} s  {summary}",
                  flush=True)
    counts = {v: sum(1 for _, verdict, _, _ in rows if verdict == v)
              for v in ("CAUGHT", "MISSED", "EQUIVALENT", "ERROR")}
    total = ", ".join(f"{n} {v.lower()}" for v, n in counts.items())
    print(f"{len(rows)} mutants: {total}")
    if not names:
        write_results(rows, total)
    return 0 if counts["MISSED"] == 0 and counts["ERROR"] == 0 else 1


def write_results(rows: list, total: str) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    lines = ["# Mutation check: last result", "",
             f"`python3 mutation/run.py` at git `{commit}` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): {len(rows)} mutants, {total}.", "",
             "| mutant | guards | verdict | tests | why equivalent, or why not caught |",
             "|---|---|---|---|---|"]
    for mutant, verdict, _, _ in rows:
        tests = "<br>".join(f"`{t}`" for t in mutant["tests"])
        lines.append(f"| {mutant['name']} | {mutant['guards']} | **{verdict}** | {tests} | "
                     f"{mutant.get('equivalent') or mutant.get('gap', '')} |")
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
