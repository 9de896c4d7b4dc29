"""What each stage trains: a Task module per stage, whose forward(batch) returns its named losses.

Stage 1 trains the Q-Former against the frozen ViT (ITC + ITM + ITG). Stage 2 connects the Q-Former
through one linear projection to a frozen LLM: language modelling for decoder LLMs (OPT, Qwen2,
Llama...), prefix language modelling for encoder-decoder LLMs (Flan-T5). In both, the ViT blocks are
frozen and kept in eval mode, and its final LayerNorm trains with the Q-Former, as in LAVIS.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoProcessor, Blip2ForConditionalGeneration
from transformers.models.blip_2.modeling_blip_2 import BaseModelOutputWithVisionQformerOutputs

from blip2.text import TextProcessing, save_text_processing
from blip2.vocab import check_vocabulary, unreachable_special_pieces
from training.assemble import copy_stage1_into_generation
from training.batch import Batch
from training.losses import stage1_losses
from training.model import (
    Stage1Model,
    freeze_vision_blocks,
    frozen_vision_features,
    resize_vision_tower,
    vision_block_features,
)
from training.vocab import check_generation_vocabulary


class _FrozenVisionTask(nn.Module):
    """Shared by the stages: the frozen ViT stays in eval mode whatever mode the task is put in.

    Caption fine-tuning may unfreeze it (`train_vit`): then it trains, and runs and stays in fp32.
    """

    vision_model: nn.Module
    model: nn.Module
    processor: object
    train_vit: bool = False
    # The text processing the batches' texts went through (their collator's), recorded beside the weights.
    text_processing: TextProcessing | None = None
    # Called before the weights are written (LoRA fine-tuning: fold the adapters into the Q-Former).
    before_save: Callable[[], object] | None = None

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_vit:
            freeze_vision_blocks(self.vision_model)
        return self

    def vision_hidden(self, batch: Batch) -> torch.Tensor:
        if batch.vision_hidden is not None:  # cached by `blip2-train data cache-features`
            if self.train_vit:
                raise ValueError("cached ViT features cannot train the ViT: drop --features or --train-vit")
            return batch.vision_hidden.float()
        if self.train_vit:
            pixels = batch.pixel_values
            with torch.autocast(pixels.device.type, enabled=False):  # fp16/bf16 ViT training diverges
                return vision_block_features(self.vision_model, pixels.float())
        return frozen_vision_features(self.vision_model, batch.pixel_values)

    def save_model(self, folder: Path) -> None:
        """The folder transformers loads (weights, processor) and the text processing it was trained with."""
        if self.before_save is not None:
            self.before_save()
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)
        save_text_processing(folder, self.text_processing)

    def prepare_for_device(self, device: torch.device, settings) -> None:
        """On a GPU the frozen ViT runs in fp16 (as in the paper); trainable weights stay fp32."""
        if device.type == "cuda" and settings.precision != "fp32" and not self.train_vit:
            for module in (self.vision_model.embeddings, self.vision_model.encoder):
                module.half()


class Stage1Task(_FrozenVisionTask):
    def __init__(
        self, model: Stage1Model, processor, use_image_ids: bool = False, same_caption_positives: bool = False
    ) -> None:
        super().__init__()
        self.model, self.processor, self.use_image_ids = model, processor, use_image_ids
        self.same_caption_positives = same_caption_positives
        self.vision_model = model.retrieval.vision_model
        freeze_vision_blocks(self.vision_model)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        losses = stage1_losses(
            self.model,
            self.vision_hidden(batch),
            batch.input_ids,
            batch.attention_mask,
            image_ids=batch.image_ids if self.use_image_ids else None,
            caption_ids=batch.caption_ids if self.same_caption_positives else None,
        )
        return {"loss": losses.total, "itc": losses.itc, "itm": losses.itm, "itg": losses.itg}


def load_stage1(init: str, image_size: int = 0) -> tuple[Stage1Model, object]:
    """A stage-1 folder and its processor, the ViT resized to `image_size` (0: as saved) before any task
    freezes it."""
    processor = AutoProcessor.from_pretrained(init)
    model = Stage1Model.from_pretrained(init)
    check_vocabulary(init, processor.tokenizer, model.retrieval.embeddings.word_embeddings)
    resize_vision_tower(model.retrieval.vision_model, processor.image_processor, image_size)
    return model, processor


def load_generation(
    init: str, stage1: str = "", image_size: int = 0
) -> tuple[Blip2ForConditionalGeneration, object]:
    """A generation folder and its processor (fp32 for training), its ViT and Q-Former taken from a stage-1
    folder when one is given, the ViT resized to `image_size` (0: as saved)."""
    processor = AutoProcessor.from_pretrained(init)
    model = Blip2ForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
    check_generation_vocabulary(model, processor, init)
    unreachable_special_pieces(processor.tokenizer)  # captions are text (Stage2Task tokenises them)
    if stage1:
        copy_stage1_into_generation(Stage1Model.from_pretrained(stage1), model)
    resize_vision_tower(model.vision_model, processor.image_processor, image_size)
    return model, processor


def join_target(prompt: str, text: str) -> str:
    """The target as it follows the prompt: one space between them (the prompt is context, not target)."""
    return " " + text.strip() if prompt and not prompt[-1].isspace() else text.strip()


def project_queries(
    model: nn.Module,
    vision_hidden: torch.Tensor,
    qformer_input_ids: torch.Tensor | None = None,
    qformer_attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image -> soft visual prompt: LayerNorm, Q-Former queries over the image, linear projection to the LLM.

    With `qformer_input_ids` (an InstructBLIP model) the question enters the Q-Former too and meets the
    queries in self-attention, so the queries are question-conditioned; only the query outputs are kept.
    """
    image_embeds = model.vision_model.post_layernorm(vision_hidden)
    queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    if qformer_input_ids is None:
        query_output = model.qformer(
            query_embeds=queries, encoder_hidden_states=image_embeds
        ).last_hidden_state
    else:
        query_mask = torch.ones(queries.shape[:2], dtype=qformer_attention_mask.dtype, device=queries.device)
        query_output = model.qformer(
            input_ids=qformer_input_ids,
            attention_mask=torch.cat([query_mask, qformer_attention_mask], dim=1),
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
        ).last_hidden_state[:, : queries.shape[1]]
    return model.language_projection(query_output)


class Stage2Task(_FrozenVisionTask):
    """Generative learning with the LLM frozen. Also serves caption and VQA fine-tuning (per-sample prompts).

    Decoder LLMs: input [queries; bos prompt text eos], loss on the text only (prompt, queries and
    padding are -100). LAVIS ends the target with "\\n"; we end it with the tokenizer's eos, so plain
    `generate()` stops by itself. Encoder-decoder LLMs with a prompt: the prompt (and queries) go to the
    encoder and the text is the target; without a prompt, prefix LM: a split point drawn between token 1
    and the middle, the prefix to the encoder, the rest as the target.
    """

    def __init__(
        self,
        model: Blip2ForConditionalGeneration,
        processor,
        prompt: str = "",
        max_text_length: int = 32,
        train_vit: bool = False,
    ) -> None:
        super().__init__()
        self.train_vit = train_vit
        self.model, self.processor, self.prompt, self.max_text_length = (
            model,
            processor,
            prompt,
            max_text_length,
        )
        self.vision_model = model.vision_model
        self.tokenizer = processor.tokenizer
        self.decoder_only = model.config.use_decoder_only_language_model
        model.language_model.requires_grad_(False)
        model.language_model.eval()
        if train_vit:
            self.vision_model.requires_grad_(True)
        else:
            freeze_vision_blocks(self.vision_model)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.language_model.eval()  # frozen LLM: no dropout
        return self

    def _ids(self, text: str, special: bool) -> list[int]:
        # The template's own bos/eos are placed by `special`; the text's spellings of them stay text.
        return self.tokenizer(
            text,
            add_special_tokens=special,
            truncation=True,
            max_length=self.max_text_length,
            split_special_tokens=True,
        )["input_ids"]

    def _decoder_only_rows(self, prompts: list[str], texts: list[str]) -> list[tuple[list[int], list[int]]]:
        rows = []
        for prompt, text in zip(prompts, texts, strict=True):
            # bos (where the tokenizer adds one) and the prompt are context, never targets
            context = len(self._ids(prompt, special=True))
            ids = self._ids(prompt + text, special=True)[: self.max_text_length - 1] + [
                self.tokenizer.eos_token_id
            ]
            rows.append((ids, [-100] * context + ids[context:]))
        return rows

    def _encoder_decoder_rows(self, prompts: list[str], texts: list[str]):
        rows = []
        eos = self.tokenizer.eos_token_id
        for prompt, text in zip(prompts, texts, strict=True):
            if prompt:
                source, target = self._ids(prompt, special=False), self._ids(text, special=False)
            else:
                tokens = self._ids(text, special=False)
                split = random.randint(1, max(1, len(tokens) // 2))
                source, target = tokens[:split], tokens[split:]
            rows.append((source + [eos], target + [eos]))
        return rows

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        texts = batch.texts
        if batch.prompts is not None:  # per-sample prompts come with their targets already joined
            prompts = batch.prompts
        else:
            prompts = [self.prompt] * len(texts)
            texts = [join_target(self.prompt, text) for text in texts]
        projected = project_queries(
            self.model,
            self.vision_hidden(batch),
            batch.qformer_input_ids,
            batch.qformer_attention_mask,
        )
        device, num_queries = projected.device, projected.shape[1]
        image_token = self.model.config.image_token_index
        pad = self.tokenizer.pad_token_id
        if self.decoder_only:
            rows = self._decoder_only_rows(prompts, texts)
            width = max(len(ids) for ids, _ in rows)
            input_ids = [[image_token] * num_queries + ids + [pad] * (width - len(ids)) for ids, _ in rows]
            labels = [[-100] * num_queries + lab + [-100] * (width - len(lab)) for _, lab in rows]
            attention = [[1] * (num_queries + len(ids)) + [0] * (width - len(ids)) for ids, _ in rows]
            extra = {}
        else:
            rows = self._encoder_decoder_rows(prompts, texts)
            width = max(len(src) for src, _ in rows)
            target_width = max(len(tgt) for _, tgt in rows)
            input_ids = [[image_token] * num_queries + src + [pad] * (width - len(src)) for src, _ in rows]
            attention = [[1] * (num_queries + len(src)) + [0] * (width - len(src)) for src, _ in rows]
            labels = [tgt + [-100] * (target_width - len(tgt)) for _, tgt in rows]
            decoder_mask = [[1] * len(tgt) + [0] * (target_width - len(tgt)) for _, tgt in rows]
            extra = {"decoder_attention_mask": torch.tensor(decoder_mask, device=device)}
        if batch.qformer_input_ids is not None:  # InstructBLIP's forward requires them (already used above)
            extra["qformer_input_ids"] = batch.qformer_input_ids
        image_outputs = BaseModelOutputWithVisionQformerOutputs(pooler_output=projected)
        output = self.model(
            pixel_values=None,
            input_ids=torch.tensor(input_ids, device=device),
            attention_mask=torch.tensor(attention, device=device),
            labels=torch.tensor(labels, device=device),
            mm_encoder_outputs={"image": image_outputs},
            **extra,
        )
        return {"loss": output.loss}
