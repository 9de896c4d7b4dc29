"""`blip2-train data capfilt`: the paper's caption bootstrapping (CapFilt) over a caption manifest.

For each image a generation model samples N captions (nucleus sampling, as BLIP's captioner does); the
synthetic captions and the image's original texts are ranked by the ITC similarity of a stage-1 model
(the best cosine over the image's query features, as in retrieval); the top K are kept. The new manifest
holds one row per kept caption with its `source` (original / synthetic) and `itc` score; every
candidate and its score is also written to `<output stem>.candidates.jsonl` for inspection.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from blip2.scores import itc_similarity
from training.data import group_by_image, read_manifest, text_tokens, write_jsonl
from training.inference import generate_texts, load_generation_model, pick_device
from training.scoring import itc_image_features, itc_text_features
from training.settings import CapfiltSettings


@torch.no_grad()
def capfilt(s: CapfiltSettings) -> dict:
    if not (s.manifest and s.captioner and s.scorer and s.output):
        raise SystemExit("capfilt needs --manifest, --captioner, --scorer and --output")
    from transformers import AutoProcessor

    from training.model import Stage1Model

    device = pick_device(s.device)
    torch.manual_seed(s.seed)
    rows = read_manifest(s.manifest)
    row_image, first_rows = group_by_image(rows)
    originals: list[list[str]] = [[] for _ in first_rows]  # each image's own captions, once each
    for row, index in zip(rows, row_image, strict=True):
        if row.get("text") and row["text"] not in originals[index]:
            originals[index].append(row["text"])
    paths = [row["image"] for row in first_rows]

    captioner, captioner_processor = load_generation_model(s.captioner, device)
    synthetic = generate_texts(
        captioner, captioner_processor, paths, [s.prompt] * len(paths), s.batch_size, s.progress,
        do_sample=True, top_p=s.top_p, num_return_sequences=s.num_captions,
        max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens,
    )  # fmt: skip
    del captioner

    scorer = Stage1Model.from_pretrained(s.scorer).to(device).eval()
    scorer_processor = AutoProcessor.from_pretrained(s.scorer)
    # ITC ranks the captions: the ViT outputs (kept for ITM in retrieval) would only take up memory here
    _, image_feats = itc_image_features(
        scorer, scorer_processor, paths, s.batch_size, s.progress, keep_vit_output=False
    )
    kept_rows, candidate_rows = [], []
    for position, (first, own) in enumerate(zip(first_rows, originals, strict=True)):
        generated = synthetic[position * s.num_captions : (position + 1) * s.num_captions]
        candidates = [(t, "original") for t in own]
        candidates += [(t, "synthetic") for t in dict.fromkeys(generated) if t and t not in own]
        tokens = text_tokens(scorer_processor.tokenizer, [t for t, _ in candidates], s.max_text_length).to(
            device
        )
        scores = itc_similarity(image_feats[position : position + 1], itc_text_features(scorer, tokens, 256))[
            0
        ]
        ranked = sorted(zip(scores.tolist(), candidates, strict=True), key=lambda item: -item[0])
        base = {k: v for k, v in first.items() if k not in ("text", "image")}
        for rank, (score, (text, source)) in enumerate(ranked):
            row = {
                "image": first["image"],
                "text": text,
                **base,
                "source": source,
                "itc": round(score, 6),
            }
            candidate_rows.append(row | {"rank": rank})
            if rank < s.keep:
                kept_rows.append(row)
    output = Path(s.output)
    write_jsonl(output, kept_rows)
    write_jsonl(output.with_suffix(".candidates.jsonl"), candidate_rows)
    summary = {
        "images": len(first_rows),
        "kept": len(kept_rows),
        "kept_synthetic": sum(r["source"] == "synthetic" for r in kept_rows),
        "candidates": len(candidate_rows),
        "output": str(output),
    }
    print(json.dumps({"summary": summary}), flush=True)
    return summary
