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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from training.trainer import TrainSettings


def arg(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


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
    llm: str = arg("", "any transformers causal LM or seq2seq LM (folder or hub id); optional")
    num_query_tokens: int = arg(32, "number of learned queries")
    cross_attention_frequency: int = arg(2, "a cross-attention layer every N Q-Former layers")


@dataclass
class DataSourceSettings:
    """Where training images and texts come from (one of the three)."""

    train_manifest: str = arg("", "JSONL manifest: {'image': path, 'text': ...} per line")
    shards: str = arg("", "WebDataset shards: a comma-separated list of .tar files")
    features: str = arg("", "folder of cached ViT features (from `data cache-features`); with train_manifest")
    image_size: int = arg(0, "training image size in pixels (0: the vision tower's own)")
    max_text_length: int = arg(32, "tokens per text, longer texts are truncated")


@dataclass
class Stage1Settings(TrainSettings, DataSourceSettings):
    """Stage 1: train the Q-Former against the frozen ViT with ITC + ITM + ITG."""

    init: str = arg("", "stage-1 folder to start from (from `init`, or a retrieval checkpoint)")
    use_image_ids: bool = arg(False, "captions with the same image_id all count as ITC positives")


@dataclass
class Stage2Settings(TrainSettings, DataSourceSettings):
    """Stage 2: connect the Q-Former to the frozen LLM (LM loss, or prefix LM for encoder-decoder LLMs)."""

    init: str = arg("", "generation folder to start from (from `init` or an earlier stage 2)")
    stage1: str = arg("", "stage-1 checkpoint whose ViT LayerNorm, queries and Q-Former replace init's")
    prompt: str = arg("", "text put before every caption (never a target)")
    lr: float = arg(1e-4, "peak learning rate")
    min_lr: float = arg(5e-5, "learning rate at the end of the cosine decay (the paper's stage 2)")


@dataclass
class CacheFeaturesSettings:
    """Run the frozen ViT once over a manifest's images and store its outputs for later epochs."""

    manifest: str = arg("", "JSONL manifest whose images are encoded")
    model: str = arg("", "a stage-1 or generation folder whose vision tower is used")
    output: str = arg("runs/features", "folder for the feature shards and index.json")
    batch_size: int = arg(64, "images per forward pass")
    shard_size: int = arg(2048, "images per shard file")
    dtype: str = arg("float16", "storage dtype: float16 | float32")


def _add_dataclass_arguments(parser: argparse.ArgumentParser, settings_class: type) -> None:
    hints = get_type_hints(settings_class)
    for f in dataclasses.fields(settings_class):
        kind = hints[f.name]
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
    if getattr(args, "config", None):
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        names = {f.name for f in dataclasses.fields(settings_class)}
        unknown = set(loaded) - names
        if unknown:
            raise SystemExit(f"{args.config}: unknown settings {sorted(unknown)}")
        values.update(loaded)
    values.update(
        {k: v for k, v in vars(args).items() if k in _field_names(settings_class) and v is not None}
    )
    return settings_class(**values)


def _field_names(settings_class: type) -> set[str]:
    return {f.name for f in dataclasses.fields(settings_class)}


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


def _dataset(s: DataSourceSettings, image_size: int):
    from training.data import FeatureDataset, ImageTransform, ManifestDataset, WebDatasetShards

    transform = ImageTransform(s.image_size or image_size, train=True)
    if s.features:
        if not s.train_manifest:
            raise SystemExit("--features needs --train-manifest (which rows to train on)")
        return FeatureDataset(s.train_manifest, s.features)
    if s.shards:
        return WebDatasetShards([u for u in s.shards.split(",") if u], transform)
    if s.train_manifest:
        return ManifestDataset(s.train_manifest, transform)
    raise SystemExit("no training data: give --train-manifest, --shards or --features")


def run_stage1(s: Stage1Settings) -> dict:
    from transformers import AutoProcessor

    from training.data import Collator
    from training.model import Stage1Model
    from training.stages import Stage1Task
    from training.trainer import train

    if not s.init:
        raise SystemExit("stage1 needs --init (a stage-1 folder, e.g. from `blip2-train init`)")
    processor = AutoProcessor.from_pretrained(s.init)
    model = Stage1Model.from_pretrained(s.init)
    task = Stage1Task(model, processor, use_image_ids=s.use_image_ids)
    dataset = _dataset(s, model.retrieval.config.vision_config.image_size)
    return train(task, dataset, Collator(processor.tokenizer, s.max_text_length), s)


def run_stage2(s: Stage2Settings) -> dict:
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    from training.assemble import copy_stage1_into_generation
    from training.data import Collator
    from training.model import Stage1Model
    from training.stages import Stage2Task
    from training.trainer import train

    if not s.init:
        raise SystemExit("stage2 needs --init (a generation folder, e.g. <init output>/generation)")
    processor = AutoProcessor.from_pretrained(s.init)
    model = Blip2ForConditionalGeneration.from_pretrained(s.init, dtype="float32")
    if s.stage1:
        copy_stage1_into_generation(Stage1Model.from_pretrained(s.stage1), model)
    task = Stage2Task(model, processor, prompt=s.prompt, max_text_length=s.max_text_length)
    dataset = _dataset(s, model.config.vision_config.image_size)
    return train(task, dataset, Collator(None), s)


def run_cache_features(s: CacheFeaturesSettings) -> dict:
    from training.features import cache_features

    return cache_features(s)


Command = tuple[type, Callable[[Any], Any]]
COMMANDS: dict[str, Command] = {
    "init": (InitSettings, run_init),
    "stage1": (Stage1Settings, run_stage1),
    "stage2": (Stage2Settings, run_stage2),
}
DATA_COMMANDS: dict[str, Command] = {
    "cache-features": (CacheFeaturesSettings, run_cache_features),
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
        "data", help="data importers and feature caching", description="data importers and feature caching"
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
