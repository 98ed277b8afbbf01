"""The one entry point a chapter notebook calls after its ``parameters`` cell.

:func:`start_chapter` validates the profile and knobs, checks the pinned CPU kernels and fixes the
thread count in the quick profile, seeds everything, applies the plotting style and starts the
clock. The chapter then declares its claims (:meth:`ChapterRun.declare`, before the experiment),
judges them from the per-seed values (:meth:`ChapterRun.judge`) and writes the results file
(:meth:`ChapterRun.finish`), which refuses a claim that was judged but never declared, one that was
declared but never judged, and a chapter without exactly one central claim.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from shared.book.claims import Claim, ClaimSpec, Values, claims_frame
from shared.book.profiles import check_profile, resolve_settings
from shared.book.results import write_results
from shared.book.seeding import seed_everything
from shared.book.style import use_book_style
from shared.kernels import require_pinned_kernels

PARTS: tuple[str, ...] = ("tta", "rl", "inference", "evaluation", "training", "compression", "book", "templates")
"""The catalog's six parts, plus ``book`` (the book's own executed pages) and ``templates``."""

S = TypeVar("S")


@dataclasses.dataclass
class ChapterRun(Generic[S]):
    """A running chapter: its identity, validated settings, seed, and start time."""

    part: str
    slug: str
    profile: str
    seed: int
    settings: S
    started: float = dataclasses.field(default_factory=time.perf_counter)
    declared: dict[str, ClaimSpec] = dataclasses.field(default_factory=dict)
    judged: dict[str, Claim] = dataclasses.field(default_factory=dict)

    @property
    def seeds(self) -> list[int]:
        """``seed, seed + 1, ..., seed + n_seeds - 1`` when the settings have ``n_seeds``, else ``[seed]``."""
        return list(range(self.seed, self.seed + int(getattr(self.settings, "n_seeds", 1))))

    def declare(self, *specs: ClaimSpec) -> None:
        """Declare claims before the experiment runs (kind, margin, seeds are fixed from here on)."""
        for spec in specs:
            if not isinstance(spec, ClaimSpec):
                raise TypeError(f"declare ClaimSpec objects, not {type(spec).__name__}")
            if spec.id in self.declared:
                raise ValueError(f"claim {spec.id!r} is already declared")
            if self.judged:
                raise RuntimeError(f"claim {spec.id!r} is declared after a verdict was computed: declare every claim first")
            self.declared[spec.id] = spec

    def judge(self, id: str, arm: Values, baseline: Values | float | None = None, *, activity: Values | None = None) -> Claim:
        """Judge the declared claim ``id`` from the per-seed values (see :meth:`ClaimSpec.judge`)."""
        if id not in self.declared:
            raise KeyError(f"claim {id!r} was never declared; declared: {', '.join(self.declared) or 'none'}")
        if id in self.judged:
            raise ValueError(f"claim {id!r} is already judged: a verdict is computed once")
        claim = self.declared[id].judge(arm, baseline, activity=activity)
        self.judged[id] = claim
        return claim

    @property
    def claims(self) -> list[Claim]:
        """The judged claims, in the order they were declared."""
        return [self.judged[i] for i in self.declared if i in self.judged]

    def claims_table(self):
        """The judged claims as a reader's table (see :func:`shared.book.claims.claims_frame`)."""
        return claims_frame(self.claims)

    def verdict(self, id: str) -> str:
        """The verdict of the judged claim ``id`` (for glue)."""
        return self.judged[id].verdict

    @property
    def elapsed_s(self) -> float:
        """Seconds since :func:`start_chapter`."""
        return time.perf_counter() - self.started

    def finish(self, *, metrics: Mapping[str, Any]) -> Path:
        """Write ``results/<part>/<slug>.<profile>.json`` with every declared claim's verdict; return its path.

        Raises:
            ValueError: a declared claim was not judged, or the chapter has no or several central claims.
        """
        missing = [i for i in self.declared if i not in self.judged]
        if missing:
            raise ValueError(f"declared claims without a verdict: {', '.join(missing)}")
        central = [c.id for c in self.claims if c.central]
        if len(central) != 1:
            raise ValueError(f"a chapter has exactly one central claim; got {central or 'none'}")
        claims: Sequence[Claim] = self.claims
        return write_results(
            self.part,
            self.slug,
            self.profile,
            seed=self.seed,
            runtime_s=self.elapsed_s,
            metrics=metrics,
            claims=claims,
            settings=self.settings,
        )


def start_chapter(
    part: str,
    slug: str,
    *,
    profile: str,
    seed: int,
    presets: Mapping[str, S],
    **overrides: Any,
) -> ChapterRun[S]:
    """Validate, seed and time a chapter run.

    Args:
        part: the chapter's part (``tta``, ``rl``, ``inference``, ``evaluation``, ``training``,
            ``compression``; ``book`` for the book's own pages).
        slug: the chapter's slug, as in the catalog.
        profile: ``"quick"`` (2-core CPU, one thread, deterministic) or ``"paper"`` (a GPU, torch's threads).
        seed: the run's seed.
        presets: the chapter's settings per profile (see :mod:`shared.book.profiles`).
        **overrides: the notebook's knobs; ``None`` keeps the profile's value.

    Raises:
        ValueError: unknown part, profile or knob, or a knob out of range.
    """
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}: allowed parts are {', '.join(map(repr, PARTS))}")
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", slug):
        raise ValueError(f"slug {slug!r} is not allowed: use lowercase letters, digits and dashes")
    check_profile(profile)
    settings = resolve_settings(profile, presets, **overrides)
    if profile == "quick":
        require_pinned_kernels()
    seed_everything(seed, threads=1 if profile == "quick" else None)
    use_book_style()
    return ChapterRun(part=part, slug=slug, profile=profile, seed=seed, settings=settings)
