"""The `blip2-train` command line itself: its help is cheap, and its settings live apart from the code."""

from __future__ import annotations

import json
import subprocess
import sys

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
