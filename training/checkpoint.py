"""Training checkpoints that a killed run can never leave half-written, and `--resume` from the last one.

A checkpoint is a folder `step-NNNNNNNN/` under `<output>/checkpoints/`. It is written in full under a
temporary name and renamed into place (a rename is atomic on one filesystem); `latest` is then
replaced the same way. A folder whose name does not start with `step-` is never read, so a crash at
any moment leaves either the previous checkpoint or the new one, complete.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    with open(tmp) as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": _numpy_state_as_tensors(),
    }


def _numpy_state_as_tensors() -> tuple:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def save(
    folder: Path, step: int, trainable: dict[str, torch.Tensor], trainer_state: dict, keep: int = 2
) -> Path:
    """Write `step-N/` atomically: trainable weights (safetensors) + optimizer/scheduler/RNG/data state."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors")
    )
    torch.save(trainer_state, tmp / "trainer_state.pt")
    if final.exists():  # a resumed run re-saving a step: move the old copy aside before the rename
        stale = folder / f".stale-step-{step:08d}"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _write_atomically(folder / LATEST, final.name)
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(folder: Path) -> Path | None:
    """The checkpoint `latest` names; if that pointer is gone or names a deleted folder, the newest
    `step-*` folder (only complete checkpoints carry that name), so a resume never silently restarts."""
    pointer = folder / LATEST
    if pointer.exists():
        path = folder / pointer.read_text().strip()
        if path.is_dir():
            return path
    steps = sorted(folder.glob("step-*"))
    return steps[-1] if steps else None


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    trainable = load_file(str(path / "trainable.safetensors"))
    # Tensors, numbers and tuples only, so the safe (weights_only) unpickler reads it.
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    return trainable, state
