"""The settings of every `blip2-train` command: one dataclass per subcommand, each field a `--flag`.

Kept apart from the code that runs them (as litgpt's `args.py`), so building the command line, `--help`
included, imports no torch, and each command function takes a typed settings object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from blip2.prompts import CAPTION_DEFAULTS, CAPTION_PREFIX, DEFAULT_PROMPTS, PAPER_NUM_BEAMS, VQA_DEFAULTS


def arg(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def _task_defaults(option: str) -> str:
    """How `eval --help` states the paper's default of one generation setting per task."""
    return f"vqa {VQA_DEFAULTS[option]:g}, caption {CAPTION_DEFAULTS[option]:g}"


@dataclass
class TrainSettings:
    """Optimisation and run settings common to every stage (defaults: the paper's recipe where it has one)."""

    output: str = arg("runs/blip2", "folder for checkpoints, log.jsonl and the final model")
    steps: int = arg(1000, "optimizer steps to run")
    batch_size: int = arg(32, "samples per process per micro-batch")
    grad_accum: int = arg(1, "micro-batches per optimizer step")
    lr: float = arg(1e-4, "peak learning rate")
    min_lr: float = arg(1e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = arg(100, "linear warm-up steps from warmup_lr to lr")
    warmup_lr: float = arg(1e-6, "learning rate at step 0")
    weight_decay: float = arg(0.05, "AdamW weight decay (not on biases and norms)")
    beta1: float = arg(0.9, "AdamW beta1")
    beta2: float = arg(0.98, "AdamW beta2")
    max_grad_norm: float = arg(0.0, "clip gradients to this norm (0: off)")
    precision: str = arg("auto", "auto | fp32 | bf16 | fp16 (autocast; Q-Former weights stay fp32)")
    seed: int = arg(42, "random seed (each rank adds its rank)")
    num_workers: int = arg(0, "DataLoader worker processes")
    log_every: int = arg(10, "steps between JSON log lines")
    save_every: int = arg(200, "steps between checkpoints (and one at the end)")
    keep_checkpoints: int = arg(2, "checkpoints kept on disk")
    resume: bool = arg(False, "continue from the last checkpoint in <output>/checkpoints")
    device: str = arg("auto", "auto | cpu | cuda")
    progress: bool = arg(True, "show a progress bar on stderr")


SAME_CAPTION_HELP = (
    "identical caption texts count as positives of each other's images: never ITM negatives in training, "
    "hits in evaluation (for data whose captions repeat across images, e.g. easy-VQA's)"
)


@dataclass
class InitSettings:
    """Assemble a fresh BLIP-2 from parts or a preset; writes <output>/stage1 and <output>/generation."""

    output: str = arg("runs/init", "folder to write the assembled checkpoints into")
    preset: str = arg("", "tiny-opt | tiny-t5: small random models with an offline tokenizer")
    vision: str = arg("", "a BLIP-2 checkpoint (its vision_model) or Blip2VisionModel folder / hub id")
    vision_config: str = arg("", "a JSON file of Blip2VisionConfig fields, for a randomly initialised tower")
    qformer_bert: str = arg(
        "", "a BERT checkpoint (folder or hub id, safetensors) to initialise the Q-Former"
    )
    llm: str = arg("", "a causal or seq2seq LM, or a BLIP-2 checkpoint (its LLM): folder or hub id; optional")
    num_query_tokens: int = arg(32, "number of learned queries")
    cross_attention_frequency: int = arg(2, "a cross-attention layer every N Q-Former layers")


@dataclass
class DataSourceSettings:
    """Where training images and texts come from (one of the three)."""

    train_manifest: str = arg("", "JSONL manifest: {'image': path, 'text': ...} per line")
    shards: str = arg("", "WebDataset shards: a comma-separated list of .tar files")
    features: str = arg("", "folder of cached ViT features (from `data cache-features`); with train_manifest")
    image_size: int = arg(
        0,
        "training image size in pixels: the ViT's position embeddings are interpolated to it once and the "
        "model is saved at that size (0: the vision tower's own)",
    )
    max_text_length: int = arg(32, "tokens per text, longer texts are truncated")
    text_processing: bool = arg(
        True,
        "LAVIS's text processing of captions and questions before tokenisation (lower case, LAVIS's "
        "punctuation removed, spaces collapsed, at most 50 words; questions end with one '?'), recorded in "
        "the model folder (text_processing.json) so the server reads text as the model was trained",
    )


@dataclass
class Stage1Settings(TrainSettings, DataSourceSettings):
    """Stage 1: train the Q-Former against the frozen ViT with ITC + ITM + ITG."""

    init: str = arg("", "stage-1 folder to start from (from `init`, or a retrieval checkpoint)")
    use_image_ids: bool = arg(False, "captions with the same image_id all count as ITC positives")
    same_caption_positives: bool = arg(False, SAME_CAPTION_HELP)


@dataclass
class Stage2Settings(TrainSettings, DataSourceSettings):
    """Stage 2: connect the Q-Former to the frozen LLM (LM loss, or prefix LM for encoder-decoder LLMs)."""

    init: str = arg("", "generation folder to start from (from `init` or an earlier stage 2)")
    stage1: str = arg("", "stage-1 checkpoint whose ViT LayerNorm, queries and Q-Former replace init's")
    prompt: str = arg("", "text put before every caption (never a target)")
    lr: float = arg(1e-4, "peak learning rate")
    min_lr: float = arg(5e-5, "learning rate at the end of the cosine decay (the paper's stage 2)")


@dataclass
class FinetuneSettings(TrainSettings, DataSourceSettings):
    """Fine-tune for a task: caption (LLM frozen), vqa (InstructBLIP format) or retrieval (stage-1 losses)."""

    task: str = arg("caption", "caption | vqa | retrieval")
    init: str = arg(
        "",
        "caption: generation folder; vqa: generation (with --stage1) or InstructBLIP folder; retrieval: stage-1 folder",
    )
    stage1: str = arg(
        "",
        "stage-1 folder: vqa takes the Q-Former's text embeddings and text FFN from it; caption its Q-Former",
    )
    prompt: str | None = arg(
        None,
        f"caption: text before each caption (default {DEFAULT_PROMPTS['caption']!r}); vqa: template with {{}} for the "
        f"question (default {DEFAULT_PROMPTS['vqa']!r})",
    )
    train_vit: bool = arg(False, "caption: train the ViT too (kept in fp32)")
    same_caption_positives: bool = arg(False, "retrieval: " + SAME_CAPTION_HELP)
    lora_rank: int = arg(0, "LoRA rank for the Q-Former's linear layers instead of full fine-tuning (0: off)")
    lora_alpha: float = arg(0.0, "LoRA scaling alpha (0: twice the rank)")
    lora_dropout: float = arg(0.0, "dropout on the LoRA path")
    lr: float = arg(1e-5, "peak learning rate (the paper's caption fine-tuning)")
    min_lr: float = arg(0.0, "learning rate at the end of the cosine decay")


@dataclass
class EvalSettings:
    """Evaluate a checkpoint: VQA accuracy, caption BLEU/CIDEr, or retrieval recall@k; writes metrics.json."""

    task: str = arg("vqa", "vqa | caption | retrieval")
    model: str = arg("", "vqa/caption: BLIP-2 generation or InstructBLIP folder; retrieval: stage-1 folder")
    manifest: str = arg("", "JSONL manifest (vqa: question + answer(s); caption/retrieval: image + text)")
    output: str = arg("runs/eval", "folder for metrics.json and predictions.jsonl")
    batch_size: int = arg(32, "images (or image-text pairs) per forward pass")
    limit: int = arg(0, "evaluate only the first N manifest rows (0: all)")
    prompt: str | None = arg(
        None,
        f"vqa: template with {{}} (default {DEFAULT_PROMPTS['vqa']!r}); caption: prefix (default "
        f"{DEFAULT_PROMPTS['caption']!r})",
    )
    num_beams: int = arg(PAPER_NUM_BEAMS, "beam width")
    max_new_tokens: int | None = arg(
        None, f"most generated tokens (default: {_task_defaults('max_new_tokens')})"
    )
    min_new_tokens: int | None = arg(
        None, f"fewest generated tokens (default: {_task_defaults('min_new_tokens')})"
    )
    length_penalty: float | None = arg(
        None, f"beam length penalty (default: {_task_defaults('length_penalty')})"
    )
    k_test: int = arg(128, "retrieval: candidates re-ranked by ITM per query")
    same_caption_positives: bool = arg(False, "retrieval: " + SAME_CAPTION_HELP)
    max_text_length: int = arg(35, "retrieval: tokens per text")
    java_metrics: bool = arg(True, "caption: PTB tokenizer, METEOR and SPICE where Java is installed")
    vqa_scoring: str = arg(
        "official",
        "vqa: official (the VQAv2 evaluation's arithmetic: human answers not normalised like the "
        "prediction; comparable with published figures) | lenient (both normalised)",
    )
    text_processing: str = arg(
        "auto",
        "questions and texts through the model folder's recorded text processing: auto (as the folder "
        "records; none recorded: as they come) | on (the record, or LAVIS's without one) | off",
    )
    device: str = arg("auto", "auto | cpu | cuda")
    progress: bool = arg(True, "show progress bars on stderr")


@dataclass
class EasyVqaSettings:
    """Import the easy-VQA package: images, VQA manifests and derived caption manifests per split."""

    output: str = arg("data/easy-vqa", "folder for images/, vqa_<split>.jsonl and captions_<split>.jsonl")
    splits: str = arg("train,test", "comma-separated splits")
    limit_images: int = arg(0, "keep the first N images of each split (0: all)")


@dataclass
class CocoSettings:
    """Import COCO captions in the Karpathy-split JSON (dataset_coco.json) as caption manifests."""

    karpathy_json: str = arg("", "the Karpathy split file, e.g. dataset_coco.json")
    images: str = arg("", "COCO image root (holds train2014/, val2014/)")
    output: str = arg("data/coco", "folder for captions_{train,val,test}.jsonl")


@dataclass
class Vqav2Settings:
    """Import VQAv2 question (+ annotation) JSON as a VQA manifest."""

    questions: str = arg("", "v2_OpenEnded_mscoco_<split>_questions.json")
    annotations: str = arg("", "v2_mscoco_<split>_annotations.json (absent for test splits)")
    images: str = arg("", "folder holding the split's COCO images")
    output: str = arg("data/vqav2/vqa.jsonl", "manifest to write")
    image_pattern: str = arg(
        "COCO_{subtype}_{image_id:012d}.jpg", "image file name from data_subtype and image_id"
    )


@dataclass
class CapfiltSettings:
    """CapFilt: sample N captions per image, rank them and the originals by ITC, keep the top K."""

    manifest: str = arg("", "caption manifest to bootstrap")
    captioner: str = arg("", "generation folder that writes the synthetic captions")
    scorer: str = arg("", "stage-1 folder whose ITC similarity ranks the captions")
    output: str = arg("data/capfilt.jsonl", "new manifest (plus <stem>.candidates.jsonl with every score)")
    num_captions: int = arg(10, "captions sampled per image")
    keep: int = arg(2, "captions kept per image (synthetic or original, by ITC rank)")
    prompt: str = arg(CAPTION_PREFIX, "captioner prompt")
    top_p: float = arg(0.9, "nucleus sampling threshold")
    max_new_tokens: int = arg(30, "most tokens per synthetic caption")
    min_new_tokens: int = arg(5, "fewest tokens per synthetic caption")
    max_text_length: int = arg(35, "scorer tokens per caption")
    batch_size: int = arg(32, "images per forward pass")
    seed: int = arg(0, "sampling seed")
    device: str = arg("auto", "auto | cpu | cuda")
    progress: bool = arg(True, "show progress bars on stderr")


@dataclass
class CacheFeaturesSettings:
    """Run the frozen ViT once over a manifest's images and store its outputs for later epochs."""

    manifest: str = arg("", "JSONL manifest whose images are encoded")
    model: str = arg("", "a stage-1 or generation folder whose vision tower is used")
    output: str = arg("runs/features", "folder for the feature shards and index.json")
    batch_size: int = arg(64, "images per forward pass")
    shard_size: int = arg(2048, "images per shard file")
    dtype: str = arg("float16", "storage dtype: float16 | float32")


@dataclass
class ShardsSettings:
    """Pack a manifest's images and rows into WebDataset tar shards, for `--shards` of the training commands."""

    manifest: str = arg("", "JSONL manifest (caption or VQA rows) to pack")
    output: str = arg("data/shards", "folder for shard-000000.tar, shard-000001.tar, ...")
    shard_size: int = arg(1000, "samples per shard")
