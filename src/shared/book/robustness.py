"""Verdict stability: re-run every chapter on a second, disjoint set of seeds and record which verdicts held.

``python -m shared.book.robustness`` (``make robustness``; not part of CI: it executes every chapter
again) runs each selected chapter's quick profile with ``seed=ALT_SEED`` (chapters run the seeds
``seed, seed + 1, ..., seed + n_seeds - 1``, so 1000 and up are disjoint from the committed 0 and up)
into a scratch folder, compares each claim's verdict with the committed results file and writes
``results/robustness.json``::

    {"alt_seed": 1000, "chapters": {"tta/sar": {"claims": {"central": {"verdict": "reproduced",
        "alt_verdict": "inconclusive", "held": false, ...}}}}}

A verdict that does not hold on the other seeds is **fragile**: the scoreboard and the part pages mark
it so. An entry whose ``verdict`` no longer equals the committed results file (the chapter changed
since) counts as *not checked*, never as stable.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from shared.book.execute import discover_notebooks, execute_one
from shared.book.results import find_book_root, load_results

ALT_SEED = 1000
ROBUSTNESS_FILE = "results/robustness.json"


def compare(main: dict[str, Any], alt: dict[str, Any]) -> dict[str, Any]:
    """Per claim of ``main``: its verdict, the verdict on the other seeds, and whether it held."""
    alt_claims = {c["id"]: c for c in alt["claims"]}
    out = {}
    for c in main["claims"]:
        a = alt_claims.get(c["id"])
        out[c["id"]] = {
            "verdict": c["verdict"],
            "alt_verdict": a["verdict"] if a else "missing",
            "held": bool(a and a["verdict"] == c["verdict"]),
            "effect": c["effect"], "interval": c["interval"],
            "alt_effect": a["effect"] if a else None, "alt_interval": a["interval"] if a else None,
        }
    return out


def load_robustness(root: Path) -> dict[str, Any]:
    """``results/robustness.json``, or an empty record when it does not exist yet."""
    path = root / ROBUSTNESS_FILE
    return json.loads(path.read_text()) if path.exists() else {"alt_seed": ALT_SEED, "chapters": {}}


def stability(robustness: dict[str, Any], chapter: str, claim_id: str, verdict: str) -> str:
    """``"stable"``, ``"fragile"`` or ``"not checked"`` for one claim with its current ``verdict``."""
    entry = robustness.get("chapters", {}).get(chapter, {}).get("claims", {}).get(claim_id)
    if entry is None or entry["verdict"] != verdict:
        return "not checked"
    return "stable" if entry["held"] else "fragile"


def run_robustness(select: str = "chapters/*", alt_seed: int = ALT_SEED, root: Path | None = None, jobs: int = 2) -> dict[str, Any]:
    """Execute the selected chapters on ``alt_seed``, compare with the committed results, update the file."""
    root = root or find_book_root()
    if root is None:
        raise RuntimeError("run this from inside the book's repository")
    record = load_robustness(root)
    record["alt_seed"] = alt_seed
    notebooks = [p for p in discover_notebooks(root, select) if p.relative_to(root).parts[0] == "chapters"]
    if not notebooks:
        raise ValueError(f"no chapter matches {select!r}")
    with tempfile.TemporaryDirectory() as scratch:

        def one(nb: Path) -> tuple[str, dict[str, Any]]:
            part, slug = nb.parent.name, nb.stem
            results = Path(scratch) / "results"
            ex = execute_one(nb, output=Path(scratch) / f"{part}-{slug}.ipynb", parameters={"seed": alt_seed},
                             extra_env={"ENTROPY_BOOK_RESULTS_DIR": str(results)})
            key = f"{part}/{slug}"
            if not ex.ok:
                print(f"{key}: FAILED on seed {alt_seed}\n{ex.error}", flush=True)
                return key, {"error": ex.error, "claims": {}}
            main = load_results(root / "results" / part / f"{slug}.quick.json")
            claims = compare(main, load_results(results / part / f"{slug}.quick.json"))
            held = sum(c["held"] for c in claims.values())
            print(f"[{ex.seconds:6.1f} s] {key}: {held} of {len(claims)} verdicts held on seeds from {alt_seed}", flush=True)
            return key, {"seconds": round(ex.seconds, 1), "claims": claims}

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            record["chapters"].update(dict(pool.map(one, notebooks)))
    record["chapters"] = dict(sorted(record["chapters"].items()))
    (root / ROBUSTNESS_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--select", default="chapters/*", help='glob over chapters, e.g. "tta/*" or "*sar*"')
    parser.add_argument("--seed", type=int, default=ALT_SEED, help="the first seed of the second set")
    parser.add_argument("--jobs", type=int, default=2, help="chapters executed at once")
    args = parser.parse_args(argv)
    record = run_robustness(args.select, args.seed, jobs=args.jobs)
    failed = [k for k, v in record["chapters"].items() if "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
