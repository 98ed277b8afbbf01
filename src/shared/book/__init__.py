"""The book's rails: what every chapter notebook uses besides the method it studies.

A chapter calls :func:`start_chapter` once, right after its ``parameters`` cell::

    run = start_chapter("tta", "sar", profile=profile, seed=seed, presets=PRESETS)
    S = run.settings            # the validated, typed settings of the chosen profile
    run.declare(ClaimSpec("central", ..., kind="superiority", margin=1.0, n_seeds=S.n_seeds, central=True))
    ...                         # the experiment, over run.seeds
    run.judge("central", sar_accuracy_per_seed, tent_accuracy_per_seed)
    run.finish(metrics={...})   # writes results/tta/sar.<profile>.json

Everything else here (profiles, seeding, results, style, glue, progress) can be used on its own.
"""

from shared.book.chapter import ChapterRun, start_chapter
from shared.book.claims import ActivitySpec, Claim, ClaimSpec, claims_frame
from shared.book.glue import glue_values
from shared.book.profiles import PROFILES, resolve_settings, setting, validate_settings
from shared.book.progress import progress
from shared.book.results import load_results, results_path, write_results
from shared.book.seeding import seed_everything
from shared.book.style import PALETTE, use_book_style

__all__ = [
    "PALETTE",
    "PROFILES",
    "ActivitySpec",
    "ChapterRun",
    "Claim",
    "ClaimSpec",
    "claims_frame",
    "glue_values",
    "load_results",
    "progress",
    "resolve_settings",
    "results_path",
    "seed_everything",
    "setting",
    "start_chapter",
    "use_book_style",
    "validate_settings",
    "write_results",
]
