"""Question-conditioned VQA models in transformers' InstructBLIP format, built from our BLIP-2 checkpoints.

BLIP-2's VQA fine-tuning feeds the question into the Q-Former, where it meets the queries in
self-attention. transformers' `InstructBlipForConditionalGeneration` has exactly that Q-Former (with
text embeddings and a text feed-forward), so a VQA model is saved as an InstructBLIP folder that plain
transformers loads and generates from with `InstructBlipProcessor`.

Where the weights come from:
- the generation (stage-2) model: ViT, query tokens, the Q-Former's query path (self- and
  cross-attention, query feed-forward, embedding LayerNorm), the language projection and the LLM;
- the stage-1 model: what only it has, the Q-Former's text pathway: word and position embeddings and
  each layer's text feed-forward (`intermediate` / `output`). Its tokenizer becomes `qformer_tokenizer`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
)

from training.model import Stage1Model

_TEXT_FFN = re.compile(r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")


def instructblip_from_blip2(
    generation: Blip2ForConditionalGeneration,
    generation_processor: Blip2Processor,
    stage1: Stage1Model,
    stage1_processor: Blip2Processor,
) -> tuple[InstructBlipForConditionalGeneration, InstructBlipProcessor]:
    qformer_config = stage1.retrieval.config.qformer_config.to_dict()
    for key in ("model_type", "use_qformer_text_input", "transformers_version"):
        qformer_config.pop(key, None)
    if qformer_config["hidden_size"] != generation.config.qformer_config.hidden_size:
        raise ValueError("the stage-1 and generation Q-Formers differ in width: not the same model family")
    config = InstructBlipConfig(
        vision_config=generation.config.vision_config.to_dict(),
        qformer_config=qformer_config,
        text_config=generation.config.text_config.to_dict(),
        num_query_tokens=generation.config.num_query_tokens,
        image_token_index=generation.config.image_token_index,
    )
    model = InstructBlipForConditionalGeneration(config)
    weights: dict[str, torch.Tensor] = {}
    for key, value in generation.state_dict().items():
        weights[key.replace("qformer.layernorm.", "qformer.embeddings.layernorm.")] = value
    for key, value in stage1.retrieval.state_dict().items():
        if key.startswith("embeddings."):
            weights["qformer." + key] = value
        elif _TEXT_FFN.match(key):
            weights[key] = value
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    if missing:
        raise ValueError(f"no source for InstructBLIP weights {missing[:4]}")
    model.load_state_dict({k: weights[k] for k in own})
    processor = InstructBlipProcessor(
        image_processor=generation_processor.image_processor,
        tokenizer=generation_processor.tokenizer,
        qformer_tokenizer=stage1_processor.tokenizer,
        num_query_tokens=config.num_query_tokens,
    )
    return model, processor


def is_instructblip(folder: str | Path) -> bool:
    return AutoConfig.from_pretrained(folder).model_type == "instructblip"


def load_vqa_model(
    init: str, stage1: str = ""
) -> tuple[InstructBlipForConditionalGeneration, InstructBlipProcessor]:
    """An InstructBLIP folder as it is, or one assembled from a generation folder and a stage-1 folder."""
    from transformers import AutoProcessor

    if is_instructblip(init):
        return (
            InstructBlipForConditionalGeneration.from_pretrained(init, dtype=torch.float32),
            InstructBlipProcessor.from_pretrained(init),
        )
    if not stage1:
        raise SystemExit(
            "vqa fine-tuning from a BLIP-2 generation folder needs --stage1 (the Q-Former's text half)"
        )
    generation = Blip2ForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
    return instructblip_from_blip2(
        generation,
        AutoProcessor.from_pretrained(init),
        Stage1Model.from_pretrained(stage1),
        AutoProcessor.from_pretrained(stage1),
    )
