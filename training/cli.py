"""`blip2-train SUBCOMMAND`: one command line, each subcommand a typed settings dataclass and a function.

Every field of a settings dataclass is a `--flag` (its help text is the field's `help`); `--config
recipe.yaml` fills fields from a YAML file first, and flags given on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from training.trainer import TrainSettings


def arg(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


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
        "caption: text before each caption (default 'a photo of'); vqa: template with {} for the question (default 'Question: {} Short answer:')",
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
        "vqa: template with {} (default 'Question: {} Short answer:'); caption: prefix (default 'a photo of')",
    )
    num_beams: int = arg(5, "beam width")
    max_new_tokens: int | None = arg(None, "most generated tokens (default: vqa 10, caption 30)")
    min_new_tokens: int | None = arg(None, "fewest generated tokens (default: vqa 0, caption 8)")
    length_penalty: float | None = arg(None, "beam length penalty (default: vqa -1, caption 1)")
    k_test: int = arg(128, "retrieval: candidates re-ranked by ITM per query")
    same_caption_positives: bool = arg(False, "retrieval: " + SAME_CAPTION_HELP)
    max_text_length: int = arg(35, "retrieval: tokens per text")
    java_metrics: bool = arg(True, "caption: PTB tokenizer, METEOR and SPICE where Java is installed")
    vqa_scoring: str = arg(
        "official",
        "vqa: official (the VQAv2 evaluation's arithmetic: human answers not normalised like the "
        "prediction; comparable with published figures) | lenient (both normalised)",
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
    prompt: str = arg("a photo of", "captioner prompt")
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


def _unwrap_optional(kind: Any) -> Any:
    """`X | None` -> X: an optional setting takes X on the command line, None means "the default"."""
    if get_origin(kind) in (Union, types.UnionType):
        args = [a for a in get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


def _add_dataclass_arguments(parser: argparse.ArgumentParser, settings_class: type) -> None:
    hints = get_type_hints(settings_class)
    for f in dataclasses.fields(settings_class):
        kind = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if kind is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text)


def _settings_from(args: argparse.Namespace, settings_class: type):
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(settings_class)}
    if getattr(args, "config", None):
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        unknown = set(loaded) - names
        if unknown:
            raise SystemExit(f"{args.config}: unknown settings {sorted(unknown)}")
        values.update(loaded)
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    return settings_class(**values)


def run_init(s: InitSettings) -> dict:
    from training import assemble

    if s.preset:
        parts = assemble.preset(s.preset)
    else:
        if not s.qformer_bert:
            raise SystemExit("init needs --preset, or --qformer-bert with --vision or --vision-config")
        parts = assemble.from_parts(
            qformer_bert=s.qformer_bert,
            vision=s.vision or None,
            vision_config=json.loads(Path(s.vision_config).read_text()) if s.vision_config else None,
            llm=s.llm or None,
            num_query_tokens=s.num_query_tokens,
            cross_attention_frequency=s.cross_attention_frequency,
        )
    written = parts.save(s.output)
    print(json.dumps({"summary": written}))
    return written


def _dataset(s: DataSourceSettings, vision_config, text_field: str = "text"):
    """The training data for a vision tower already resized to `--image-size` (see `resize_vision_tower`)."""
    from training.data import FeatureDataset, ImageTransform, ManifestDataset, WebDatasetShards
    from training.features import check_features_fit

    transform = ImageTransform(vision_config.image_size, train=True)
    if s.features:
        if not s.train_manifest:
            raise SystemExit("--features needs --train-manifest (which rows to train on)")
        check_features_fit(s.features, vision_config)
        return FeatureDataset(s.train_manifest, s.features, text_field)
    if s.shards:
        return WebDatasetShards([u for u in s.shards.split(",") if u], transform, text_field)
    if s.train_manifest:
        return ManifestDataset(s.train_manifest, transform, text_field)
    raise SystemExit("no training data: give --train-manifest, --shards or --features")


def run_stage1(s: Stage1Settings) -> dict:
    from training.data import Collator
    from training.stages import Stage1Task, load_stage1
    from training.trainer import train

    if not s.init:
        raise SystemExit("stage1 needs --init (a stage-1 folder, e.g. from `blip2-train init`)")
    model, processor = load_stage1(s.init, s.image_size)
    task = Stage1Task(
        model, processor, use_image_ids=s.use_image_ids, same_caption_positives=s.same_caption_positives
    )
    dataset = _dataset(s, model.retrieval.vision_model.config)
    return train(task, dataset, Collator(processor.tokenizer, s.max_text_length), s)


def run_stage2(s: Stage2Settings) -> dict:
    from training.data import Collator
    from training.stages import Stage2Task, load_generation
    from training.trainer import train

    if not s.init:
        raise SystemExit("stage2 needs --init (a generation folder, e.g. <init output>/generation)")
    model, processor = load_generation(s.init, s.stage1, s.image_size)
    task = Stage2Task(model, processor, prompt=s.prompt, max_text_length=s.max_text_length)
    dataset = _dataset(s, model.vision_model.config)
    return train(task, dataset, Collator(None), s)


def run_finetune(s: FinetuneSettings) -> dict:
    from training.finetune import build_finetune
    from training.trainer import train

    task, collate, vision_config, text_field = build_finetune(s)
    return train(task, _dataset(s, vision_config, text_field), collate, s)


def run_eval(s: EvalSettings) -> dict:
    from training.evaluate import run_eval as evaluate

    return evaluate(s)


def _print_summary(summary: dict) -> dict:
    print(json.dumps({"summary": summary}), flush=True)
    return summary


def run_easy_vqa(s: EasyVqaSettings) -> dict:
    from training.importers import import_easy_vqa

    splits = tuple(x for x in s.splits.split(",") if x)
    return _print_summary(import_easy_vqa(s.output, splits, s.limit_images))


def run_coco(s: CocoSettings) -> dict:
    from training.importers import import_coco_karpathy

    if not s.karpathy_json or not s.images:
        raise SystemExit("coco needs --karpathy-json and --images")
    return _print_summary(import_coco_karpathy(s.karpathy_json, s.images, s.output))


def run_vqav2(s: Vqav2Settings) -> dict:
    from training.importers import import_vqav2

    if not s.questions or not s.images:
        raise SystemExit("vqav2 needs --questions and --images")
    summary = import_vqav2(s.questions, s.images, s.output, s.annotations or None, s.image_pattern)
    return _print_summary(summary)


def run_capfilt(s: CapfiltSettings) -> dict:
    from training.capfilt import capfilt

    return capfilt(s)


def run_cache_features(s: CacheFeaturesSettings) -> dict:
    from training.features import cache_features

    return cache_features(s)


def run_shards(s: ShardsSettings) -> dict:
    from training.importers import write_webdataset_shards

    if not s.manifest:
        raise SystemExit("shards needs --manifest")
    if s.shard_size < 1:
        raise SystemExit("--shard-size must be at least 1")
    return _print_summary(write_webdataset_shards(s.manifest, s.output, s.shard_size))


Command = tuple[type, Callable[[Any], Any]]
COMMANDS: dict[str, Command] = {
    "init": (InitSettings, run_init),
    "stage1": (Stage1Settings, run_stage1),
    "stage2": (Stage2Settings, run_stage2),
    "finetune": (FinetuneSettings, run_finetune),
    "eval": (EvalSettings, run_eval),
}
DATA_COMMANDS: dict[str, Command] = {
    "cache-features": (CacheFeaturesSettings, run_cache_features),
    "shards": (ShardsSettings, run_shards),
    "easy-vqa": (EasyVqaSettings, run_easy_vqa),
    "coco": (CocoSettings, run_coco),
    "vqav2": (Vqav2Settings, run_vqav2),
    "capfilt": (CapfiltSettings, run_capfilt),
}


def _subparsers(parent: argparse.ArgumentParser, commands: dict[str, Command], dest: str) -> None:
    sub = parent.add_subparsers(dest=dest, required=True)
    for name, (settings_class, function) in commands.items():
        doc = (settings_class.__doc__ or "").strip().splitlines()[0]
        parser = sub.add_parser(name, help=doc, description=doc)
        parser.add_argument("--config", help="YAML file of settings; command-line flags override it")
        _add_dataclass_arguments(parser, settings_class)
        parser.set_defaults(settings_class=settings_class, function=function)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip2-train", description="Train and evaluate BLIP-2 models.")
    _subparsers(parser, COMMANDS, "command")
    data = parser._subparsers._group_actions[0].add_parser(
        "data",
        help="data importers, WebDataset shards and feature caching",
        description="data importers, WebDataset shards and feature caching",
    )
    _subparsers(data, DATA_COMMANDS, "data_command")
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    args = build_parser().parse_args(argv)
    args.function(_settings_from(args, args.settings_class))


if __name__ == "__main__":
    main()
