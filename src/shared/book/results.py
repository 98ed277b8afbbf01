"""Results files: each chapter's key numbers and claim verdicts, machine-readable.

One call writes ``results/<part>/<slug>.<profile>.json``. The file holds the metrics, the runtime,
the seed, the settings, the package versions, the kernels it ran on and a list of claims, each
judged by the claims protocol (:mod:`shared.book.claims`): its kind, margin, number of seeds, the
paired effect with its interval, the mechanism's activity and the verdict. The JSON schema
(``results.schema.json`` beside this module) is enforced by the tests; the scoreboard is built
from these files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from shared.book.claims import VERDICTS, Claim
from shared.kernels import kernel_signature

SCHEMA_VERSION = 2
SCHEMA_PATH = Path(__file__).with_name("results.schema.json")
VOLATILE_FIELDS: tuple[str, ...] = ("runtime_s",)
"""Fields that legitimately differ between two runs of the same chapter with the same seed."""

RESULTS_DIR_ENV = "ENTROPY_BOOK_RESULTS_DIR"
TRACKED_PACKAGES: tuple[str, ...] = ("torch", "numpy", "scipy", "scikit-learn", "pandas", "matplotlib", "entropy-at-test-time")
SIGNIFICANT_DIGITS = 6


def find_book_root(start: Path | None = None) -> Path | None:
    """The repository root (the folder holding ``_config.yml`` and ``src/shared``) above ``start``."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "_config.yml").is_file() and (folder / "src" / "shared").is_dir():
            return folder
    return None


def results_dir() -> Path:
    """Where results go: ``$ENTROPY_BOOK_RESULTS_DIR``, else ``<book root>/results``, else ``./results``."""
    if os.environ.get(RESULTS_DIR_ENV):
        return Path(os.environ[RESULTS_DIR_ENV])
    root = find_book_root()
    return (root / "results") if root is not None else Path.cwd() / "results"


def results_path(part: str, slug: str, profile: str) -> Path:
    """``results/<part>/<slug>.<profile>.json``."""
    return results_dir() / part / f"{slug}.{profile}.json"


def _plain(value: Any) -> Any:
    """Make numpy/torch scalars, tuples and dataclasses JSON-ready; round floats to 6 significant digits."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if hasattr(value, "tolist") and callable(value.tolist):
        value = value.tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)  # JSON has no inf/nan; keep them visible as text
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def package_versions(names: Sequence[str] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that decide our numbers (``"absent"`` if not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def write_results(
    part: str,
    slug: str,
    profile: str,
    *,
    seed: int,
    runtime_s: float,
    metrics: Mapping[str, Any],
    claims: Sequence[Claim],
    settings: Any = None,
) -> Path:
    """Write the chapter's results file and return its path (the schema is checked before writing)."""
    if not claims:
        raise ValueError("a results file needs at least one claim with its verdict")
    if not all(isinstance(c, Claim) for c in claims):
        raise TypeError("claims must be judged by the claims protocol (ClaimSpec.judge), not built by hand")
    ids = [c.id for c in claims]
    if len(set(ids)) != len(ids):
        raise ValueError(f"claim ids must be unique, got {ids}")
    doc = {
        "schema_version": SCHEMA_VERSION,
        "part": part,
        "slug": slug,
        "profile": profile,
        "seed": seed,
        "runtime_s": round(float(runtime_s), 1),
        "settings": _plain(settings) if settings is not None else {},
        "metrics": _plain(dict(metrics)),
        "claims": [c.record() for c in claims],
        "environment": {"python": platform.python_version(), "packages": package_versions(), "kernels": kernel_signature()},
    }
    validate_results(doc)
    path = results_path(part, slug, profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return path


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results file (and check it against the schema)."""
    doc = json.loads(Path(path).read_text())
    validate_results(doc)
    return doc


def validate_results(doc: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` if ``doc`` does not follow ``results.schema.json``.

    Uses ``jsonschema`` when it is installed (always, in the test environment); otherwise checks the
    required keys and the verdicts, so that a chapter opened alone does not need it.
    """
    schema = json.loads(SCHEMA_PATH.read_text())
    try:
        import jsonschema
    except ImportError:
        missing = [k for k in schema["required"] if k not in doc]
        bad = [c.get("verdict") for c in doc.get("claims", []) if c.get("verdict") not in VERDICTS]
        if missing or bad:
            raise ValueError(f"results do not follow the schema: missing {missing}, bad verdicts {bad}") from None
        return
    try:
        jsonschema.validate(doc, schema)
    except jsonschema.ValidationError as err:
        raise ValueError(f"results do not follow the schema: {err.message} at {list(err.absolute_path)}") from err
