"""End-to-end runs of the training CLI on a small real image-caption set, on the CPU."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Processor

from training import checkpoint
from training.cli import main
from training.model import ITG_HEAD_FILE

FAST = ["--batch-size", "8", "--warmup-steps", "5", "--log-every", "5", "--no-progress", "--lr", "3e-4"]


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _falls(records: list[dict], key: str) -> bool:
    values = [r[key] for r in records]
    third = max(1, len(values) // 3)
    return sum(values[-third:]) / third < sum(values[:third]) / third


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def stage1_run(tiny_opt, shapes_manifest, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("stage1")
    main(["stage1", "--init", str(tiny_opt / "stage1"), "--train-manifest", str(shapes_manifest)]
         + ["--output", str(run), "--steps", "60", *FAST])  # fmt: skip
    return run


def test_stage1_every_loss_falls_and_output_loads_in_transformers(stage1_run):
    records = _log(stage1_run)
    for key in ("loss", "itc", "itm", "itg"):
        assert _falls(records, key), (key, [r[key] for r in records])
    assert {"step", "lr", "samples_per_s"} <= set(records[-1])
    model = Blip2ForImageTextRetrieval.from_pretrained(stage1_run / "model")
    assert model.config.qformer_config.use_qformer_text_input
    heads = load_file(str(stage1_run / "model" / ITG_HEAD_FILE))
    assert "cls.predictions.transform.dense.weight" in heads and heads["temp"].item() != 0.07


def test_stage1_keeps_vit_blocks_bit_identical_and_trains_its_layernorm(tiny_opt, stage1_run):
    before, after = _weights(tiny_opt / "stage1"), _weights(stage1_run / "model")
    vit = [k for k in before if k.startswith("vision_model.") and "post_layernorm" not in k]
    assert vit and all(torch.equal(before[k], after[k]) for k in vit)
    assert not torch.equal(
        before["vision_model.post_layernorm.weight"], after["vision_model.post_layernorm.weight"]
    )
    assert not torch.equal(before["query_tokens"], after["query_tokens"])


@pytest.mark.parametrize("preset_name", ["tiny_opt", "tiny_t5"])
def test_stage2_from_stage1_learns_and_generates_in_transformers(
    preset_name, request, stage1_run, shapes_manifest, tmp_path
):
    init = request.getfixturevalue(preset_name) / "generation"
    main(["stage2", "--init", str(init), "--stage1", str(stage1_run / "model"), "--train-manifest", str(shapes_manifest)]
         + ["--output", str(tmp_path), "--steps", "40", *FAST])  # fmt: skip
    assert _falls(_log(tmp_path), "loss")
    before, after = _weights(init), _weights(tmp_path / "model")
    frozen = [
        k
        for k in before
        if k.startswith("language_model.") or (k.startswith("vision_model.") and "post_layernorm" not in k)
    ]
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["language_projection.weight"], after["language_projection.weight"])
    model = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "model")
    processor = Blip2Processor.from_pretrained(tmp_path / "model")
    from PIL import Image

    image = Image.open(Path(shapes_manifest).parent / "images" / "0.png")
    inputs = processor(images=image, return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=4).shape[0] == 1


def _run_stage1(init: Path, manifest: Path, output: Path, steps: int, extra=()) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "training.cli",
        "stage1",
        "--init",
        str(init),
        "--train-manifest",
        str(manifest),
    ]
    cmd += ["--output", str(output), "--steps", str(steps), "--save-every", "5", *FAST, *extra]
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def test_killed_run_resumes_to_the_same_result(tiny_opt, shapes_manifest, tmp_path):
    steps = 30
    reference = _run_stage1(tiny_opt / "stage1", shapes_manifest, tmp_path / "reference", steps)
    assert reference.wait(timeout=300) == 0

    killed = _run_stage1(tiny_opt / "stage1", shapes_manifest, tmp_path / "killed", steps)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (
        checkpoint.latest(ckpts) and checkpoint.latest(ckpts).name >= "step-00000010"
    ):
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    latest = checkpoint.latest(ckpts)
    assert latest is not None and int(latest.name.split("-")[1]) < steps, "the run should be killed mid-way"
    for folder in ckpts.glob("step-*"):  # whatever the moment of the kill, every checkpoint is whole
        assert (folder / "trainable.safetensors").exists() and (folder / "trainer_state.pt").exists()

    resumed = _run_stage1(tiny_opt / "stage1", shapes_manifest, tmp_path / "killed", steps, ["--resume"])
    assert resumed.wait(timeout=300) == 0
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["steps"] == steps
    expected, got = _weights(tmp_path / "reference" / "model"), _weights(tmp_path / "killed" / "model")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_missing_and_corrupt_images_are_skipped_and_counted(tiny_opt, shapes_manifest, tmp_path):
    rows = [json.loads(line) for line in shapes_manifest.read_text().splitlines()]
    (tmp_path / "truncated.png").write_bytes((shapes_manifest.parent / rows[0]["image"]).read_bytes()[:60])
    (tmp_path / "empty.png").write_bytes(b"")
    for row in rows:
        row["image"] = str(shapes_manifest.parent / row["image"])
    rows += [
        {"image": "missing.png", "text": "gone"},
        {"image": "truncated.png", "text": "cut"},
        {"image": "empty.png", "text": "x"},
    ]
    manifest = tmp_path / "broken.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    main(["stage1", "--init", str(tiny_opt / "stage1"), "--train-manifest", str(manifest), "--output", str(tmp_path / "run")]
         + ["--steps", "7", *FAST])  # fmt: skip
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 7 and summary["skipped_samples"] >= 3


def test_a_run_with_no_readable_sample_stops_with_a_clear_error(tiny_opt, shapes_manifest, tmp_path):
    # cached features of other images: every row is skipped, which must not pass for a finished run
    shutil.copytree(shapes_manifest.parent / "images", tmp_path / "images")
    other = tmp_path / "copies.jsonl"
    other.write_text(shapes_manifest.read_text())
    main(["data", "cache-features", "--manifest", str(other), "--model", str(tiny_opt / "stage1")]
         + ["--output", str(tmp_path / "features")])  # fmt: skip
    with pytest.raises(RuntimeError, match="without one readable sample"):
        main(["stage1", "--init", str(tiny_opt / "stage1"), "--train-manifest", str(shapes_manifest)]
             + ["--features", str(tmp_path / "features"), "--output", str(tmp_path / "run"), "--steps", "50", *FAST])  # fmt: skip
    assert not (tmp_path / "run" / "model").exists()


def test_webdataset_shards_with_a_corrupt_shard(tiny_opt, shapes_manifest, tmp_path, caplog):
    main(["data", "shards", "--manifest", str(shapes_manifest), "--output", str(tmp_path)]
         + ["--shard-size", "24"])  # fmt: skip
    (tmp_path / "corrupt.tar").write_bytes(os.urandom(4096))
    names = ("shard-000000.tar", "corrupt.tar", "shard-000001.tar")
    shards = ",".join(str(tmp_path / n) for n in names)
    main(
        [
            "stage1",
            "--init",
            str(tiny_opt / "stage1"),
            "--shards",
            shards,
            "--output",
            str(tmp_path / "run"),
            "--steps",
            "8",
            *FAST,
        ]
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 8
    assert "corrupt" in caplog.text


def test_training_from_cached_features(tiny_opt, shapes_manifest, tmp_path):
    main(["data", "cache-features", "--manifest", str(shapes_manifest), "--model", str(tiny_opt / "stage1")]
         + ["--output", str(tmp_path / "features"), "--shard-size", "20"])  # fmt: skip
    index = json.loads((tmp_path / "features" / "index.json").read_text())
    assert len(index) == 48 and len({shard for shard, _ in index.values()}) == 3
    main(["stage1", "--init", str(tiny_opt / "stage1"), "--train-manifest", str(shapes_manifest)]
         + ["--features", str(tmp_path / "features"), "--output", str(tmp_path / "run"), "--steps", "6", *FAST])  # fmt: skip
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 6


def test_captions_of_any_content_never_stop_a_run(tiny_opt, shapes_manifest, tmp_path):
    """Special-token spellings in captions are text (the tiny-opt stage-1 tokenizer maps `<image>` one past
    the Q-Former's rows, which used to stop stage 1 with an IndexError); texts no tokenizer can take (not a
    string, a lone surrogate, missing) are skipped and counted like unreadable images."""
    rows = [json.loads(line) for line in shapes_manifest.read_text().splitlines()]
    for n, row in enumerate(rows):
        row["image"] = str(shapes_manifest.parent / row["image"])
        if n % 2:
            row["text"] += " <image> [SEP] [DEC] </s> <pad> [CLS] <s> <unk>"
    image = rows[0]["image"]
    odd = [{"image": image, "text": None}, {"image": image, "text": 42}, {"image": image, "text": ["a", "b"]},
           {"image": image, "text": "\ud800 broken"}, {"image": image}]  # fmt: skip
    manifest = tmp_path / "odd.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows + odd))
    for stage, init in (("stage1", tiny_opt / "stage1"), ("stage2", tiny_opt / "generation")):
        output = tmp_path / stage
        main([stage, "--init", str(init), "--train-manifest", str(manifest), "--output", str(output)]
             + ["--steps", "8", *FAST])  # fmt: skip
        summary = json.loads((output / "summary.json").read_text())
        assert summary["steps"] == 8 and summary["skipped_samples"] >= len(odd), summary
