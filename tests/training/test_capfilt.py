"""CapFilt keeps, per image, the K captions (synthetic or original) with the highest ITC similarity."""

from __future__ import annotations

import json

import torch
from transformers import AutoProcessor, Blip2ForImageTextRetrieval

from training.assemble import preset
from training.cli import main
from training.data import load_image
from training.importers import import_easy_vqa


def test_capfilt_keeps_the_top_scored_captions(tmp_path):
    import_easy_vqa(tmp_path / "data", ("test",), limit_images=4)
    preset("tiny-opt").save(tmp_path / "init")
    out = tmp_path / "capfilt.jsonl"
    main([
        "data", "capfilt", "--manifest", str(tmp_path / "data" / "captions_test.jsonl"),
        "--captioner", str(tmp_path / "init" / "generation"), "--scorer", str(tmp_path / "init" / "stage1"),
        "--output", str(out), "--num-captions", "4", "--keep", "2", "--max-new-tokens", "6",
        "--min-new-tokens", "2", "--no-progress",
    ])  # fmt: skip
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    candidates = [json.loads(line) for line in out.with_suffix(".candidates.jsonl").read_text().splitlines()]
    images = {c["image"] for c in candidates}
    assert len(kept) == 2 * len(images)
    assert any(c["source"] == "synthetic" for c in candidates)
    # scores re-computed with plain transformers' ITC (the retrieval model, no ITM head)
    model = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "init" / "stage1").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "init" / "stage1")
    for image in images:
        mine = [c for c in candidates if c["image"] == image]
        inputs = processor(
            images=load_image(image), text=[c["text"] for c in mine], padding=True, return_tensors="pt"
        )
        with torch.no_grad():
            scores = model(**inputs, use_image_text_matching_head=False).logits_per_image[0]
        assert torch.allclose(scores, torch.tensor([c["itc"] for c in mine]), atol=1e-4)
        top = {mine[i]["text"] for i in scores.argsort(descending=True)[:2].tolist()}
        assert {k["text"] for k in kept if k["image"] == image} == top
