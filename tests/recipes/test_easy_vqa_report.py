"""recipes/easy_vqa/report.py: the model card and docs/RESULTS.md are written from a run's results.json, so each
figure on them is the run's. Rendered here from the recorded run (docs/easy_vqa_results.json) and the shipped
model's config and weights, as run.sh renders them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from recipes.easy_vqa.report import render

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "service" / "default_model"


@pytest.fixture
def run(tmp_path) -> tuple[Path, dict]:
    """A run folder as run.sh leaves it: results.json and the fine-tuned model (here, the shipped one)."""
    results = json.loads((REPO / "docs" / "easy_vqa_results.json").read_text())
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "model").symlink_to(SHIPPED / "generation")
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "summary.json").write_text(json.dumps({"steps": 1234}))
    return tmp_path, results


def write(run: Path, results: dict) -> tuple[str, str]:
    (run / "results.json").write_text(json.dumps(results))
    return render(run, SHIPPED)


def test_both_pages_carry_the_runs_figures(run):
    folder, results = run
    card, results_md = write(folder, results)
    headline = f"**{results['vqa']['exact_match']:.2f}%**"
    assert headline in card and headline in results_md
    for step, seconds in results["step_seconds"].items():
        assert f"| {step} | {seconds} s |" in card
    assert f"{results['wall']['wall_s'] / 60:.1f} min" in card and results["wall"]["start"] in results_md
    assert "stage 1\n   1234 steps" in card  # from the stage's summary.json
    assert "| ViT and LLM bit-identical to their unimodal checkpoints after every stage | yes |" in card
    config = json.loads((SHIPPED / "generation" / "config.json").read_text())
    assert f"{config['num_query_tokens']} queries" in card


def test_a_missing_figure_reads_n_a_and_a_changed_weight_no(run):
    folder, results = run
    del results["vqa_unbatched"]
    results["frozen_weights_identical"]["stage2"]["llm_identical"] = False
    shutil.rmtree(folder / "stage1")
    card, _ = write(folder, results)
    assert (
        "| VQA, one question at a time (batch 1, greedy) | n/a% (colour / shape / yes-no: n/a / n/a / n/a) |"
        in card
    )
    assert "after every stage | NO |" in card and "Checked: NOT identical" in card
    assert "stage 1\n   n/a steps" in card
