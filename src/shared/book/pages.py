"""Generate the book's bookkeeping pages from the catalog and the results files.

``python -m shared.book.pages`` writes:

- ``book/_toc.yml``: intro, the book's own pages, then the six parts, each with its intro page and
  the chapters that exist (in catalog order);
- ``book/scoreboard.md``: all 74 papers by part, with the chapter link (or "not yet written"), the
  central claim and its verdict (marked *fragile* when it did not hold on a second set of seeds,
  see :mod:`shared.book.robustness`), the paper's own number, ours with its setting and spread, the
  paired effect with its interval against the declared margin, and the quick runtime;
- ``book/_generated/<part>.md``: the same rows for one part, included by the part's intro page;
- ``book/_generated/<part>-overview.md`` and ``<part>-benchmark.png``: every method of the part on the
  part's common benchmark (``metrics["benchmark"]`` in the results files), table and figure.

Nothing here is typed by hand: rows come from ``book/papers.yml``, ``results/<part>/<slug>.quick.json``
and ``results/robustness.json``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shared.book.claims import format_interval
from shared.book.results import find_book_root
from shared.book.robustness import load_robustness, stability

PART_TITLES: dict[str, str] = {
    "tta": "Test-time adaptation",
    "rl": "Entropy in RL for reasoning models",
    "inference": "Test-time compute, decoding and search",
    "evaluation": "Testing, detection and evaluation",
    "training": "Losses, objectives and optimisation",
    "compression": "Compression and efficiency",
}
"""The six parts of the catalog, in book order."""

BOOK_PAGES: tuple[str, ...] = ("book/entropy-in-one-page",)
"""The book's own executed pages, placed before the parts."""

VERDICT_MARK: dict[str, str] = {"reproduced": "✅ reproduced", "not reproduced": "❌ not reproduced", "inconclusive": "➖ inconclusive"}


@dataclass(frozen=True)
class Row:
    """One paper's line on the scoreboard."""

    number: int
    slug: str
    part: str
    title: str
    chapter: str | None  # the notebook's path from the book root, when it exists
    claim: str
    paper: str
    ours: str
    verdict: str
    runtime_s: float | None
    effect: str = "—"
    stability: str = "not checked"


def load_papers(root: Path) -> list[dict[str, Any]]:
    """The 74 papers of ``book/papers.yml`` (copied from the catalog), in catalog order."""
    papers = yaml.safe_load((root / "book" / "papers.yml").read_text())
    return sorted(papers, key=lambda p: p["number"])


def _cell(value: Any) -> str:
    """Text safe inside a Markdown table cell."""
    if value is None or value == "":
        return "—"
    if isinstance(value, float):
        value = f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _central_claim(results: dict[str, Any]) -> dict[str, Any]:
    """The claim declared central (every results file has exactly one)."""
    central = [c for c in results["claims"] if c["central"]]
    if len(central) != 1:
        raise ValueError(f"{results['part']}/{results['slug']}: expected one central claim, found {len(central)}")
    return central[0]


def effect_cell(claim: dict[str, Any]) -> str:
    """``+3.4 [1.1, 5.7] (margin 1)``: the paired effect and its interval, to the precision the interval carries."""
    lo, hi = claim["interval"]
    if claim["kind"] == "identity":
        return f"worst deviation {claim['effect']:.2g} (tolerance {claim['tolerance']:.2g})"
    if isinstance(lo, str) or isinstance(hi, str):
        return f"{claim['effect']:+.3g} (one seed: no interval)"
    bar = {"superiority": f"margin {claim['margin']:g}", "non-inferiority": f"margin −{claim['margin']:g}",
           "equivalence": f"margin ±{claim['margin']:g}", "descriptive": f"threshold {claim['threshold']}"}[claim["kind"]]
    return f"{format_interval(claim['effect'], lo, hi)} ({bar})"


def paper_cell(claim: dict[str, Any]) -> str:
    """The paper's own number (with its table or figure), or a dash: never our threshold."""
    return _cell(claim["paper"])


def build_rows(root: Path) -> list[Row]:
    """One :class:`Row` per paper, filled from its quick results file when the chapter exists."""
    rows = []
    robustness = load_robustness(root)
    for paper in load_papers(root):
        notebook = root / "chapters" / paper["part"] / f"{paper['slug']}.ipynb"
        results_file = root / "results" / paper["part"] / f"{paper['slug']}.quick.json"
        chapter = notebook.relative_to(root).as_posix() if notebook.exists() else None
        if chapter and results_file.exists():
            res = json.loads(results_file.read_text())
            central = _central_claim(res)
            rows.append(Row(paper["number"], paper["slug"], paper["part"], paper["title"], chapter, central["statement"],
                            paper_cell(central), _cell(central["ours"]), central["verdict"], res["runtime_s"],
                            effect_cell(central),
                            stability(robustness, f"{paper['part']}/{paper['slug']}", central["id"], central["verdict"])))
        else:
            rows.append(Row(paper["number"], paper["slug"], paper["part"], paper["title"], chapter, paper["central_claim"],
                            _cell(paper.get("paper_number")), "—", "not yet written", None))
    return rows


def _link(row: Row, from_dir: str) -> str:
    """A Markdown link to the chapter relative to the page in ``from_dir``, or the plain title."""
    title = _cell(row.title)
    if row.chapter is None:
        return title
    depth = len(Path(from_dir).parts)
    return f"[{title}]({'../' * depth}{row.chapter})"


def part_table(rows: list[Row], from_dir: str) -> str:
    """The Markdown table of ``rows`` for a page in the folder ``from_dir`` (relative to the root)."""
    head = (":::{container} scoreboard\n| # | paper | central claim | verdict | paper's number | ours (quick profile) "
            "| effect [95 % CI] | quick runtime |\n|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r.number:02d} | {_link(r, from_dir)} | {_cell(r.claim)} | {verdict_cell(r)} | {r.paper} | {r.ours} | "
        f"{_cell(r.effect)} | {'—' if r.runtime_s is None else f'{r.runtime_s:.0f} s'} |\n"
        for r in rows
    )
    return head + body + ":::\n"


def verdict_cell(row: Row) -> str:
    """The verdict, marked fragile when it did not hold on the second set of seeds."""
    mark = VERDICT_MARK.get(row.verdict, row.verdict)
    if row.chapter is None:
        return mark
    return mark + {"fragile": " (⚠ fragile)", "stable": "", "not checked": " (stability not checked)"}[row.stability]


def scoreboard_page(rows: list[Row]) -> str:
    """The scoreboard: a summary line, then one table per part."""
    written = [r for r in rows if r.chapter is not None]
    verdicts = Counter(r.verdict for r in written)
    summary = ", ".join(f"{verdicts[v]} {v}" for v in ("reproduced", "not reproduced", "inconclusive"))
    runtime = sum(r.runtime_s or 0.0 for r in written)
    parts = []
    for part, title in PART_TITLES.items():
        part_rows = [r for r in rows if r.part == part]
        parts.append(f"## {title}\n\n{part_table(part_rows, 'book')}")
    return (
        "---\nhtml_theme.sidebar_secondary.remove: true\n---\n\n"  # the tables need the full width
        "# Scoreboard\n\n"
        "<!-- Generated by `python -m shared.book.pages` from book/papers.yml and results/; do not edit. -->\n\n"
        "Every paper of the book, its central claim and our verdict at the quick profile. *Paper's number* is "
        "the paper's own result, with its table or figure and setting; *ours* is our testbed's, with its unit "
        "and the seed-to-seed spread; the *effect* is the paired difference against the declared baseline, "
        "with its 95 % interval over seeds and the margin declared before the run. Every verdict comes from "
        "the book's claims protocol (`shared.book.claims`): *reproduced* only when the interval clears the "
        "margin, *not reproduced* when it excludes the claim, *inconclusive* otherwise or when the mechanism "
        "measurably does nothing. A verdict marked *fragile* changed when the chapter was re-run on a second, "
        "disjoint set of seeds (`make robustness`). A chapter never tunes seeds or thresholds to make an "
        "effect appear.\n\n"
        f"**Progress:** {len(written)} of {len(rows)} chapters written; central claims: {summary}; "
        f"{sum(r.stability == 'fragile' for r in written)} fragile. "
        f"Total quick runtime of the written chapters: {runtime:.0f} s.\n\n" + "\n".join(parts)
    )


def toc(root: Path, rows: list[Row]) -> dict[str, Any]:
    """The ``_toc.yml`` structure: intro and book pages, then one part per catalog part."""
    parts: list[dict[str, Any]] = [
        {"caption": "The book", "chapters": [{"file": p} for p in BOOK_PAGES] + [{"file": "book/scoreboard"}]},
    ]
    for part, title in PART_TITLES.items():
        chapters = [{"file": r.chapter.removesuffix(".ipynb")} for r in rows if r.part == part and r.chapter]
        entry: dict[str, Any] = {"file": f"book/parts/{part}"}
        if chapters:
            entry["sections"] = chapters
        parts.append({"caption": title, "chapters": [entry]})
    parts.append({"caption": "Back matter", "chapters": [{"file": "book/bibliography"}]})
    return {"format": "jb-book", "root": "book/intro", "parts": parts}


def benchmark_rows(root: Path, part: str) -> list[dict[str, Any]]:
    """Every arm reported on the part's common benchmark (``metrics["benchmark"]`` of its quick results).

    Arms that several chapters report (the baselines) appear once; a chapter's own method is credited
    to that chapter. Rows are sorted from best to worst.
    """
    arms: dict[str, dict[str, Any]] = {}
    for paper in load_papers(root):
        if paper["part"] != part:
            continue
        path = root / "results" / part / f"{paper['slug']}.quick.json"
        if not path.exists():
            continue
        bench = json.loads(path.read_text())["metrics"].get("benchmark")
        if not bench:
            continue
        for arm, score in bench["scores"].items():
            row = arms.setdefault(arm, {"arm": arm, "scores": [], "chapters": [], "name": bench["name"],
                                        "unit": bench["unit"], "lower_is_better": bench.get("lower_is_better", True)})
            row["scores"].append(float(score))
            if arm == bench["method"]:
                row["chapters"].append(paper["slug"])
    rows = [dict(r, score=sum(r["scores"]) / len(r["scores"]), spread=max(r["scores"]) - min(r["scores"])) for r in arms.values()]
    return sorted(rows, key=lambda r: r["score"] if r["lower_is_better"] else -r["score"])


def canonical_setting(name: str) -> str:
    """One spelling per setting, so chapters' panels merge: "tiny-LM countdown (3,)" → "tiny-LM countdown 3"."""
    words = re.findall(r"[a-z]+|\d+", name.lower())
    task = [w for w in words if w.isalpha() and w not in ("tiny", "lm")]
    digits = [w for w in words if w.isdigit()]
    return f"tiny-LM {' '.join(task)} {'-'.join(digits)}".strip() if "lm" in words else name


def entropy_accuracy_records(root: Path, part: str) -> list[dict[str, Any]]:
    """Every arm's entropy-accuracy trajectory (``metrics["entropy_accuracy"]`` of the part's quick results).

    A record is ``{"name": ..., "method": <the chapter's arm>, "points": {arm: {"entropy": [...], "accuracy": [...]}}}``:
    the RL chapters store policy entropy and held-out accuracy at each evaluation step.
    """
    rows = []
    for paper in load_papers(root):
        path = root / "results" / part / f"{paper['slug']}.quick.json"
        if paper["part"] != part or not path.exists():
            continue
        rec = json.loads(path.read_text())["metrics"].get("entropy_accuracy")
        if rec:
            for arm, pts in rec["points"].items():
                rows.append({"chapter": paper["slug"], "arm": arm, "own": arm == rec["method"], "name": canonical_setting(rec["name"]),
                             "entropy": pts["entropy"], "accuracy": pts["accuracy"]})
    return rows


def overview_page(root: Path, part: str) -> str:
    """The part intro's "every method side by side" section, from the results files."""
    parts = []
    rows = benchmark_rows(root, part)
    if rows:
        lines = [f"All methods on one stream: **{rows[0]['name']}**; {rows[0]['unit']}, "
                 f"{'lower' if rows[0]['lower_is_better'] else 'higher'} is better. The figure and the table are "
                 "generated from the chapters' results files.\n",
                 f"![Every method of the part on the common benchmark](../_generated/{part}-benchmark.png)\n",
                 f"| method | {rows[0]['unit']} | chapter |", "|---|---|---|"]
        for r in rows:
            chapters = ", ".join(f"[{c}](../../chapters/{part}/{c}.ipynb)" for c in r["chapters"]) or "baseline"
            note = f" (spread {r['spread']:.2f} across chapters)" if r["spread"] > 1e-6 else ""
            lines.append(f"| {r['arm']} | {r['score']:.1f}{note} | {chapters} |")
        parts.append("\n".join(lines) + "\n")
    records = entropy_accuracy_records(root, part)
    if records:
        lines = ["Policy entropy against held-out accuracy during training, for every method of the part (each "
                 "line runs from the first evaluation to the last). Generated from the chapters' results files.\n",
                 f"![Entropy against accuracy for every method](../_generated/{part}-entropy-accuracy.png)\n",
                 "| chapter | method | entropy: start → end (nats) | accuracy: start → end |", "|---|---|---|---|"]
        for r in records:
            lines.append(f"| [{r['chapter']}](../../chapters/{part}/{r['chapter']}.ipynb) | {r['arm']} | "
                         f"{r['entropy'][0]:.3f} → {r['entropy'][-1]:.3f} | {r['accuracy'][0]:.3f} → {r['accuracy'][-1]:.3f} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts) if parts else "No chapter of this part has reported its side-by-side numbers yet.\n"


def _figure_axes(height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shared.book.style import use_book_style

    use_book_style()
    return plt, *plt.subplots(figsize=(6.4, height))


def overview_figure(root: Path, part: str, path: Path) -> bool:
    """Draw the part's benchmark bar chart into ``path``; return ``False`` when there is nothing to draw."""
    rows = benchmark_rows(root, part)
    if not rows:
        return False
    from shared.book.style import PALETTE

    plt, fig, ax = _figure_axes(0.35 * len(rows) + 1.2)
    colours = [PALETTE["sky"] if not r["chapters"] else PALETTE["blue"] for r in rows]
    ax.barh([r["arm"] for r in rows][::-1], [r["score"] for r in rows][::-1], color=colours[::-1])
    ax.set(xlabel=rows[0]["unit"], title=rows[0]["name"])
    ax.grid(axis="y", visible=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return True


def entropy_accuracy_figure(root: Path, part: str, path: Path) -> bool:
    """Entropy (x) against accuracy (y) trajectories, one panel per task; ``False`` when there is nothing to draw.

    Identical trajectories (the shared GRPO baseline, reported by several chapters) are drawn once.
    """
    records = entropy_accuracy_records(root, part)
    if not records:
        return False
    names = list(dict.fromkeys(r["name"] for r in records))
    seen, panels = set(), {n: [] for n in names}
    for r in records:
        key = (r["name"], tuple(r["entropy"]), tuple(r["accuracy"]))
        if key not in seen:
            seen.add(key)
            panels[r["name"]].append(r)
    n_lines = max(len(v) for v in panels.values())
    plt, fig, axes = _figure_axes(3.2 + 0.16 * n_lines)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2 + 0.16 * n_lines), squeeze=False)
    for ax, name in zip(axes[0], names):
        for i, r in enumerate(panels[name]):
            line, = ax.plot(r["entropy"], r["accuracy"], "-" if r["own"] else ":", marker="o", markersize=3,
                            color=f"C{i % 8}", label=f"{r['chapter']}: {r['arm']}")
            if len(r["entropy"]) > 1:
                ax.annotate("", xy=(r["entropy"][-1], r["accuracy"][-1]), xytext=(r["entropy"][-2], r["accuracy"][-2]),
                            arrowprops={"arrowstyle": "->", "color": line.get_color()})
        ax.set(xlabel="policy entropy (nats per token)", ylabel="held-out pass@1", title=name)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=1, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return True


TOC_HEADER = "# Generated by `python -m shared.book.pages` from book/papers.yml and the chapters; do not edit.\n"


def render(root: Path) -> dict[Path, str]:
    """The generated pages' contents, keyed by path: the toc, the scoreboard and the part tables."""
    rows = build_rows(root)
    pages = {
        root / "book" / "_toc.yml": TOC_HEADER + yaml.safe_dump(toc(root, rows), sort_keys=False),
        root / "book" / "scoreboard.md": scoreboard_page(rows),
    }
    for part in PART_TITLES:
        pages[root / "book" / "_generated" / f"{part}.md"] = part_table([r for r in rows if r.part == part], "book/parts")
        pages[root / "book" / "_generated" / f"{part}-overview.md"] = overview_page(root, part)
    return pages


def generate(root: Path | None = None) -> list[Path]:
    """Write the toc, the scoreboard and the part tables; return the paths written."""
    root = root or find_book_root()
    if root is None:
        raise RuntimeError("run this from inside the book's repository")
    pages = render(root)
    for path, text in pages.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    figures = []
    for part in PART_TITLES:
        for suffix, draw in (("benchmark", overview_figure), ("entropy-accuracy", entropy_accuracy_figure)):
            figure = root / "book" / "_generated" / f"{part}-{suffix}.png"
            if draw(root, part, figure):
                figures.append(figure)
            elif figure.exists():
                figure.unlink()
    return list(pages) + figures


if __name__ == "__main__":
    for p in generate():
        print(f"wrote {p}")
