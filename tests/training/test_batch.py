"""The training batch (`training.batch.Batch`) as the collators write it, and a fine-tune set-up by name."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from training.batch import Batch
from training.data import Collator
from training.finetune import PromptCollator, build_finetune
from training.settings import FinetuneSettings


def sample(n: int) -> dict:
    row = {"image": f"{n}.png", "text": f"a red circle {n}", "question": "what colour?", "answer": "red"}
    return {"pixel_values": torch.full((3, 8, 8), float(n)), "text": row["text"], "image_id": n, "row": row}


def test_what_a_batch_does_not_carry_is_none():
    caption = Collator(None)([sample(0), None, sample(1)])
    assert (caption.size, caption.skipped, caption.texts) == (2, 1, ["a red circle 0", "a red circle 1"])
    assert caption.pixel_values.shape == (2, 3, 8, 8) and caption.image_ids.tolist() == [0, 1]
    assert caption.vision_hidden is None and caption.input_ids is None and caption.prompts is None
    vqa = PromptCollator("Question: {} Answer:", "question")([sample(0)])
    assert vqa.prompts == ["Question: what colour? Answer:"] and vqa.qformer_input_ids is None
    empty = Collator(None)([None, None])
    assert (empty.size, empty.skipped, empty.texts, empty.pixel_values) == (0, 2, [], None)


def test_to_moves_its_tensors_and_keeps_the_rest():
    batch = PromptCollator("Question: {} Answer:", "question")([sample(0), sample(1)])
    moved = batch.to("meta")
    assert (
        moved.pixel_values.device.type
        == moved.image_ids.device.type
        == moved.caption_ids.device.type
        == "meta"
    )
    assert (moved.texts, moved.prompts, moved.rows) == (batch.texts, batch.prompts, batch.rows)
    assert moved.input_ids is None and isinstance(moved, Batch)
    assert batch.pixel_values.device.type == "cpu"  # the batch it came from stays where it was


def test_a_lora_finetune_merges_its_adapters_before_it_saves(tiny_opt, shapes_manifest, tmp_path):
    settings = FinetuneSettings(
        task="retrieval", init=str(tiny_opt / "stage1"), train_manifest=str(shapes_manifest), lora_rank=2
    )
    setup = build_finetune(settings)
    assert setup.text_field == "text" and setup.vision_config.image_size == 64
    assert any("lora" in name for name, _ in setup.task.named_parameters())
    setup.task.save_model(tmp_path / "model")
    saved = load_file(tmp_path / "model" / "model.safetensors")
    assert saved and not any("lora" in name for name in saved)
    assert not any("lora" in name for name, _ in setup.task.named_parameters())
