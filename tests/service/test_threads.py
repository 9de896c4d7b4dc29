"""service/__init__.py: torch's OpenMP threads spin briefly before they sleep (GOMP_SPINCOUNT), set before
anything imports torch (libgomp reads it when it loads); a value in the environment wins."""

from __future__ import annotations

import os
import subprocess
import sys

CHECK = "import os, sys, service; print('torch' in sys.modules, os.environ['GOMP_SPINCOUNT'])"


def spin_count_seen(environment: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", CHECK], env=environment, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_the_server_package_sets_the_spin_count_before_torch_loads():
    environment = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    assert spin_count_seen(environment) == "False 10000"


def test_a_spin_count_in_the_environment_wins():
    assert spin_count_seen(os.environ | {"GOMP_SPINCOUNT": "300000"}) == "False 300000"
