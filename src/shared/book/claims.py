"""The book's claims protocol: a claim is declared before its experiment runs; the library decides.

A chapter declares each claim as a :class:`ClaimSpec` (its kind, metric, direction, the arm and
the baseline it is paired against, the margin, the number of seeds, and optionally an activity
measure of the mechanism) *before* running the experiment, then hands the per-seed values to
:meth:`ClaimSpec.judge`. The verdict follows one rule for the whole book:

**Effect.** For seed :math:`i`, the paired difference is :math:`d_i = s\\,(a_i - b_i)`, where
:math:`a_i` is the arm's value, :math:`b_i` the baseline's on the same seed (or a fixed reference
value) and :math:`s = +1` when higher is better, :math:`-1` when lower is. The effect is
:math:`\\bar d`, with the two-sided 95 % Student-t interval over the :math:`n` seeds,

.. math:: \\bar d \\pm t_{0.975,\\,n-1}\\, \\frac{s_d}{\\sqrt n}.

We chose the t interval over a bootstrap because chapters run 3 to 10 seeds, where a bootstrap's
percentiles are too coarse; the t interval is exact for normal differences and wide when
:math:`n` is small, which is the honest direction.

**Verdict**, with the pre-declared margin :math:`\\delta \\ge 0` (the smallest effect worth the
name, in the metric's units) and the interval :math:`[\\ell, h]`:

==================  ==================================  ==================================
kind                ``reproduced`` when                 ``not reproduced`` when
==================  ==================================  ==================================
superiority         :math:`\\ell > \\delta`               :math:`h < \\delta`
non-inferiority     :math:`\\ell > -\\delta`              :math:`h < -\\delta`
equivalence         :math:`-\\delta < \\ell,\\ h < \\delta` :math:`\\ell > \\delta` or :math:`h < -\\delta`
descriptive         :math:`\\ell > \\text{threshold}`     :math:`h < \\text{threshold}`
                    (the statistic's own interval;      (mirrored when lower is better)
                    mirrored when lower is better)
identity            worst deviation :math:`\\le` tol      worst deviation :math:`>` tol
==================  ==================================  ==================================

and ``inconclusive`` otherwise. Fewer than 3 seeds give ``inconclusive`` for every empirical kind
(a 2-seed interval says almost nothing). A superiority claim can only be passed by the superiority
rule: the kind is fixed when the claim is declared.

**Activity.** A claim may name an :class:`ActivitySpec`, a measure of how much the mechanism does
(the fraction of tokens it touches, the size of its term relative to the loss, the weight change).
If its mean over seeds is at or below the declared ``inert_at`` level, the verdict is
``inconclusive`` whatever the metric says: an effect of a mechanism that does nothing is noise.

Descriptive checks and identities are supporting evidence; the central claim of a chapter must be
one of the three comparative kinds (:data:`CENTRAL_KINDS`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from scipy import stats

Kind = Literal["superiority", "non-inferiority", "equivalence", "descriptive", "identity"]
KINDS: tuple[str, ...] = ("superiority", "non-inferiority", "equivalence", "descriptive", "identity")
CENTRAL_KINDS: tuple[str, ...] = ("superiority", "non-inferiority", "equivalence")
EMPIRICAL_KINDS: tuple[str, ...] = ("superiority", "non-inferiority", "equivalence", "descriptive")
Verdict = Literal["reproduced", "not reproduced", "inconclusive"]
VERDICTS: tuple[str, ...] = ("reproduced", "not reproduced", "inconclusive")
MIN_SEEDS = 3
"""Below this many seeds an empirical claim is ``inconclusive``."""
CONFIDENCE = 0.95
RECORD_DIGITS = 4
"""Significant digits of the numbers a claim record stores (the interval never carries more)."""

Values = Sequence[float] | Mapping[Any, float]


@dataclasses.dataclass(frozen=True)
class ActivitySpec:
    """How much a mechanism does, and the level at which it counts as doing nothing.

    Attributes:
        name: what is measured, e.g. ``"fraction of tokens clipped"``.
        unit: its unit (``"fraction"``, ``"nats"``, ``"% of the loss"``...).
        inert_at: the mechanism is inert when the mean activity over seeds is ``<= inert_at``.
    """

    name: str
    unit: str
    inert_at: float

    def __post_init__(self) -> None:
        if not self.name or not self.unit:
            raise ValueError("an activity measure needs a name and a unit")
        if not math.isfinite(self.inert_at) or self.inert_at < 0:
            raise ValueError(f"inert_at={self.inert_at!r} is not allowed: it must be a finite number >= 0")


@dataclasses.dataclass(frozen=True)
class ClaimSpec:
    """A claim as declared before its experiment runs.

    Attributes:
        id: short identifier, unique within the chapter (``"central"``, ``"bn-vs-gn"``).
        statement: the paper's claim in our words.
        source: where the paper makes it (``"Table 2"``, ``"Fig. 3"``, ``"Sec. 4.1"``).
        kind: one of :data:`KINDS` (see the module's table).
        metric: the metric with its unit, e.g. ``"online accuracy (%)"``.
        setting: our testbed setting, e.g. ``"digits-c GN model, label-shift stream, batch 16"``.
        arm: the method the claim is about (for an identity: what is checked).
        baseline: what the arm is paired against (``None`` for descriptive claims and identities).
        higher_is_better: the metric's direction.
        margin: the smallest effect worth the name, in the metric's units (comparative kinds).
        threshold: the reference value of a descriptive claim.
        tolerance: the largest deviation an identity allows.
        n_seeds: the number of seeds (or independent replicates) the judge must receive.
        central: whether this is the chapter's central claim.
        paper: the paper's own number for this claim, with its table or figure and setting
            (``"SAR 37.2 % vs Tent 22.0 %, ResNet-50 GN, ImageNet-C label shift (README table)"``),
            ``None`` when the paper gives none. Never our threshold.
        activity: the mechanism's activity measure, if the claim has one.
        note: anything a reader needs to interpret the verdict.
    """

    id: str
    statement: str
    source: str
    kind: Kind
    metric: str
    setting: str
    arm: str
    baseline: str | None = None
    higher_is_better: bool = True
    margin: float = 0.0
    threshold: float | None = None
    tolerance: float | None = None
    n_seeds: int = MIN_SEEDS
    central: bool = False
    paper: str | None = None
    activity: ActivitySpec | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not allowed: use one of {', '.join(map(repr, KINDS))}")
        for name in ("id", "statement", "source", "metric", "setting", "arm"):
            if not getattr(self, name):
                raise ValueError(f"claim {self.id!r}: {name} must be a non-empty string")
        if self.central and self.kind not in CENTRAL_KINDS:
            raise ValueError(f"claim {self.id!r}: a central claim must be comparative ({', '.join(CENTRAL_KINDS)}), "
                             f"not {self.kind!r}; record identities and descriptive checks as supporting claims")
        if self.kind in CENTRAL_KINDS:
            if self.baseline is None:
                raise ValueError(f"claim {self.id!r}: a {self.kind} claim needs the baseline it is paired against")
            if not math.isfinite(self.margin) or self.margin < 0:
                raise ValueError(f"claim {self.id!r}: margin={self.margin!r} must be a finite number >= 0")
            if self.kind == "equivalence" and self.margin == 0:
                raise ValueError(f"claim {self.id!r}: an equivalence claim needs a margin > 0")
        if self.kind == "descriptive" and (self.threshold is None or not math.isfinite(self.threshold)):
            raise ValueError(f"claim {self.id!r}: a descriptive claim needs a finite threshold")
        if self.kind == "identity" and (self.tolerance is None or not self.tolerance >= 0):
            raise ValueError(f"claim {self.id!r}: an identity needs a tolerance >= 0")
        if isinstance(self.n_seeds, bool) or not isinstance(self.n_seeds, int) or self.n_seeds < 1:
            raise ValueError(f"claim {self.id!r}: n_seeds={self.n_seeds!r} must be a positive integer")

    def judge(self, arm: Values, baseline: Values | float | None = None, *, activity: Values | None = None) -> Claim:
        """The verdict on this claim from the per-seed values.

        Args:
            arm: the arm's metric per seed (a sequence, or a mapping seed -> value). For an identity:
                the deviations found (e.g. ``|lhs - rhs|`` on each random instance).
            baseline: the baseline's metric on the same seeds (same length, or a mapping with the same
                keys), or one reference value for all seeds; ``None`` for descriptive claims and identities.
            activity: the mechanism's activity per seed, when the claim declares an activity measure.

        Raises:
            ValueError: values missing, of the wrong number, unpaired or not finite; activity given
                for a claim that declared none, or missing for one that did.
        """
        a, b = _paired(self, arm, baseline)
        act = _activity(self, activity)
        if self.kind == "identity":
            return self._judge_identity(a, act)
        if self.kind == "descriptive":  # the statistic itself against its threshold, in the metric's units
            diff = list(a)
            effect, lo, hi = mean_interval(diff)
            assert self.threshold is not None
            verdict, reason = _descriptive(lo, hi, self.threshold, self.higher_is_better)
        else:
            diff = [(x - y) * (1.0 if self.higher_is_better else -1.0) for x, y in zip(a, b)]
            effect, lo, hi = mean_interval(diff)
            if self.kind == "equivalence":
                verdict, reason = _equivalence(lo, hi, self.margin)
            else:
                bar = self.margin if self.kind == "superiority" else -self.margin
                verdict, reason = _one_sided(lo, hi, bar, self.kind, self.margin)
        if len(diff) < MIN_SEEDS:
            verdict, reason = "inconclusive", f"only {len(diff)} seed(s): an empirical verdict needs at least {MIN_SEEDS}"
        verdict, reason = _apply_activity(self, act, verdict, reason)
        ref = self.threshold if self.kind == "descriptive" else None
        return Claim(spec=self, n=len(diff), arm_mean=_mean(a), arm_sd=_sd(a),
                     baseline_mean=ref if ref is not None else (_mean(b) if self.baseline is not None else None),
                     baseline_sd=None if ref is not None else (_sd(b) if self.baseline is not None else None),
                     effect=effect, interval=(lo, hi), activity=act, verdict=verdict, reason=reason)

    def _judge_identity(self, deviations: list[float], act: float | None) -> Claim:
        worst = max(abs(x) for x in deviations)
        assert self.tolerance is not None
        if worst <= self.tolerance:
            verdict, reason = "reproduced", f"worst deviation {_fmt(worst)} <= tolerance {_fmt(self.tolerance)} over {len(deviations)} cases"
        else:
            verdict, reason = "not reproduced", f"worst deviation {_fmt(worst)} > tolerance {_fmt(self.tolerance)}"
        verdict, reason = _apply_activity(self, act, verdict, reason)
        return Claim(spec=self, n=len(deviations), arm_mean=worst, arm_sd=None, baseline_mean=None, baseline_sd=None,
                     effect=worst, interval=(worst, worst), activity=act, verdict=verdict, reason=reason)


@dataclasses.dataclass(frozen=True)
class Claim:
    """A judged claim: the declaration, the numbers and the verdict (what the results file records)."""

    spec: ClaimSpec
    n: int
    arm_mean: float
    arm_sd: float | None
    baseline_mean: float | None
    baseline_sd: float | None
    effect: float
    interval: tuple[float, float]
    activity: float | None
    verdict: Verdict
    reason: str

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def central(self) -> bool:
        return self.spec.central

    def ours(self) -> str:
        """Our numbers in words: the arm (and baseline) with their spread, the unit and the setting."""
        s = self.spec
        if s.kind == "identity":
            return f"worst deviation {_fmt(self.effect)} over {self.n} cases ({s.setting})"
        arm = f"{s.arm} {_fmt_spread(self.arm_mean, self.arm_sd)}"
        if s.kind == "descriptive":
            return f"{arm} {s.metric}, {self.n} seeds ({s.setting})"
        base = f"{s.baseline} {_fmt_spread(self.baseline_mean, self.baseline_sd)}" if self.baseline_mean is not None else ""
        return f"{arm} vs {base} {s.metric}, {self.n} seeds ({s.setting})"

    def test(self) -> str:
        """The rule that was applied, in words."""
        s = self.spec
        sign = "" if s.higher_is_better else " (lower is better)"
        vs = f"{s.arm} − {s.baseline}" if s.baseline else s.arm
        return {
            "superiority": f"superiority{sign}: 95 % interval of {vs} above the margin {_fmt(s.margin)}",
            "non-inferiority": f"non-inferiority{sign}: 95 % interval of {vs} above −{_fmt(s.margin)}",
            "equivalence": f"equivalence: 95 % interval of {vs} inside ±{_fmt(s.margin)}",
            "descriptive": f"descriptive: 95 % interval of {s.arm} {'above' if s.higher_is_better else 'below'} {_fmt(s.threshold or 0.0)}",
            "identity": f"identity: worst deviation at most {_fmt(s.tolerance or 0.0)}",
        }[s.kind]

    def record(self) -> dict[str, Any]:
        """The claim as the results file stores it (numbers to :data:`RECORD_DIGITS` significant digits)."""
        s = self.spec
        activity = None
        if s.activity is not None:
            activity = {"name": s.activity.name, "unit": s.activity.unit, "value": _sig(self.activity),
                        "inert_at": s.activity.inert_at, "inert": self.activity is not None and self.activity <= s.activity.inert_at}
        return {
            "id": s.id, "statement": s.statement, "source": s.source, "kind": s.kind, "central": s.central,
            "metric": s.metric, "setting": s.setting, "arm": s.arm, "baseline": s.baseline,
            "higher_is_better": s.higher_is_better, "margin": s.margin, "threshold": s.threshold, "tolerance": s.tolerance,
            "n_seeds": self.n, "paper": s.paper, "ours": self.ours(), "test": self.test(),
            "effect": _sig(self.effect), "interval": [_sig(self.interval[0]), _sig(self.interval[1])],
            "activity": activity, "verdict": self.verdict, "reason": self.reason, "note": s.note,
        }


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean and two-sided Student-t interval, :math:`\\bar x \\pm t_{(1+c)/2,\\,n-1}\\, s/\\sqrt n`.

    One value gives the interval ``(-inf, inf)``; values that are all equal give a point.
    """
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    m = math.fsum(values) / n
    if n == 1:
        return m, -math.inf, math.inf
    sd = _sd(values)
    assert sd is not None
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return m, m - half, m + half


def _descriptive(lo: float, hi: float, threshold: float, higher_is_better: bool) -> tuple[Verdict, str]:
    side = "above" if higher_is_better else "below"
    beyond = lo > threshold if higher_is_better else hi < threshold
    short = hi < threshold if higher_is_better else lo > threshold
    if beyond:
        return "reproduced", f"the interval [{_fmt(lo)}, {_fmt(hi)}] lies {side} the threshold {_fmt(threshold)}"
    if short:
        return "not reproduced", f"the interval [{_fmt(lo)}, {_fmt(hi)}] lies on the wrong side of the threshold {_fmt(threshold)}"
    return "inconclusive", f"the interval [{_fmt(lo)}, {_fmt(hi)}] contains the threshold {_fmt(threshold)}"


def _one_sided(lo: float, hi: float, bar: float, kind: str, margin: float) -> tuple[Verdict, str]:
    what = {"superiority": f"the margin {_fmt(margin)}", "non-inferiority": f"−{_fmt(margin)}"}[kind]
    if lo > bar:
        return "reproduced", f"the interval [{_fmt(lo)}, {_fmt(hi)}] lies above {what}"
    if hi < bar:
        return "not reproduced", f"the interval [{_fmt(lo)}, {_fmt(hi)}] lies below {what}"
    return "inconclusive", f"the interval [{_fmt(lo)}, {_fmt(hi)}] contains {what}"


def _equivalence(lo: float, hi: float, margin: float) -> tuple[Verdict, str]:
    if -margin < lo and hi < margin:
        return "reproduced", f"the interval [{_fmt(lo)}, {_fmt(hi)}] lies inside ±{_fmt(margin)}"
    if lo > margin or hi < -margin:
        return "not reproduced", f"the interval [{_fmt(lo)}, {_fmt(hi)}] lies outside ±{_fmt(margin)}"
    return "inconclusive", f"the interval [{_fmt(lo)}, {_fmt(hi)}] crosses ±{_fmt(margin)}"


def _apply_activity(spec: ClaimSpec, act: float | None, verdict: Verdict, reason: str) -> tuple[Verdict, str]:
    if spec.activity is None or act is None or act > spec.activity.inert_at:
        return verdict, reason
    return "inconclusive", (f"the mechanism is inert: {spec.activity.name} = {_fmt(act)} {spec.activity.unit} "
                            f"<= {_fmt(spec.activity.inert_at)} (without it: {verdict}, {reason})")


def _values(spec: ClaimSpec, values: Values, what: str) -> tuple[list[Any] | None, list[float]]:
    if hasattr(values, "index") and hasattr(values, "to_dict") and not isinstance(values, Mapping):
        values = values.to_dict()  # a pandas Series: paired by its index (the seeds), like a mapping
    keys = list(values.keys()) if isinstance(values, Mapping) else None
    seq = list(values.values()) if isinstance(values, Mapping) else list(values)
    try:
        floats = [float(v) for v in seq]
    except (TypeError, ValueError) as err:
        raise ValueError(f"claim {spec.id!r}: {what} values must be numbers") from err
    if not floats:
        raise ValueError(f"claim {spec.id!r}: no {what} values")
    if not all(math.isfinite(v) for v in floats):
        raise ValueError(f"claim {spec.id!r}: {what} values must be finite, got {floats}")
    return keys, floats


def _paired(spec: ClaimSpec, arm: Values, baseline: Values | float | None) -> tuple[list[float], list[float]]:
    keys, a = _values(spec, arm, "arm")
    if spec.kind != "identity" and len(a) != spec.n_seeds:
        raise ValueError(f"claim {spec.id!r} was declared with {spec.n_seeds} seeds but got {len(a)} values")
    if spec.kind in ("identity", "descriptive"):
        if baseline is not None:
            raise ValueError(f"claim {spec.id!r}: a {spec.kind} claim takes no baseline values")
        ref = spec.threshold if spec.kind == "descriptive" else 0.0
        return a, [float(ref or 0.0)] * len(a)
    if baseline is None:
        raise ValueError(f"claim {spec.id!r}: the baseline {spec.baseline!r} values are missing")
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return a, [float(baseline)] * len(a)
    bkeys, b = _values(spec, baseline, "baseline")  # type: ignore[arg-type]
    if keys is not None and bkeys is not None:
        if keys != bkeys and set(keys) == set(bkeys):
            lookup = dict(zip(bkeys, b))
            b = [lookup[k] for k in keys]
        elif keys != bkeys:
            raise ValueError(f"claim {spec.id!r}: arm and baseline are not paired (seeds {keys} vs {bkeys})")
    if len(a) != len(b):
        raise ValueError(f"claim {spec.id!r}: arm and baseline have {len(a)} and {len(b)} values; pair them by seed")
    return a, b


def _activity(spec: ClaimSpec, activity: Values | None) -> float | None:
    if spec.activity is None:
        if activity is not None:
            raise ValueError(f"claim {spec.id!r} declared no activity measure; declare one in its ClaimSpec first")
        return None
    if activity is None:
        raise ValueError(f"claim {spec.id!r} declared the activity measure {spec.activity.name!r}: pass its values")
    _, values = _values(spec, activity, "activity")
    return _mean(values)


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _sd(values: Sequence[float]) -> float | None:
    if len(values) < 2:
        return None
    m = _mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def _sig(x: float | None, digits: int = RECORD_DIGITS) -> float | str | None:
    if x is None:
        return None
    if not math.isfinite(x):
        return str(x)
    return float(f"{x:.{digits}g}")


def _fmt(x: float) -> str:
    """A number in prose: 3 significant digits, no exponent for ordinary magnitudes."""
    if not math.isfinite(x):
        return "∞" if x > 0 else "−∞"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.2e}"
    return f"{x:.3g}"


def _fmt_spread(mean: float | None, sd: float | None) -> str:
    """``95.88 ± 0.50``: the mean to the precision its seed-to-seed spread carries (two digits of the sd)."""
    if mean is None:
        return "—"
    if sd is None:
        return _fmt(mean)
    if sd == 0:
        return f"{_fmt(mean)} ± 0"
    d = decimals_for(sd)
    return f"{mean:.{d}f} ± {sd:.{d}f}"


def decimals_for(halfwidth: float, significant: int = 2) -> int:
    """Decimals that show a number to the precision an interval of this half-width carries.

    Two significant digits of the half-width: 2.3 -> 1 decimal, 0.023 -> 3; 0 or ``inf`` -> 2.
    """
    if not math.isfinite(halfwidth) or halfwidth <= 0:
        return 2
    return max(0, significant - 1 - math.floor(math.log10(halfwidth)))


def format_interval(effect: float, lo: float, hi: float) -> str:
    """``+3.4 [1.1, 5.7]``: an effect and its interval, rounded to the precision the interval carries."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{effect:+.3g} [−∞, ∞]"
    d = decimals_for((hi - lo) / 2)
    return f"{effect:+.{d}f} [{lo:+.{d}f}, {hi:+.{d}f}]"


def format_effect(claim: Claim) -> str:
    """The claim's effect and interval as :func:`format_interval` writes them (an identity: its worst deviation)."""
    if claim.spec.kind == "identity":
        return _fmt(claim.effect)
    return format_interval(claim.effect, *claim.interval)


VERDICT_MARKS: dict[str, str] = {"reproduced": "✅", "not reproduced": "❌", "inconclusive": "❔"}


def claims_frame(claims: Sequence[Claim]):
    """The claims as a reader's table: claim, kind, paper, ours, effect [95 % interval], margin, verdict."""
    import pandas as pd

    rows = []
    for c in claims:
        s = c.spec
        margin = {"superiority": f"{_fmt(s.margin)}", "non-inferiority": f"−{_fmt(s.margin)}",
                  "equivalence": f"±{_fmt(s.margin)}", "descriptive": f"threshold {_fmt(s.threshold or 0.0)}",
                  "identity": f"tolerance {_fmt(s.tolerance or 0.0)}"}[s.kind]
        rows.append({
            "Claim": ("★ " if s.central else "") + s.id,
            "Kind": s.kind,
            "Paper": s.paper or "—",
            "Ours": c.ours(),
            "Effect [95 % CI]": format_effect(c),
            "Margin": margin,
            "Activity": "—" if s.activity is None else f"{s.activity.name}: {_fmt(c.activity or 0.0)} {s.activity.unit}",
            "Verdict": f"{VERDICT_MARKS[c.verdict]} {c.verdict}",
        })
    return pd.DataFrame(rows).set_index("Claim")
