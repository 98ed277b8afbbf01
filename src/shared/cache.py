"""On-disk caches of trained weights: where they live and what their keys must include.

A cached result is only the result of a fresh run if its key covers everything the run depends
on: its settings and starting weights (the caller's part), the code that computes it
(:func:`code_fingerprint`) and the CPU kernels it ran on (:func:`shared.kernels.kernel_signature`:
weights trained on the host's AVX2 kernels differ in their last bits from pinned ones). The two
last parts are added here, by :func:`cache_key`, for every cache of the book.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shared.kernels import kernel_signature

CACHE_ENV = "ENTROPY_BOOK_CACHE"


def cache_dir() -> Path:
    """``$ENTROPY_BOOK_CACHE``, else ``~/.cache/entropy-at-test-time``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "entropy-at-test-time"))


def module_files(modules: Iterable[str]) -> list[Path]:
    """The source files of ``modules`` (a package stands for every ``.py`` file below it), sorted."""
    files: set[Path] = set()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ValueError(f"no module named {name!r}")
        origin = Path(spec.origin)
        if spec.submodule_search_locations:  # a package
            for folder in spec.submodule_search_locations:
                files.update(Path(folder).rglob("*.py"))
        else:
            files.add(origin)
    return sorted(files)


def code_fingerprint(modules: Iterable[str]) -> str:
    """A hash of the source text of ``modules``: it changes whenever their code does."""
    h = hashlib.sha256()
    for path in module_files(modules):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cache_key(parts: Any, modules: Iterable[str]) -> str:
    """The key of a cached result: ``parts`` (settings, weights' hash...), the code of ``modules`` and the kernels."""
    blob = json.dumps([parts, code_fingerprint(modules), kernel_signature()], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
