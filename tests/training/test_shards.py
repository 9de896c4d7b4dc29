"""`blip2-train data shards`: a manifest to WebDataset shards that `WebDatasetShards` reads back."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import importers
from training.cli import main
from training.data import WebDatasetShards, read_manifest, stable_id, write_jsonl


def _shards(capsys, manifest: Path, output: Path, shard_size: int) -> dict:
    main(["data", "shards", "--manifest", str(manifest), "--output", str(output)]
         + ["--shard-size", str(shard_size)])  # fmt: skip
    return json.loads(capsys.readouterr().out.splitlines()[-1])["summary"]


def _read_back(shards: str, text_field: str = "text") -> list[dict]:
    # An identity transform: the pixels as decoded, to compare with the original files exactly
    dataset = WebDatasetShards(shards.split(","), lambda image: torch.from_numpy(np.array(image)), text_field)
    return [sample for sample in dataset if sample is not None]


def _members(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return tar.getnames()


def _pixels(path: str | Path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB")))


def test_manifest_to_shards_and_back(shapes_manifest, tmp_path, capsys):
    summary = _shards(capsys, shapes_manifest, tmp_path / "shards", shard_size=20)
    names = [f"shard-{n:06d}.tar" for n in range(3)]
    assert summary["shards"] == ",".join(str(tmp_path / "shards" / n) for n in names)
    assert (summary["shards_written"], summary["samples"], summary["skipped"]) == (3, 48, 0)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == names  # no temporary files left
    again = _shards(
        capsys, shapes_manifest, tmp_path / "shards", shard_size=30
    )  # the same folder, fewer shards
    assert (
        sorted(p.name for p in (tmp_path / "shards").iterdir())
        == names[:2]
        == [Path(p).name for p in again["shards"].split(",")]
    )  # the earlier run's third shard is not left behind
    summary = _shards(capsys, shapes_manifest, tmp_path / "shards", shard_size=20)
    per_shard = [len(_members(tmp_path / "shards" / n)) // 3 for n in names]  # png, json and txt each
    assert per_shard == [20, 20, 8]

    rows = read_manifest(shapes_manifest)
    samples = _read_back(summary["shards"])
    assert len(samples) == len(rows)
    for sample, row in zip(samples, rows, strict=True):
        assert sample["text"] == row["text"]
        assert sample["image_id"] == row["image_id"]
        assert torch.equal(sample["pixel_values"], _pixels(row["image"]))
        assert "image" not in sample["row"]


def test_missing_and_corrupt_images_are_skipped_and_counted(shapes_manifest, tmp_path, capsys, caplog):
    images = shapes_manifest.parent / "images"
    Image.open(images / "0.png").convert("RGB").save(tmp_path / "photo.JPEG")
    (tmp_path / "corrupt.png").write_bytes(os.urandom(500))
    rows = [
        {"image": str(images / "1.png"), "question": "what shape?", "answer": "circle", "image_id": "coco-1"},
        {"image": "missing.png", "question": "what colour?", "answer": "red"},
        {"image": "corrupt.png", "question": "is it red?", "answer": "yes"},
        {"image": "photo.JPEG", "question": "what colour?", "answer": "blue"},
    ]
    manifest = tmp_path / "vqa.jsonl"
    write_jsonl(manifest, rows)
    summary = _shards(capsys, manifest, tmp_path / "shards", shard_size=10)
    assert (summary["shards_written"], summary["samples"], summary["skipped"]) == (1, 2, 2)
    assert "missing.png" in caplog.text and "corrupt.png" in caplog.text

    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as tar:
        assert tar.getnames() == ["000000000.png", "000000000.json", "000000001.jpg", "000000001.json"]
        assert tar.extractfile("000000001.jpg").read() == (tmp_path / "photo.JPEG").read_bytes()
    first, second = _read_back(summary["shards"], text_field="answer")
    # VQA fields travel with the sample, for the collator that builds prompts from the question
    assert first["text"] == "circle" and first["row"]["question"] == "what shape?"
    assert first["image_id"] == stable_id("coco-1")  # a non-integer id, hashed the same in every process
    assert second["image_id"] == stable_id(second["row"]["key"])  # no id: a stable hash of the sample key
    assert torch.equal(second["pixel_values"], _pixels(tmp_path / "photo.JPEG"))


def test_an_interrupted_run_leaves_only_complete_shards(shapes_manifest, tmp_path, monkeypatch):
    read, calls = importers._image_entry, []

    def interrupted_after_25(path: str) -> dict[str, bytes] | None:
        calls.append(path)
        if len(calls) > 25:
            raise KeyboardInterrupt
        return read(path)

    monkeypatch.setattr(importers, "_image_entry", interrupted_after_25)
    with pytest.raises(KeyboardInterrupt):
        importers.write_webdataset_shards(shapes_manifest, tmp_path, shard_size=20)
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar"]
    assert len(_members(tmp_path / "shard-000000.tar")) == 3 * 20
