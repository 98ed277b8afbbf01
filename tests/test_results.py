"""Results files: writing, the schema, verdicts, and the committed files themselves."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch
from helpers import ROOT, executable_notebooks

from shared.book import ClaimSpec
from shared.book.claims import EMPIRICAL_KINDS, MIN_SEEDS
from shared.book.results import SCHEMA_PATH, load_results, validate_results, write_results
from shared.book.robustness import ROBUSTNESS_FILE

SCHEMA = json.loads(SCHEMA_PATH.read_text())


def _claim(id="central", **kw):
    spec = dict(statement="Method beats baseline.", source="Table 1", kind="superiority", metric="accuracy (%)",
                setting="toy", arm="method", baseline="baseline", margin=1.0, n_seeds=3, central=True)
    spec.update(kw)
    return ClaimSpec(id, **spec).judge([60.0, 61.0, 60.5], [50.0, 50.5, 49.5])


def test_write_results_round_trips_and_follows_the_schema(tmp_path, monkeypatch):
    monkeypatch.setenv("ENTROPY_BOOK_RESULTS_DIR", str(tmp_path))
    path = write_results("tta", "sar", "quick", seed=0, runtime_s=1.234, settings={"lr": 0.1},
                         metrics={"acc": np.float32(0.8125), "curve": torch.tensor([1.0, 2.0]), "x": 1 / 3},
                         claims=[_claim()])
    assert path == tmp_path / "tta" / "sar.quick.json"
    doc = load_results(path)
    jsonschema.validate(doc, SCHEMA)
    assert doc["metrics"] == {"acc": 0.8125, "curve": [1.0, 2.0], "x": 0.333333}  # 6 significant digits
    c = doc["claims"][0]
    assert c["verdict"] == "reproduced" and c["kind"] == "superiority" and c["n_seeds"] == 3 and c["margin"] == 1.0
    assert c["effect"] == 10.5 and c["interval"][0] > 1.0 and doc["runtime_s"] == 1.2
    assert doc["environment"]["packages"]["torch"].startswith("2.") and doc["environment"]["kernels"] == "pinned-v1"


def test_write_results_refuses_no_claims_duplicate_ids_and_hand_made_claims(tmp_path, monkeypatch):
    monkeypatch.setenv("ENTROPY_BOOK_RESULTS_DIR", str(tmp_path))
    kw = dict(seed=0, runtime_s=1.0, metrics={"a": 1})
    with pytest.raises(ValueError, match="at least one claim"):
        write_results("tta", "sar", "quick", claims=[], **kw)
    with pytest.raises(ValueError, match="unique"):
        write_results("tta", "sar", "quick", claims=[_claim(), _claim()], **kw)
    with pytest.raises(TypeError, match="claims protocol"):
        write_results("tta", "sar", "quick", claims=[{"id": "central", "verdict": "reproduced"}], **kw)


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d.pop("claims"), "claims"),
    (lambda d: d["claims"][0].update(verdict="yes"), "verdict"),
    (lambda d: d.update(profile="bogus"), "profile"),
    (lambda d: d.update(extra=1), "extra"),
])
def test_schema_rejects_malformed_results(tmp_path, monkeypatch, mutate, where):
    monkeypatch.setenv("ENTROPY_BOOK_RESULTS_DIR", str(tmp_path))
    doc = json.loads(write_results("tta", "sar", "quick", seed=0, runtime_s=1.0, metrics={"a": 1}, claims=[_claim()]).read_text())
    mutate(doc)
    with pytest.raises(ValueError, match="do not follow the schema"):
        validate_results(doc)


def test_every_committed_results_file_follows_the_schema():
    files = sorted(p for p in (ROOT / "results").rglob("*.json") if p != ROOT / ROBUSTNESS_FILE)
    assert files, "no results files committed"
    for path in files:
        doc = load_results(path)
        part, name = path.parent.name, path.name
        assert name == f"{doc['slug']}.{doc['profile']}.json" and part == doc["part"], path


def test_every_notebook_has_a_quick_results_file_with_verdicts():
    for nb in executable_notebooks():
        expected = ROOT / "results" / nb.parent.name / f"{nb.stem}.quick.json"
        assert expected.exists(), f"{nb.relative_to(ROOT)} has no {expected.relative_to(ROOT)}"
        claims = load_results(expected)["claims"]
        assert sum(c["central"] for c in claims) == 1, f"{expected.name}: exactly one central claim"


def test_every_quick_empirical_claim_has_enough_seeds_and_a_protocol_verdict():
    """Done-when of the claims protocol: kind, margin, >= 3 seeds, interval and verdict on every empirical claim."""
    for nb in executable_notebooks():
        path = ROOT / "results" / nb.parent.name / f"{nb.stem}.quick.json"
        for c in load_results(path)["claims"]:
            where = f"{path.relative_to(ROOT)}: claim {c['id']!r}"
            if c["kind"] in EMPIRICAL_KINDS:
                assert c["n_seeds"] >= MIN_SEEDS, f"{where} has {c['n_seeds']} seed(s)"
                assert len(c["interval"]) == 2 and c["reason"], where
            if c["central"]:
                assert c["kind"] in ("superiority", "non-inferiority", "equivalence"), where


def test_central_claim_is_rejudged_identically_from_its_record():
    """The verdict in a results file is what the protocol gives for its effect and interval (no hand edits)."""
    from shared.book.claims import _descriptive, _equivalence, _one_sided

    for nb in executable_notebooks():
        path = ROOT / "results" / nb.parent.name / f"{nb.stem}.quick.json"
        for c in load_results(path)["claims"]:
            lo, hi = c["interval"]
            if c["kind"] not in EMPIRICAL_KINDS or isinstance(lo, str) or isinstance(hi, str) or c["n_seeds"] < MIN_SEEDS:
                continue
            if c["activity"] and c["activity"]["inert"]:
                assert c["verdict"] == "inconclusive", path
                continue
            if c["kind"] == "equivalence":
                expected = _equivalence(lo, hi, c["margin"])[0]
            elif c["kind"] == "descriptive":
                expected = _descriptive(lo, hi, c["threshold"], c["higher_is_better"])[0]
            else:
                expected = _one_sided(lo, hi, c["margin"] if c["kind"] == "superiority" else -c["margin"], c["kind"], c["margin"])[0]
            assert c["verdict"] == expected, f"{path.name}: {c['id']}"
