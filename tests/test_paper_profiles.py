"""The RL chapters' ``paper`` profiles run their real code path, offline, on a tiny local stand-in.

No machine here can download Qwen2.5 or DAPO-Math-17k. Each RL chapter is executed with
``profile="paper"`` and its model and data knobs pointed at a randomly initialised Qwen2-architecture
model saved with ``save_pretrained`` and at small local JSONL files in the hub data sets' formats,
with every size knob shrunk. What runs is what a reader's GPU runs: the Hugging Face testbed, the
same training loop, the same figures, claims and results file (written here to a temporary folder).
"""

from __future__ import annotations

import json
import os

import pytest
from helpers import OFFLINE_GUARD, ROOT, save_tiny_hf_policy, write_math_jsonl

from shared.book.execute import execute_one

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")

TINY_RUN = {"steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 6, "eval_problems": 2}
"""The knobs every RL chapter exposes for the run's size (see ``shared.rl.testbed.RLSettings``)."""

EXTRA = {  # chapter-specific knobs that would otherwise keep a paper-sized setting
    "entropy-mechanism": {"n_seeds": 1},
    "low-probability-tokens": {"probe_prompts": 8, "probe_every": 1},
    "entropy-change-rlvr": {"eval_every": 1},
    "aepo": {"max_samples": 2},
    "entropy-regularization-lrm": {"heldout_problems": 8},
}


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-stand-in")
    return {"model": str(save_tiny_hf_policy(root / "tiny-qwen2")),
            "data": str(write_math_jsonl(root / "train.jsonl", n=12)),
            "eval_data": str(write_math_jsonl(root / "bench.jsonl", n=6, style="math"))}


@pytest.mark.parametrize("slug", sorted(EXTRA))
def test_the_paper_profile_runs_end_to_end_offline(slug, stand_in, tmp_path):
    results = tmp_path / "results"
    env = {"ENTROPY_BOOK_RESULTS_DIR": str(results), "ENTROPY_BOOK_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(OFFLINE_GUARD), os.environ.get("PYTHONPATH")])), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    parameters = {"profile": "paper", **stand_in, **TINY_RUN, **EXTRA[slug]}
    outcome = execute_one(ROOT / "chapters" / "rl" / f"{slug}.ipynb", output=tmp_path / f"{slug}.ipynb",
                          parameters=parameters, extra_env=env, profile="paper")
    assert outcome.ok, outcome.error
    doc = json.loads((results / "rl" / f"{slug}.paper.json").read_text())
    assert doc["profile"] == "paper" and doc["claims"]
    assert doc["metrics"]["entropy_accuracy"]["name"] == "tiny-qwen2 on train.jsonl"
