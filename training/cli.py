"""`blip2-train SUBCOMMAND`: one command line, each subcommand a typed settings dataclass and a function.

Every field of a settings dataclass (`training/settings.py`) is a `--flag` (its help text is the field's
`help`); `--config recipe.yaml` fills fields from a YAML file first (recipes/tiny_stage1.yaml is an
example), and flags given on the command line win. Each command imports torch and the modules it runs only
when it runs, so building the parser and `--help` stay light.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from blip2.logs import quiet_third_party_logs, quiet_transformers_progress_bars
from training.errors import InputError, check_readable
from training.settings import (
    CacheFeaturesSettings,
    CapfiltSettings,
    CocoSettings,
    EasyVqaSettings,
    EvalSettings,
    FinetuneSettings,
    InitSettings,
    ShardsSettings,
    Stage1Settings,
    Stage2Settings,
    Vqav2Settings,
)

# The settings that name a manifest a command reads (every other path a command writes or is a model).
INPUT_MANIFESTS = ("train_manifest", "manifest")


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
        check_readable(args.config, "config file")
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


def run_stage1(s: Stage1Settings) -> dict:
    from training.data import Collator, build_dataset, training_text_processing
    from training.stages import Stage1Task, load_stage1
    from training.trainer import train

    if not s.init:
        raise SystemExit("stage1 needs --init (a stage-1 folder, e.g. from `blip2-train init`)")
    model, processor = load_stage1(s.init, s.image_size)
    task = Stage1Task(
        model, processor, use_image_ids=s.use_image_ids, same_caption_positives=s.same_caption_positives
    )
    task.text_processing = training_text_processing(s)
    dataset = build_dataset(s, model.retrieval.vision_model.config)
    return train(task, dataset, Collator(processor.tokenizer, s.max_text_length, task.text_processing), s)


def run_stage2(s: Stage2Settings) -> dict:
    from training.data import Collator, build_dataset, training_text_processing
    from training.stages import Stage2Task, load_generation
    from training.trainer import train

    if not s.init:
        raise SystemExit("stage2 needs --init (a generation folder, e.g. <init output>/generation)")
    model, processor = load_generation(s.init, s.stage1, s.image_size)
    task = Stage2Task(model, processor, prompt=s.prompt, max_text_length=s.max_text_length)
    task.text_processing = training_text_processing(s)
    dataset = build_dataset(s, model.vision_model.config)
    return train(task, dataset, Collator(None, text_processing=task.text_processing), s)


def run_finetune(s: FinetuneSettings) -> dict:
    from training.data import build_dataset
    from training.finetune import build_finetune
    from training.trainer import train

    setup = build_finetune(s)
    return train(setup.task, build_dataset(s, setup.vision_config, setup.text_field), setup.collate, s)


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


def _subparsers(parent: argparse.ArgumentParser, commands: dict[str, Command], dest: str):
    """A subcommand per entry; returns the subparsers action, to which more can be added."""
    sub = parent.add_subparsers(dest=dest, required=True)
    for name, (settings_class, function) in commands.items():
        doc = (settings_class.__doc__ or "").strip().splitlines()[0]
        parser = sub.add_parser(name, help=doc, description=doc)
        parser.add_argument("--config", help="YAML file of settings; command-line flags override it")
        _add_dataclass_arguments(parser, settings_class)
        parser.set_defaults(settings_class=settings_class, function=function)
    return sub


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip2-train", description="Train and evaluate BLIP-2 models.")
    commands = _subparsers(parser, COMMANDS, "command")
    data = commands.add_parser(
        "data",
        help="data importers, WebDataset shards and feature caching",
        description="data importers, WebDataset shards and feature caching",
    )
    _subparsers(data, DATA_COMMANDS, "data_command")
    return parser


def main(argv: list[str] | None = None) -> None:
    quiet_third_party_logs()  # before a command imports transformers: torchao logs while it is imported
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    args = build_parser().parse_args(argv)
    quiet_transformers_progress_bars()  # the commands draw their own
    try:
        settings = _settings_from(args, args.settings_class)
        for name in INPUT_MANIFESTS:  # checked before a model loads, which may take minutes
            if getattr(settings, name, ""):
                check_readable(getattr(settings, name))
        args.function(settings)
    except InputError as exc:
        print(f"blip2-train: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
