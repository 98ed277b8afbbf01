"""Execute the book's notebooks with papermill, tidy what they store, and time them.

``python -m shared.book.execute --profile quick --select "tta/*" --jobs 2`` runs the chosen
notebooks in place (each in its own kernel, one thread each in the quick profile) and prints a
table of execution times. The stored notebook keeps what a reader needs (outputs) and drops what
changes on every run for no reason (papermill's timestamps, the redraws of progress bars).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from shared.book.profiles import PROFILES, check_profile
from shared.book.results import find_book_root
from shared.kernels import pin_cpu_kernels

NOTEBOOK_GLOBS: tuple[str, ...] = ("book/*.ipynb", "chapters/*/*.ipynb", "templates/*.ipynb")
"""Where executable notebooks live, relative to the book root."""

_CARRIAGE_RETURN = re.compile(r"^.*\r(?=[^\n])", re.MULTILINE)


@dataclass(frozen=True)
class Execution:
    """The outcome of executing one notebook."""

    notebook: str
    seconds: float
    ok: bool
    error: str = ""


def discover_notebooks(root: Path, select: str = "*") -> list[Path]:
    """Executable notebooks under ``root`` whose path (e.g. ``chapters/tta/sar.ipynb``) matches ``select``.

    ``select`` is a glob matched against the path relative to the root and against ``<part>/<slug>``,
    so ``"tta/*"``, ``"*sar*"`` and ``"book/entropy-in-one-page"`` all work.
    """
    found: list[Path] = []
    for pattern in NOTEBOOK_GLOBS:
        found.extend(p for p in root.glob(pattern) if ".ipynb_checkpoints" not in p.parts)
    chosen = []
    for path in sorted(found):
        rel = path.relative_to(root).as_posix()
        short = f"{path.parent.name}/{path.stem}"
        if any(fnmatch.fnmatch(name, select) for name in (rel, short, path.stem)):
            chosen.append(path)
    return chosen


def tidy_notebook(path: Path) -> None:
    """Drop papermill's per-run metadata and keep only the final state of progress bars.

    Consecutive stream outputs of the same name are merged and each line keeps only the text after
    its last carriage return, which is what a terminal would show (nbval compares the same way).
    """
    nb = json.loads(path.read_text())
    nb.get("metadata", {}).pop("papermill", None)
    for cell in nb.get("cells", []):
        cell.get("metadata", {}).pop("papermill", None)
        cell.get("metadata", {}).pop("execution", None)
        outputs = cell.get("outputs")
        if not outputs:
            continue
        merged: list[dict] = []
        for out in outputs:
            if out.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream" and merged[-1]["name"] == out["name"]:
                merged[-1]["text"] = "".join(merged[-1]["text"]) + "".join(out["text"])
            else:
                merged.append(out)
        for out in merged:
            if out.get("output_type") == "stream":
                text = _CARRIAGE_RETURN.sub("", "".join(out["text"]))
                out["text"] = text.splitlines(keepends=True)
        cell["outputs"] = merged
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def kernel_environment(profile: str) -> dict[str, str]:
    """The environment for a notebook's kernel: this interpreter first on PATH; in ``quick`` the pinned
    CPU kernels (:data:`shared.kernels.PINNED_ENV`, one thread), which the setup cell sets again."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    if profile == "quick":
        pin_cpu_kernels(env)
    return env


def execute_one(
    path: Path,
    profile: str = "quick",
    *,
    output: Path | None = None,
    parameters: dict[str, object] | None = None,
    extra_env: dict[str, str] | None = None,
    timeout_s: int = 1800,
) -> Execution:
    """Execute ``path`` with papermill into ``output`` (default: in place), then tidy the result.

    Parameters are injected only when they differ from the notebook's defaults: the ``profile`` when
    it is not ``quick``, and any ``parameters`` given. The kernel runs in the notebook's folder.
    """
    output = output or path
    injected = dict(parameters or {})
    if profile != "quick":
        injected["profile"] = profile
    cmd = [sys.executable, "-m", "papermill", str(path), str(output), "--cwd", str(path.parent),
           "--kernel", "python3", "--no-progress-bar", "--execution-timeout", str(timeout_s)]
    for name, value in injected.items():
        cmd += ["-y", json.dumps({name: value})]
    env = kernel_environment(profile)
    env.update(extra_env or {})
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    ok = proc.returncode == 0
    if output.exists():
        tidy_notebook(output)
    return Execution(str(path), seconds, ok, "" if ok else _last_error(proc.stderr))


def _last_error(stderr: str) -> str:
    """The last few lines of papermill's error report (the notebook's exception)."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return "\n".join(lines[-6:])


def timing_table(executions: list[Execution], root: Path) -> str:
    """A plain-text table of per-notebook execution times and their total."""
    rows = [(Path(e.notebook).resolve().relative_to(root).as_posix(), e.seconds, "ok" if e.ok else "FAILED") for e in executions]
    width = max([len(r[0]) for r in rows] + [len("notebook")])
    lines = [f"{'notebook':<{width}}  {'seconds':>8}  status", "-" * (width + 18)]
    lines += [f"{name:<{width}}  {sec:8.1f}  {status}" for name, sec, status in rows]
    lines += ["-" * (width + 18), f"{'total (' + str(len(rows)) + ' notebooks)':<{width}}  {sum(r[1] for r in rows):8.1f}"]
    return "\n".join(lines)


def execute_all(profile: str = "quick", select: str = "*", jobs: int = 2, root: Path | None = None) -> list[Execution]:
    """Execute every selected notebook, ``jobs`` at a time; print the timing table; return the outcomes."""
    check_profile(profile)
    root = root or find_book_root()
    if root is None:
        raise RuntimeError("run this from inside the book's repository (no _config.yml with src/shared above here)")
    notebooks = discover_notebooks(root, select)
    if not notebooks:
        raise ValueError(f"no notebook matches {select!r}; notebooks live in {', '.join(NOTEBOOK_GLOBS)}")
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        executions = list(pool.map(lambda p: _announce(execute_one(p, profile), root), notebooks))
    print(timing_table(executions, root), flush=True)
    return executions


def _announce(execution: Execution, root: Path) -> Execution:
    name = Path(execution.notebook).resolve().relative_to(root).as_posix()
    status = "ok" if execution.ok else "FAILED\n" + execution.error
    print(f"[{execution.seconds:6.1f} s] {name}: {status}", flush=True)
    return execution


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick", choices=PROFILES)
    parser.add_argument("--select", default="*", help='glob over notebooks, e.g. "tta/*" or "*sar*"')
    parser.add_argument("--jobs", type=int, default=2, help="notebooks executed at once")
    args = parser.parse_args(argv)
    executions = execute_all(args.profile, args.select, args.jobs)
    return 0 if all(e.ok for e in executions) else 1


if __name__ == "__main__":
    raise SystemExit(main())
