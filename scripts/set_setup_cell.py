"""Write the one setup cell every notebook carries (cell 2, tagged hide-cell), from SETUP below."""

import json
import sys
from pathlib import Path

SETUP = '''# Setup: the book's library `shared`. Opened alone (Colab, a bare Jupyter), install it from the repository.
import importlib.util
import os

if importlib.util.find_spec("shared") is None:
    source = os.environ.get("ENTROPY_BOOK_SOURCE", "git+https://github.com/entropy-at-test-time/entropy-at-test-time")
    %pip install --quiet {source}

from shared.kernels import pin_cpu_kernels

if profile == "quick":  # before torch is imported: the same bits on any x86-64 CPU (see shared.kernels)
    pin_cpu_kernels()'''


def main(paths: list[str]) -> None:
    for p in paths:
        nb = json.loads(Path(p).read_text())
        cell = nb["cells"][2]
        assert "hide-cell" in cell["metadata"].get("tags", []), p
        cell["source"] = SETUP.splitlines(keepends=True)
        Path(p).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    main(sys.argv[1:] or sorted(str(p) for g in ("chapters/*/*.ipynb", "book/*.ipynb", "templates/*.ipynb") for p in root.glob(g)))
