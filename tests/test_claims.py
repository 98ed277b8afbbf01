"""The claims protocol on hand-made cases: a clear win, a clear loss, a tie inside the margin, an inert mechanism."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from shared.book import ActivitySpec, ClaimSpec, start_chapter
from shared.book.claims import decimals_for, format_effect, mean_interval


def spec(kind="superiority", **kw) -> ClaimSpec:
    base = dict(id="c", statement="A beats B.", source="Table 1", kind=kind, metric="accuracy (%)", setting="toy",
                arm="A", baseline="B", margin=1.0, n_seeds=4)
    if kind == "descriptive":
        base.update(baseline=None, threshold=0.5)
    if kind == "identity":
        base.update(baseline=None, tolerance=1e-6)
    base.update(kw)
    return ClaimSpec(**base)


B = [50.0, 51.0, 49.0, 50.0]


def test_interval_is_the_student_t_interval():
    x = [1.0, 2.0, 4.0, 7.0]
    m, lo, hi = mean_interval(x)
    half = stats.t.ppf(0.975, 3) * stats.tstd(x) / math.sqrt(4)
    assert m == pytest.approx(3.5) and lo == pytest.approx(3.5 - half) and hi == pytest.approx(3.5 + half)
    assert mean_interval([2.0]) == (2.0, -math.inf, math.inf)
    assert mean_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)


def test_clear_win_is_reproduced():
    c = spec().judge([55.0, 56.5, 54.0, 55.0], B)
    assert c.verdict == "reproduced" and c.effect == pytest.approx(5.125)
    assert c.interval[0] > 1.0


def test_clear_loss_is_not_reproduced():
    c = spec().judge([45.0, 46.0, 44.5, 45.5], B)
    assert c.verdict == "not reproduced" and c.interval[1] < 1.0


def test_win_smaller_than_the_margin_is_not_a_superiority():
    # a real but small gain (+0.5 everywhere) is excluded from "at least 1 point"
    c = spec().judge([b + 0.5 for b in B], B)
    assert c.verdict == "not reproduced"
    assert spec(margin=0.0).judge([b + 0.5 for b in B], B).verdict == "reproduced"


def test_tie_inside_the_margin():
    arm = [b + d for b, d in zip(B, [0.1, -0.1, 0.05, 0.0])]
    assert spec().judge(arm, B).verdict == "not reproduced"  # superiority by >= 1 excluded
    assert spec(margin=0.0).judge(arm, B).verdict == "inconclusive"  # noisy tie: cannot tell
    assert spec("non-inferiority").judge(arm, B).verdict == "reproduced"
    assert spec("equivalence").judge(arm, B).verdict == "reproduced"
    assert spec("equivalence", margin=0.1).judge(arm, B).verdict == "inconclusive"


def test_non_inferiority_never_passes_a_superiority_claim():
    arm = [50.2, 51.1, 49.0, 50.3]
    assert spec("non-inferiority").judge(arm, B).verdict == "reproduced"
    assert spec("superiority", margin=0.0).judge(arm, B).verdict == "inconclusive"


def test_lower_is_better_flips_the_sign():
    c = spec(higher_is_better=False).judge([45.0, 46.0, 44.5, 45.5], B)  # errors: A has fewer
    assert c.verdict == "reproduced" and c.effect > 0


def test_inert_mechanism_is_inconclusive_whatever_the_score():
    s = spec(activity=ActivitySpec("fraction of tokens clipped", "fraction", inert_at=0.001))
    win = [55.0, 56.5, 54.0, 55.0]
    c = s.judge(win, B, activity=[0.0002, 0.0001, 0.0, 0.0003])
    assert c.verdict == "inconclusive" and "inert" in c.reason and c.record()["activity"]["inert"] is True
    assert s.judge(win, B, activity=[0.2, 0.1, 0.15, 0.3]).verdict == "reproduced"
    with pytest.raises(ValueError, match="pass its values"):
        s.judge(win, B)
    with pytest.raises(ValueError, match="declared no activity"):
        spec().judge(win, B, activity=[1, 1, 1, 1])


def test_too_few_seeds_is_inconclusive():
    c = spec(n_seeds=2).judge([60.0, 61.0], [50.0, 50.0])
    assert c.verdict == "inconclusive" and "at least 3" in c.reason


def test_descriptive_and_identity():
    d = spec("descriptive").judge([0.8, 0.9, 0.85, 0.95])
    assert d.verdict == "reproduced" and d.baseline_mean == 0.5
    assert spec("descriptive").judge([0.1, 0.2, 0.15, 0.05]).verdict == "not reproduced"
    low = spec("descriptive", higher_is_better=False, threshold=-0.8)  # "the correlation is below -0.8"
    held = low.judge([-0.9, -0.95, -0.92, -0.97])
    assert held.verdict == "reproduced" and held.effect == pytest.approx(-0.935)  # the statistic itself
    assert low.judge([0.1, 0.0, -0.1, 0.05]).verdict == "not reproduced"
    assert low.judge([-0.9, -0.5, -0.95, -0.6]).verdict == "inconclusive"
    i = spec("identity").judge([1e-9, -3e-8, 2e-7])
    assert i.verdict == "reproduced" and i.effect == pytest.approx(2e-7)
    assert spec("identity").judge([1e-9, 1e-3]).verdict == "not reproduced"


def test_pairing_by_seed_and_bad_inputs():
    s = spec()
    a = {0: 55.0, 1: 56.0, 2: 54.0, 3: 55.0}
    b = {3: 50.0, 2: 49.0, 1: 51.0, 0: 50.0}
    assert s.judge(a, b).effect == pytest.approx(s.judge([55, 56, 54, 55], [50, 51, 49, 50]).effect)
    with pytest.raises(ValueError, match="not paired"):
        s.judge(a, {9: 1.0, 1: 1.0, 2: 1.0, 3: 1.0})
    with pytest.raises(ValueError, match="declared with 4 seeds"):
        s.judge([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="finite"):
        s.judge([1.0, 2.0, math.nan, 3.0], B)
    with pytest.raises(ValueError, match="baseline"):
        s.judge([1.0, 2.0, 3.0, 4.0])
    assert s.judge([52.0, 53.0, 52.5, 52.0], 50.0).verdict == "reproduced"  # a fixed reference value
    import pandas as pd

    sa, sb = pd.Series(a), pd.Series(b)  # pandas Series pair by their index, whatever the order
    assert s.judge(sa, sb).effect == pytest.approx(s.judge(a, b).effect)


def test_declarations_are_validated():
    with pytest.raises(ValueError, match="central claim must be comparative"):
        spec("identity", central=True)
    with pytest.raises(ValueError, match="baseline"):
        spec(baseline=None)
    with pytest.raises(ValueError, match="margin"):
        spec(margin=-1.0)
    with pytest.raises(ValueError, match="kind"):
        spec("better")
    with pytest.raises(ValueError, match="equivalence claim needs a margin"):
        spec("equivalence", margin=0.0)


def test_display_precision_follows_the_interval():
    assert decimals_for(2.3) == 1 and decimals_for(0.023) == 3 and decimals_for(40.0) == 0
    c = spec().judge([55.0, 56.5, 54.0, 55.0], B)
    text = format_effect(c)
    assert text == "+5.12 [+4.73, +5.52]"  # half-width 0.39: two significant digits of it


def test_chapter_run_declares_before_it_judges(tmp_path, monkeypatch):
    from dataclasses import dataclass

    from shared.book import setting

    monkeypatch.setenv("ENTROPY_BOOK_RESULTS_DIR", str(tmp_path))

    @dataclass(frozen=True)
    class Toy:
        n_seeds: int = setting(low=1, high=10, doc="seeds")

    run = start_chapter("templates", "toy", profile="quick", seed=7, presets={"quick": Toy(n_seeds=4), "paper": Toy(n_seeds=4)})
    assert run.seeds == [7, 8, 9, 10]
    run.declare(spec(central=True), spec(id="side", kind="descriptive"))
    with pytest.raises(ValueError, match="already declared"):
        run.declare(spec())
    with pytest.raises(KeyError, match="never declared"):
        run.judge("other", [1.0] * 4, B)
    run.judge("c", [55.0, 56.5, 54.0, 55.0], B)
    with pytest.raises(RuntimeError, match="declare every claim first"):
        run.declare(spec(id="late"))
    with pytest.raises(ValueError, match="without a verdict: side"):
        run.finish(metrics={"x": 1})
    run.judge("side", [0.8, 0.9, 0.85, 0.95])
    path = run.finish(metrics={"x": 1})
    from shared.book import load_results

    doc = load_results(path)
    assert [c["verdict"] for c in doc["claims"]] == ["reproduced", "reproduced"]
    assert doc["claims"][0]["n_seeds"] == 4 and doc["claims"][0]["kind"] == "superiority"
    assert list(run.claims_table().columns)[-1] == "Verdict"
