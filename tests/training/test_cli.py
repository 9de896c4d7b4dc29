"""The `blip2-train` command line itself: its help is cheap, and a recipe YAML fills its settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from training.cli import main

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_stage1.yaml"

# Every subcommand's --help in one fresh interpreter, then which heavy libraries it had imported.
HELP_EVERYWHERE = """
import json, sys
from training.cli import COMMANDS, DATA_COMMANDS, main

for argv in [[], *([c] for c in COMMANDS), ["data"], *(["data", c] for c in DATA_COMMANDS)]:
    try:
        main([*argv, "--help"])
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in ("torch", "transformers", "safetensors") if m in sys.modules)))
"""


def test_help_imports_no_torch():
    """`blip2-train --help` (and each subcommand's) answers without loading torch or transformers."""
    done = subprocess.run(
        [sys.executable, "-c", HELP_EVERYWHERE], capture_output=True, text=True, check=True, timeout=120
    )
    assert "usage: blip2-train finetune" in done.stdout and "--vqa-scoring" in done.stdout
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_the_example_recipe_runs_and_flags_override_it(tiny_opt, shapes_manifest, tmp_path):
    main(["stage1", "--config", str(RECIPE), "--init", str(tiny_opt / "stage1")]
         + ["--train-manifest", str(shapes_manifest), "--output", str(tmp_path), "--steps", "2"])  # fmt: skip
    used = json.loads((tmp_path / "summary.json").read_text())["settings"]
    recipe = yaml.safe_load(RECIPE.read_text())
    overridden = {"init", "train_manifest", "output", "steps"}
    assert overridden < set(recipe) and used["steps"] == 2 and used["output"] == str(tmp_path)
    assert {k: used[k] for k in recipe.keys() - overridden} == {
        k: recipe[k] for k in recipe.keys() - overridden
    }
    assert (tmp_path / "model" / "model.safetensors").exists()
