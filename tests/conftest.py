"""Fixtures shared by every test package: tiny checkpoints and a small real image-caption set.

Nothing here touches a network: tiny models are built from configs and saved with
`save_pretrained`, then loaded through the same code path a user's checkpoint takes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from recipes.shapes import write_shapes_manifest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process: tests start servers and torchrun workers beside pytest on 2 cores, and torch's
# spin-waiting threads then slow every process down many times over (measured in the recipe: 20x).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shapes_manifest(tmp_path_factory) -> Path:
    return write_shapes_manifest(tmp_path_factory.mktemp("shapes"), 48)


def _saved_preset(tmp_path_factory, name: str) -> Path:
    from training.assemble import preset

    folder = tmp_path_factory.mktemp(name)
    preset(name).save(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory) -> Path:
    """A folder with `stage1/` and `generation/` of the tiny-opt preset."""
    return _saved_preset(tmp_path_factory, "tiny-opt")


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    return _saved_preset(tmp_path_factory, "tiny-t5")


# A line of a command's output that a new user reads as trouble: a traceback, an error (`uvicorn.error` is
# only a logger's name) or an exception's name, a warning or deprecation in any case, a library that failed or
# could not load, or a progress bar drawn into a log.
ALARMING = re.compile(
    r"Traceback|ERROR|[A-Z]\w*Error\b|(?i:warning|deprecat)|Failed to load|Could not load|\d+it/s\]"
)


@pytest.fixture(scope="session")
def alarming_lines():
    """The lines of a command's output that match ALARMING."""
    return lambda output: [line for line in output.splitlines() if ALARMING.search(line)]
