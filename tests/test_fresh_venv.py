"""A reader opens one chapter alone: a fresh environment with only Jupyter and papermill.

The notebook's setup cell must install the book's library (here from a local copy of the repository,
standing in for the GitHub URL that Colab uses) and then run to the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import ENTROPY_PAGE, ROOT

from shared.kernels import PINNED_ENV

pytestmark = pytest.mark.slow

COPY_IGNORE = shutil.ignore_patterns(".venv", "_build", ".git", "__pycache__", "*.egg-info", ".ipynb_checkpoints")


def test_a_chapter_opened_alone_installs_the_library_and_runs(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "papermill", "ipykernel"], check=True)
    probe = subprocess.run([str(py), "-c", "import shared"], capture_output=True)
    assert probe.returncode != 0, "the fresh environment must not see the library before the notebook installs it"

    repo_copy = tmp_path / "repo"
    shutil.copytree(ROOT, repo_copy, ignore=COPY_IGNORE)
    page = repo_copy.parent / "alone" / ENTROPY_PAGE.name  # outside the repository: nothing to find on disk
    page.parent.mkdir()
    shutil.copy(ENTROPY_PAGE, page)
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch==2.13.0\n")  # the CPU wheel on disk, instead of a multi-GB download
    # nothing of the test session's environment: no pinned kernels either (the setup cell must pin them itself)
    dropped = {"PYTHONPATH", "VIRTUAL_ENV", "ENTROPY_BOOK_RESULTS_DIR", *PINNED_ENV}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", ENTROPY_BOOK_SOURCE=str(repo_copy),
               PIP_CONSTRAINT=str(constraints))
    proc = subprocess.run([str(py), "-m", "papermill", str(page), str(page), "--cwd", str(page.parent),
                           "--kernel", "python3", "--no-progress-bar"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = page.parent / "results" / "book" / "entropy-in-one-page.quick.json"
    assert json.loads(written.read_text())["environment"]["kernels"] == "pinned-v1"
