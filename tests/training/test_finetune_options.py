"""Caption fine-tuning's two vision options, end to end through the CLI on the tiny preset (64 px, patch 8).

`--train-vit` unfreezes the ViT (kept in fp32: the BLIP-2 paper saw fp16 ViT fine-tuning diverge);
`--image-size` fine-tunes above the tower's native resolution (the paper: 364 px from 224), its position
embeddings interpolated once as LAVIS's `interpolate_pos_embed` does and the model saved at that size.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from training.cli import main
from training.data import Collator, ImageTransform, ManifestDataset
from training.stages import Stage2Task
from training.trainer import TrainSettings

FAST = ["--batch-size", "8", "--warmup-steps", "0", "--lr", "1e-3", "--no-progress", "--log-every", "1"]
POSITIONS = "vision_model.embeddings.position_embedding"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def _vit_keys(weights: dict[str, torch.Tensor]) -> list[str]:
    """The ViT proper: patch and position embeddings and the encoder blocks (its post-LayerNorm always trains)."""
    return [k for k in weights if k.startswith("vision_model.") and "post_layernorm" not in k]


def _caption(tiny_opt: Path, manifest: Path, output: Path, *extra: str, steps: int = 4) -> Path:
    main(["finetune", "--task", "caption", "--init", str(tiny_opt / "generation"), "--train-manifest", str(manifest)]
         + ["--output", str(output), "--steps", str(steps), *FAST, *extra])  # fmt: skip
    return output


@pytest.fixture(scope="module")
def vit_run(tiny_opt, shapes_manifest, tmp_path_factory) -> Path:
    # bf16 autocast on the CPU: the ViT must still run (and stay) in fp32 under mixed precision
    return _caption(
        tiny_opt, shapes_manifest, tmp_path_factory.mktemp("vit"), "--train-vit", "--precision", "bf16"
    )


@pytest.fixture(scope="module")
def resized_run(tiny_opt, shapes_manifest, tmp_path_factory) -> Path:
    return _caption(tiny_opt, shapes_manifest, tmp_path_factory.mktemp("resized"), "--image-size", "96")


# --train-vit


def test_train_vit_trains_the_vit_and_leaves_the_llm_bit_identical(tiny_opt, vit_run):
    before, after = _weights(tiny_opt / "generation"), _weights(vit_run / "model")
    for key in ("vision_model.embeddings.patch_embedding.weight", POSITIONS):
        assert not torch.equal(before[key], after[key]), key
    blocks = [k for k in before if k.startswith("vision_model.encoder.layers.")]
    assert blocks and all(not torch.equal(before[k], after[k]) for k in blocks if k.endswith(".weight"))
    llm = [k for k in before if k.startswith("language_model.")]
    assert llm and all(torch.equal(before[k], after[k]) for k in llm)
    assert all(torch.isfinite(torch.tensor(_losses(vit_run))))


def test_train_vit_saves_the_vision_tower_in_fp32(vit_run):
    weights = _weights(vit_run / "model")
    assert {weights[k].dtype for k in _vit_keys(weights)} == {torch.float32}


def test_train_vit_runs_the_vit_in_fp32_under_autocast(tiny_opt, shapes_manifest):
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_opt / "generation", dtype=torch.float32)
    processor = Blip2Processor.from_pretrained(tiny_opt / "generation")
    task = Stage2Task(model, processor, prompt="a photo of", train_vit=True).train()
    # every matmul of the ViT: its blocks' outputs would be fp32 anyway (residuals promote them)
    layers = [m for m in model.vision_model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    dtypes = set()
    for layer in layers:
        layer.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    dataset = ManifestDataset(shapes_manifest, ImageTransform(64, train=True))
    batch = Collator(None)([dataset[i] for i in range(2)])
    with torch.autocast("cpu", torch.bfloat16):
        loss = task(batch)["loss"]
    assert layers and dtypes == {torch.float32} and torch.isfinite(loss)


@pytest.mark.parametrize("train_vit", [False, True])
def test_on_a_gpu_only_the_frozen_vit_is_cast_to_half(tiny_opt, train_vit):
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_opt / "generation", dtype=torch.float32)
    task = Stage2Task(model, Blip2Processor.from_pretrained(tiny_opt / "generation"), train_vit=train_vit)
    # the cast itself needs no GPU: this is the decision `train` makes on one
    task.prepare_for_device(torch.device("cuda"), TrainSettings(precision="fp16"))
    expected = torch.float32 if train_vit else torch.float16
    assert model.vision_model.embeddings.patch_embedding.weight.dtype == expected
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == expected
    assert model.vision_model.post_layernorm.weight.dtype == torch.float32  # trains in every stage


def test_without_train_vit_the_vit_stays_bit_identical(tiny_opt, shapes_manifest, tmp_path):
    run = _caption(tiny_opt, shapes_manifest, tmp_path, steps=2)
    before, after = _weights(tiny_opt / "generation"), _weights(run / "model")
    assert all(torch.equal(before[k], after[k]) for k in _vit_keys(before))
    assert not torch.equal(before["query_tokens"], after["query_tokens"])  # yet the run did train


@pytest.mark.parametrize("task", ["vqa", "retrieval"])
def test_train_vit_is_refused_for_vqa_and_retrieval(tiny_opt, task):
    with pytest.raises(SystemExit, match="--train-vit is a caption fine-tuning option"):
        main(["finetune", "--task", task, "--init", str(tiny_opt / "generation"), "--train-vit"])


# --image-size


def test_image_size_saves_the_model_and_processor_at_the_new_size(resized_run):
    folder = resized_run / "model"
    config = json.loads((folder / "config.json").read_text())
    assert config["vision_config"]["image_size"] == 96
    assert _weights(folder)[POSITIONS].shape[1] == (96 // 8) ** 2 + 1
    processor = Blip2Processor.from_pretrained(folder)
    pixels = processor(images=Image.new("RGB", (64, 64), "red"), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 96, 96)  # any input size is resized to the model's


def test_image_size_interpolates_the_position_embeddings_as_lavis_does(tiny_opt, resized_run):
    old = _weights(tiny_opt / "generation")[POSITIONS]
    new = _weights(resized_run / "model")[POSITIONS]  # the ViT is frozen: as interpolated, untouched since
    assert torch.equal(new[:, 0], old[:, 0])  # the class token's position has no place on the grid
    # LAVIS: bicubic over the 8x8 patch grid to 12x12, align_corners=False
    grid = old[0, 1:].reshape(8, 8, -1).permute(2, 0, 1)[None]
    lavis = F.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False)
    torch.testing.assert_close(new[0, 1:], lavis[0].permute(1, 2, 0).reshape(144, -1))
    # and it is the same grid resampled: taken back down to 8x8 it is close to the original
    back = F.interpolate(lavis, size=(8, 8), mode="bicubic", align_corners=False)
    assert (back - grid).abs().mean() < 0.3 * grid.abs().mean()


def test_image_size_model_generates_in_plain_transformers_from_a_96_px_image(resized_run, shapes_manifest):
    folder = resized_run / "model"
    model = Blip2ForConditionalGeneration.from_pretrained(folder).eval()
    processor = Blip2Processor.from_pretrained(folder)
    image = Image.open(shapes_manifest.parent / "images" / "0.png").convert("RGB").resize((96, 96))
    inputs = processor(images=image, text="a photo of", return_tensors="pt")
    assert inputs["pixel_values"].shape[-1] == 96
    # no interpolation at run time: the saved position embeddings are native at 96 px
    hidden = model.vision_model(inputs["pixel_values"]).last_hidden_state
    assert hidden.shape[1] == 145
    assert model.generate(**inputs, max_new_tokens=4).shape[0] == 1


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_pretraining_stages_take_image_size_too_and_keep_the_resized_vit_frozen(
    stage, tiny_opt, shapes_manifest, features_64px, tmp_path
):
    init = str(tiny_opt / ("stage1" if stage == "stage1" else "generation"))
    common = [stage, "--init", init, "--train-manifest", str(shapes_manifest), *FAST, "--steps", "2"]
    main([*common, "--image-size", "96", "--output", str(tmp_path / "run")])
    weights = _weights(tmp_path / "run" / "model")
    reference = _weights(tiny_opt / "generation")[POSITIONS]
    grid = reference[0, 1:].reshape(8, 8, -1).permute(2, 0, 1)[None]
    interpolated = F.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False)
    # interpolated once and then frozen with the rest of the ViT: not a trainable new parameter
    torch.testing.assert_close(weights[POSITIONS][0, 1:], interpolated[0].permute(1, 2, 0).reshape(144, -1))
    with pytest.raises(SystemExit, match="holds 65 ViT tokens per image"):
        main(
            [*common, "--image-size", "96", "--features", str(features_64px), "--output", str(tmp_path / "f")]
        )


def test_image_size_must_be_a_multiple_of_the_patch_size(tiny_opt, shapes_manifest, tmp_path):
    with pytest.raises(SystemExit, match="not a multiple of the patch size 8"):
        _caption(tiny_opt, shapes_manifest, tmp_path, "--image-size", "100")


@pytest.fixture(scope="module")
def features_64px(tiny_opt, shapes_manifest, tmp_path_factory) -> Path:
    features = tmp_path_factory.mktemp("features")
    main(["data", "cache-features", "--manifest", str(shapes_manifest), "--model", str(tiny_opt / "generation")]
         + ["--output", str(features)])  # fmt: skip
    return features


def test_image_size_with_features_cached_at_another_size_is_refused(
    tiny_opt, shapes_manifest, features_64px, tmp_path
):
    # 64 px features hold 8x8+1 tokens per image: a 96 px model would be trained on a grid it never sees
    with pytest.raises(
        SystemExit, match=r"holds 65 ViT tokens per image, but the vision tower at 96 px makes 145"
    ):
        _caption(tiny_opt, shapes_manifest, tmp_path, "--features", str(features_64px), "--image-size", "96")
    # at the size they were cached at, the same features train
    _caption(tiny_opt, shapes_manifest, tmp_path, "--features", str(features_64px), steps=1)


def test_train_vit_with_features_is_refused(tiny_opt, shapes_manifest, features_64px, tmp_path):
    with pytest.raises(SystemExit, match="--train-vit needs images"):
        _caption(tiny_opt, shapes_manifest, tmp_path, "--features", str(features_64px), "--train-vit")


# --lora-rank


def test_lora_run_resumes_to_the_same_merged_model(tiny_opt, shapes_manifest, tmp_path, caplog):
    common = ["finetune", "--task", "retrieval", "--init", str(tiny_opt / "stage1"), "--train-manifest"]
    common += [str(shapes_manifest), "--lora-rank", "4", "--steps", "6", "--save-every", "3", *FAST]
    main([*common, "--output", str(tmp_path / "straight")])
    # the same run killed after its step-3 checkpoint: only that checkpoint is left
    shutil.copytree(tmp_path / "straight" / "checkpoints", tmp_path / "killed" / "checkpoints")
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "step-00000006")
    with caplog.at_level("INFO", logger="training.trainer"):
        main([*common, "--output", str(tmp_path / "killed"), "--resume"])
    # `latest` still names the deleted step 6: the resume falls back to the newest complete checkpoint
    assert "step-00000003 at step 3" in caplog.text
    straight, resumed = _weights(tmp_path / "straight" / "model"), _weights(tmp_path / "killed" / "model")
    assert straight.keys() == resumed.keys() and not any("lora" in k for k in straight)  # merged on save
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
