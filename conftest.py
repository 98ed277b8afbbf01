"""Test-session plumbing shared by the unit tests and nbval.

- Every kernel runs on the pinned CPU kernels (:mod:`shared.kernels`: fixed instruction sets, one
  BLAS/OpenMP thread), the quick profile's setting, so results are the same bits on any x86-64 CPU.
  With ``ENTROPY_BOOK_EMULATE_CPU=<name>`` the notebooks' kernels start with another CPU's dispatch
  limits (``shared.kernels.EMULATED_CPUS``) and must pin over them: the results files must not change.
- Notebooks executed by nbval write their results files to ``_build/test-results`` instead of
  ``results/``; at the end of the session those fresh files are compared with the committed ones
  (all fields but the volatile ``runtime_s``), so a stale results file fails the run.
- A table of each notebook's execution time and the total is printed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent
FRESH_RESULTS = ROOT / "_build" / "test-results"

# Before anything imports torch or numpy (this file is imported first).
from shared.kernels import EMULATED_CPUS, pin_cpu_kernels

pin_cpu_kernels()
_emulated = os.environ.get("ENTROPY_BOOK_EMULATE_CPU")
if _emulated:
    if _emulated not in EMULATED_CPUS:
        raise SystemExit(f"ENTROPY_BOOK_EMULATE_CPU={_emulated!r}: use one of {', '.join(EMULATED_CPUS)}")
    os.environ.update(EMULATED_CPUS[_emulated])  # what the notebooks' kernels inherit; their setup cell pins over it
os.environ["ENTROPY_BOOK_RESULTS_DIR"] = str(FRESH_RESULTS)
os.environ["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"

_notebook_seconds: dict[str, float] = defaultdict(float)
_stale: list[str] = []


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller, before any worker starts
        shutil.rmtree(FRESH_RESULTS, ignore_errors=True)


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        _notebook_seconds[path] += report.duration


def _stale_results() -> list[str]:
    """Fresh results files whose content (all but volatile fields) differs from the committed file."""
    from shared.book.results import VOLATILE_FIELDS

    problems = []
    for fresh in sorted(FRESH_RESULTS.rglob("*.json")):
        rel = fresh.relative_to(FRESH_RESULTS)
        committed = ROOT / "results" / rel
        if not committed.exists():
            problems.append(f"results/{rel} is missing: run `make book` and commit it")
            continue
        a, b = json.loads(fresh.read_text()), json.loads(committed.read_text())
        for key in VOLATILE_FIELDS:
            a.pop(key, None)
            b.pop(key, None)
        if a != b:
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            problems.append(f"results/{rel} is stale (differs in {', '.join(keys)}): run `make book` and commit it")
    return problems


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput") or not session.config.getoption("nbval", False):
        return
    _stale.extend(_stale_results())
    if _stale and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if _notebook_seconds:
        tr = terminalreporter
        width = max(len(p) for p in _notebook_seconds)
        tr.section("notebook execution times (nbval, kernel start included)")
        for path, seconds in sorted(_notebook_seconds.items()):
            tr.write_line(f"{path:<{width}}  {seconds:7.1f} s")
        tr.write_line(f"{'total (' + str(len(_notebook_seconds)) + ' notebooks)':<{width}}  {sum(_notebook_seconds.values()):7.1f} s")
    if _stale:
        terminalreporter.section("stale results files", red=True)
        for line in _stale:
            terminalreporter.write_line(line)
