"""The `blip2-train` command line itself: its help is cheap, and a recipe YAML fills its settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
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


TRAIN = Path(sys.executable).parent / "blip2-train"


def test_a_command_prints_only_its_own_output(tmp_path, alarming_lines):
    """No third-party noise (torchao's kernel loader, `Detected no triton`, torch deprecations, weight-saving
    progress bars) around what `blip2-train init` says."""
    done = subprocess.run(
        [str(TRAIN), "init", "--preset", "tiny-opt", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["summary"]["stage1"] == str(tmp_path / "stage1")
    assert alarming_lines(done.stdout + done.stderr) == [], done.stderr


def test_a_missing_manifest_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "data" / "train.jsonl"
    done = subprocess.run(
        [str(TRAIN), "stage1", "--init", str(tmp_path / "init"), "--train-manifest", str(missing),
         "--output", str(tmp_path / "s1")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"blip2-train: cannot read the manifest {missing}: No such file or directory"
    ]


def test_an_unreadable_manifest_is_one_line_naming_it(tiny_opt, tmp_path, capsys):
    """A folder, a line that is not JSON, a file that is not UTF-8: each one line on stderr, exit status 2."""
    bad_json, not_text = tmp_path / "bad.jsonl", tmp_path / "latin1.jsonl"
    bad_json.write_text('{"image": "a.png", "text": "a red circle"}\n{"image": \n')
    not_text.write_bytes('{"image": "a.png", "text": "un cercle \xe9"}\n'.encode("latin-1"))
    cases = {
        tmp_path: f"blip2-train: cannot read the manifest {tmp_path}: Is a directory",
        bad_json: f"blip2-train: {bad_json}:2: not JSON (Expecting value)",
        not_text: f"blip2-train: cannot read {not_text}: 'utf-8' codec can't decode byte 0xe9",
    }
    for manifest, message in cases.items():
        with pytest.raises(SystemExit) as exit_:
            main(["stage1", "--init", str(tiny_opt / "stage1"), "--train-manifest", str(manifest),
                  "--output", str(tmp_path / "s1"), "--steps", "1", "--no-progress"])  # fmt: skip
        assert exit_.value.code == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(message), line
