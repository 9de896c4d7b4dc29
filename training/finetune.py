"""`blip2-train finetune --task caption|vqa|retrieval`: the paper's task fine-tuning, on the shared loop.

- caption: `Stage2Task` with the LLM frozen and the prompt "a photo of" (never a target); the Q-Former
  trains, and with `--train-vit` the ViT too (in fp32). `--image-size` above the tower's native size
  interpolates its position embeddings once (bicubic, as LAVIS does) and saves the model at that size.
- vqa: `Stage2Task` on an InstructBLIP model (see `training.instructblip`): the prompt
  "Question: {} Short answer:" goes to the LLM and, through the `qformer_tokenizer`, into the
  Q-Former, where it conditions the queries; the loss is on the answer only, the LLM frozen.
- retrieval: `Stage1Task` (ITC + ITM + ITG) with image ids, so every caption of an image is a positive.
- `--lora-rank r`: LoRA adapters on the Q-Former's linear layers instead of training its weights,
  merged back before the model is saved.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

from blip2.prompts import DEFAULT_PROMPTS, resolve_prompt
from blip2.text import TextProcessing
from training.batch import Batch
from training.data import Collator, text_tokens, training_text_processing
from training.settings import FinetuneSettings
from training.stages import join_target

log = logging.getLogger(__name__)

TASKS = tuple(DEFAULT_PROMPTS)


class PromptCollator:
    """Batches for Stage2Task with a prompt per sample, `prompt.format(row[field])` (VQA: the question;
    a row's own `prompt` template, when it has one, instead of the run's), and the target text joined to
    it; given a Q-Former tokenizer, the prompt is tokenized for it too. Given a `TextProcessing`, the
    question goes through it before it enters the template (the template is the model's own text; the
    answer is a target, left as it is, as in LAVIS's VQA datasets)."""

    def __init__(
        self,
        prompt: str,
        field: str,
        qformer_tokenizer=None,
        max_text_length: int = 32,
        text_processing: TextProcessing | None = None,
    ):
        self.prompt, self.field, self.qformer_tokenizer = prompt, field, qformer_tokenizer
        self.max_text_length, self.text_processing = max_text_length, text_processing
        self.collate = Collator(None)

    def _prompt(self, row: dict) -> str:
        question = row[self.field]
        if self.text_processing is not None and question:
            question = self.text_processing.question(question)
        return row.get("prompt", self.prompt).format(question)

    def __call__(self, samples: list[dict | None]) -> Batch:
        batch = self.collate(samples)
        if batch.size == 0:
            return batch
        prompts = [self._prompt(row) for row in batch.rows]
        batch.prompts = prompts
        batch.texts = [join_target(p, t) for p, t in zip(prompts, batch.texts, strict=True)]
        if self.qformer_tokenizer is not None:
            tokens = text_tokens(self.qformer_tokenizer, prompts, self.max_text_length)
            batch.qformer_input_ids, batch.qformer_attention_mask = (
                tokens["input_ids"],
                tokens["attention_mask"],
            )
        return batch


@dataclass
class FinetuneSetup:
    """What `finetune --task` trains: its task module and collate function, the vision tower's config (at
    the training image size, for the image transform) and the manifest field that holds the target."""

    task: nn.Module
    collate: Callable[[list[dict | None]], Batch]
    vision_config: PretrainedConfig
    text_field: str


def build_finetune(s: FinetuneSettings) -> FinetuneSetup:
    from training.instructblip import load_vqa_model
    from training.lora import add_qformer_lora, count_parameters, merge_lora
    from training.model import resize_vision_tower
    from training.stages import Stage1Task, Stage2Task, load_generation, load_stage1

    if s.task not in TASKS:
        raise SystemExit(f"--task must be one of {', '.join(TASKS)}")
    if not s.init:
        raise SystemExit("finetune needs --init (a generation, stage-1 or InstructBLIP folder)")
    if s.train_vit and s.task != "caption":
        raise SystemExit("--train-vit is a caption fine-tuning option")
    if s.train_vit and s.features:
        raise SystemExit("--train-vit needs images: cached --features are the frozen ViT's output")
    prompt = resolve_prompt(s.task, s.prompt)
    text_processing = training_text_processing(s)
    if s.task == "retrieval":
        model, processor = load_stage1(s.init, s.image_size)
        vision, qformer, frozen = (
            model.retrieval.vision_model,
            model.retrieval.qformer,
            [model.retrieval.embeddings],
        )
        task = Stage1Task(
            model, processor, use_image_ids=True, same_caption_positives=s.same_caption_positives
        )
        collate, text_field = Collator(processor.tokenizer, s.max_text_length, text_processing), "text"
    elif s.task == "caption":
        model, processor = load_generation(s.init, s.stage1, s.image_size)
        vision, qformer, frozen = model.vision_model, model.qformer, []
        task = Stage2Task(
            model, processor, prompt=prompt, max_text_length=s.max_text_length, train_vit=s.train_vit
        )
        # the task puts its one prompt before each caption
        collate, text_field = Collator(None, text_processing=text_processing), "text"
    else:
        model, processor = load_vqa_model(s.init, s.stage1)
        vision, qformer, frozen = model.vision_model, model.qformer, []
        resize_vision_tower(vision, processor.image_processor, s.image_size)
        task = Stage2Task(model, processor, max_text_length=s.max_text_length)
        collate = PromptCollator(
            prompt, "question", processor.qformer_tokenizer, s.max_text_length, text_processing
        )
        text_field = "answer"
    task.text_processing = text_processing
    if s.lora_rank > 0:
        tuner = add_qformer_lora(qformer, s.lora_rank, s.lora_alpha, s.lora_dropout, frozen=frozen)
        # The saved folder holds merged weights: plain transformers loads it without peft.
        task.before_save = functools.partial(merge_lora, tuner)
    log.info("finetune %s: parameters %s", s.task, count_parameters(task))
    return FinetuneSetup(task, collate, vision.config, text_field)
