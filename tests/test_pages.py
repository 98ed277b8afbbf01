"""The generated pages (toc, scoreboard, part tables) and the book's configuration."""

from __future__ import annotations

import json
from collections import Counter

import yaml
from helpers import ROOT, executable_notebooks

from shared.book.pages import PART_TITLES, build_rows, load_papers, render, scoreboard_page


def test_papers_list_is_the_catalog_74_in_six_parts():
    papers = load_papers(ROOT)
    assert [p["number"] for p in papers] == list(range(1, 75))
    assert len({p["slug"] for p in papers}) == 74
    assert Counter(p["part"] for p in papers) == {"tta": 10, "rl": 17, "inference": 10, "evaluation": 14, "training": 17, "compression": 6}
    assert all(p["central_claim"] and p["title"] and p["paper_url"] for p in papers)


def test_scoreboard_lists_all_74_papers_by_part():
    page = scoreboard_page(build_rows(ROOT))
    rows = [line for line in page.splitlines() if line.startswith("| ") and line[2:4].isdigit()]
    assert len(rows) == 74
    assert [line for line in page.splitlines() if line.startswith("## ")] == [f"## {t}" for t in PART_TITLES.values()]


def test_a_written_chapter_shows_its_central_claim_and_verdict(tmp_path):
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "papers.yml").write_text((ROOT / "book" / "papers.yml").read_text())
    (tmp_path / "chapters" / "tta").mkdir(parents=True)
    (tmp_path / "chapters" / "tta" / "sar.ipynb").write_text("{}")
    (tmp_path / "results" / "tta").mkdir(parents=True)
    from shared.book import ClaimSpec

    claim = ClaimSpec("central", "SAR beats Tent | under label shift.", "README table", "superiority", "online accuracy (%)",
                      "digits-c GN, label shift", "SAR", "Tent", margin=1.0, n_seeds=3, central=True,
                      paper="SAR 37.2 % vs Tent 22.0 %, ResNet-50 GN (README table)").judge([40.0, 41.0, 40.5], [40.2, 40.9, 40.6])
    doc = {"part": "tta", "slug": "sar", "claims": [claim.record()], "runtime_s": 12.4}
    (tmp_path / "results" / "tta" / "sar.quick.json").write_text(json.dumps(doc))
    row = next(r for r in build_rows(tmp_path) if r.slug == "sar")
    assert (row.chapter, row.verdict, row.runtime_s, row.stability) == ("chapters/tta/sar.ipynb", "not reproduced", 12.4, "not checked")
    assert row.paper.startswith("SAR 37.2 %") and "3 seeds" in row.ours and "(margin 1)" in row.effect
    page = scoreboard_page(build_rows(tmp_path))
    assert "[Towards Stable Test-Time Adaptation in Dynamic Wild World](../chapters/tta/sar.ipynb)" in page
    assert "SAR beats Tent \\| under label shift." in page and "1 of 74 chapters written" in page
    # a verdict that did not hold on the second set of seeds is marked fragile
    (tmp_path / "results" / "robustness.json").write_text(json.dumps({"alt_seed": 1000, "chapters": {"tta/sar": {"claims": {
        "central": {"verdict": "not reproduced", "alt_verdict": "inconclusive", "held": False}}}}}))
    row = next(r for r in build_rows(tmp_path) if r.slug == "sar")
    assert row.stability == "fragile" and "⚠ fragile" in scoreboard_page(build_rows(tmp_path))


def test_generated_pages_are_up_to_date():
    for path, text in render(ROOT).items():
        assert path.exists() and path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run `make pages`"


def test_toc_holds_every_book_page_and_chapter():
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    files = {c["file"] for part in toc["parts"] for c in part["chapters"]}
    files |= {s["file"] for part in toc["parts"] for c in part["chapters"] for s in c.get("sections", [])}
    for nb in executable_notebooks():
        rel = nb.relative_to(ROOT).with_suffix("").as_posix()
        assert rel in files or rel.startswith("templates/"), f"{rel} is not in book/_toc.yml"
    assert {f"book/parts/{p}" for p in PART_TITLES} <= files


def test_notebooks_install_from_the_configured_repository():
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    for nb in executable_notebooks():
        cells = json.loads(nb.read_text())["cells"]
        setup = "".join(next(c for c in cells if "find_spec(\"shared\")" in "".join(c["source"]))["source"])
        assert f"git+{url}" in setup, f"{nb.name}: its setup cell installs from another repository"


def test_every_notebook_starts_with_a_tagged_parameters_cell():
    for nb in executable_notebooks():
        code = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
        assert "parameters" in code[0]["metadata"].get("tags", []), f"{nb.name}: first code cell is not tagged 'parameters'"
        assert 'profile = "quick"' in "".join(code[0]["source"])
        assert any(c.get("outputs") for c in code), f"{nb.name}: no stored outputs"


def test_the_rendered_page_opens_on_the_prose_not_on_the_plumbing():
    """The setup cell (pip install) is collapsed whole and the settings cell shows only its output."""
    for nb in executable_notebooks():
        cells = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
        setup = next(c for c in cells if 'find_spec("shared")' in "".join(c["source"]))
        settings = next(c for c in cells if "start_chapter(" in "".join(c["source"]))
        assert "hide-cell" in setup["metadata"].get("tags", []), f"{nb.name}: setup cell not tagged 'hide-cell'"
        assert "hide-input" in settings["metadata"].get("tags", []), f"{nb.name}: settings cell not tagged 'hide-input'"


def test_part_overview_collects_every_chapters_benchmark_arm(tmp_path):
    from shared.book.pages import benchmark_rows, overview_figure, overview_page

    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "papers.yml").write_text((ROOT / "book" / "papers.yml").read_text())
    (tmp_path / "results" / "tta").mkdir(parents=True)
    for slug, method, score in [("sar", "sar", 20.0), ("eata", "eata", 22.5)]:
        bench = {"name": "stream", "unit": "online error (%)", "method": method, "lower_is_better": True,
                 "scores": {"source": 60.0, "tent": 25.0, method: score}}
        (tmp_path / "results" / "tta" / f"{slug}.quick.json").write_text(json.dumps({"metrics": {"benchmark": bench}}))
    rows = benchmark_rows(tmp_path, "tta")
    assert [(r["arm"], r["score"], r["chapters"]) for r in rows] == [
        ("sar", 20.0, ["sar"]), ("eata", 22.5, ["eata"]), ("tent", 25.0, []), ("source", 60.0, [])]
    page = overview_page(tmp_path, "tta")
    assert "| sar | 20.0 | [sar](../../chapters/tta/sar.ipynb) |" in page and "| tent | 25.0 | baseline |" in page
    assert overview_figure(tmp_path, "tta", tmp_path / "fig.png") and (tmp_path / "fig.png").stat().st_size > 1000
    assert overview_page(tmp_path, "rl").startswith("No chapter")


def test_part_overview_draws_every_entropy_accuracy_trajectory(tmp_path):
    from shared.book.pages import entropy_accuracy_figure, entropy_accuracy_records, overview_page

    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "papers.yml").write_text((ROOT / "book" / "papers.yml").read_text())
    (tmp_path / "results" / "rl").mkdir(parents=True)
    rec = {"name": "tiny-LM addition", "method": "clip-cov",
           "points": {"grpo": {"entropy": [0.5, 0.2], "accuracy": [0.3, 0.5]}, "clip-cov": {"entropy": [0.5, 0.4], "accuracy": [0.3, 0.52]}}}
    (tmp_path / "results" / "rl" / "entropy-mechanism.quick.json").write_text(json.dumps({"metrics": {"entropy_accuracy": rec}}))
    rows = entropy_accuracy_records(tmp_path, "rl")
    assert [(r["arm"], r["own"]) for r in rows] == [("grpo", False), ("clip-cov", True)]
    assert "| [entropy-mechanism](../../chapters/rl/entropy-mechanism.ipynb) | clip-cov | 0.500 → 0.400 | 0.300 → 0.520 |" in overview_page(tmp_path, "rl")
    assert entropy_accuracy_figure(tmp_path, "rl", tmp_path / "f.png") and (tmp_path / "f.png").exists()
