"""Image-text data: JSONL manifests, WebDataset shards, cached ViT features, and the batch collator.

A manifest line is `{"image": path, "text": ...}` (optionally `"image_id"`); relative image paths are
resolved against the manifest's folder. A missing or corrupt image, or a text no tokenizer can take (not a
string, or not valid Unicode), is skipped and counted, never fatal: the collator drops it and reports how
many it dropped in `Batch.skipped`. Texts are tokenised as text (`split_special_tokens`): a caption that
spells `[SEP]` or `</s>` gets those characters, not the control token.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from transformers import PretrainedConfig
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from blip2.text import TextProcessing
from training import distributed
from training.batch import Batch
from training.errors import InputError
from training.settings import DataSourceSettings

log = logging.getLogger(__name__)
# SyntaxError: how PIL's verify() (and some plugins' load) report a broken file, e.g. a bad PNG checksum.
IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # the image entries a WebDataset sample is read from


def stable_id(text: str) -> int:
    """An integer id for a string that is the same in every process (Python's str hash is salted per
    process, so DDP ranks would disagree); 56 bits, so it fits an int64 tensor."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "big")


def caption_ids(texts: list[str]) -> torch.Tensor:
    """An id per caption text that is the same in every process (Python's str hash is salted per process)."""
    return torch.tensor([stable_id(t) for t in texts])


def text_problem(text: object) -> str | None:
    """Why a caption cannot be tokenised, or None: tokenizers take strings, and only valid Unicode (a JSON
    manifest can hold a lone surrogate such as "\\ud800", which no encoder accepts)."""
    if not isinstance(text, str):
        return f"the text is {type(text).__name__}, not a string"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "the text is not valid Unicode"
    return None


def _numbered_rows(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise InputError(f"cannot read {path}: {reason}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{number}: not JSON ({error.msg})") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSONL file (a log, predictions); blank lines ignored, a bad line reported."""
    return [row for _, row in _numbered_rows(Path(path))]


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a JSONL manifest with `image` made absolute; blank lines ignored, bad lines reported."""
    path = Path(path)
    rows = []
    for number, row in _numbered_rows(path):
        if "image" not in row:
            raise InputError(f"{path}:{number}: no 'image' field")
        row["image"] = str((path.parent / row["image"]).resolve())
        rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """The rows as a JSONL file (a manifest, predictions), its folder made if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def image_key(row: dict) -> str:
    """What identifies a row's image: its `image_id` when given, else its path."""
    return str(row.get("image_id", row["image"]))


def group_by_image(rows: list[dict]) -> tuple[list[int], list[dict]]:
    """Each row's image index (as `image_id_table` numbers them), and each image's first row, in order."""
    ids = image_id_table(rows)
    row_image = [ids[image_key(row)] for row in rows]
    first_rows: list[dict] = []
    for row, index in zip(rows, row_image, strict=True):
        if index == len(first_rows):
            first_rows.append(row)
    return row_image, first_rows


def image_id_table(rows: list[dict]) -> dict[str, int]:
    """Integer ids for the rows' images, one per distinct `image_key`."""
    table: dict[str, int] = {}
    for row in rows:
        table.setdefault(image_key(row), len(table))
    return table


class ImageTransform:
    """BLIP-2's image preprocessing. Training: RandomResizedCrop(scale 0.5-1) and horizontal flip, bicubic;
    evaluation: a plain resize. Both normalise with the CLIP mean and std."""

    def __init__(self, image_size: int, train: bool, min_scale: float = 0.5) -> None:
        self.image_size, self.train, self.min_scale = image_size, train, min_scale
        self.mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)

    def _random_crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        for _ in range(10):
            target = area * random.uniform(self.min_scale, 1.0)
            ratio = np.exp(random.uniform(np.log(3 / 4), np.log(4 / 3)))
            w, h = round((target * ratio) ** 0.5), round((target / ratio) ** 0.5)
            if 0 < w <= width and 0 < h <= height:
                left, top = random.randint(0, width - w), random.randint(0, height - h)
                return left, top, left + w, top + h
        return 0, 0, width, height

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if self.train:
            image = image.crop(self._random_crop_box(*image.size))
            if random.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - self.mean) / self.std


def image_problem(source: str | bytes) -> str | None:
    """Why an image file cannot be used, or None: a check of its structure, without decoding the pixels."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.verify()
    except IMAGE_ERRORS as error:
        return str(error) or type(error).__name__
    return None


def load_image(source: str | bytes) -> Image.Image:
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()
        return image.convert("RGB")


class _ManifestRows(Dataset):
    """The rows of a JSONL manifest as samples; `_image_input` supplies each row's pixels or features,
    and a row whose image cannot be had yields None."""

    def __init__(self, manifest: str | Path, text_field: str) -> None:
        self.rows = read_manifest(manifest)
        self.text_field = text_field
        self.ids = image_id_table(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def _image_input(self, row: dict) -> tuple[str, torch.Tensor] | None:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict | None:
        row = self.rows[index]
        problem = text_problem(row.get(self.text_field))
        if problem is not None:
            log.warning("skipping %s: %s", row["image"], problem)
            return None
        image_input = self._image_input(row)
        if image_input is None:
            return None
        key, value = image_input
        return {key: value, "text": row[self.text_field], "image_id": self.ids[image_key(row)], "row": row}


class ManifestDataset(_ManifestRows):
    """Images and texts from a JSONL manifest."""

    def __init__(self, manifest: str | Path, transform: ImageTransform, text_field: str = "text") -> None:
        super().__init__(manifest, text_field)
        self.transform = transform

    def _image_input(self, row: dict) -> tuple[str, torch.Tensor] | None:
        try:
            return "pixel_values", self.transform(load_image(row["image"]))
        except IMAGE_ERRORS as error:
            log.warning("skipping %s: %s", row["image"], error)
            return None


class FeatureDataset(_ManifestRows):
    """Rows of a manifest paired with ViT features cached by `blip2-train data cache-features`."""

    def __init__(self, manifest: str | Path, features_dir: str | Path, text_field: str = "text") -> None:
        super().__init__(manifest, text_field)
        self.cache = FeatureCache(features_dir)

    def _image_input(self, row: dict) -> tuple[str, torch.Tensor] | None:
        features = self.cache.get(row["image"])
        if features is None:
            log.warning("no cached features for %s", row["image"])
            return None
        return "vision_hidden", features  # as stored; the task casts on its device


class FeatureCache:
    """Reads the shards written by `cache-features`: `index.json` maps image path -> [shard file, row]."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.index = json.loads((self.folder / "index.json").read_text())
        self._shards: dict[str, torch.Tensor] = {}

    def get(self, image: str) -> torch.Tensor | None:
        entry = self.index.get(image)
        if entry is None:
            return None
        shard, row = entry
        if shard not in self._shards:
            self._shards[shard] = load_file(str(self.folder / shard))["features"]
        return self._shards[shard][row]


def cached_tokens(folder: str | Path) -> int | None:
    """Tokens per image in a `cache-features` folder (read from a shard's header), or None when it is empty."""
    index = json.loads((Path(folder) / "index.json").read_text())
    if not index:
        return None
    shard, _ = next(iter(index.values()))
    with safe_open(str(Path(folder) / shard), framework="pt") as handle:
        return handle.get_slice("features").get_shape()[1]


def check_features_fit(folder: str | Path, vision_config: PretrainedConfig) -> None:
    """Refuse cached features that the vision tower, at its (possibly resized) image size, would not make:
    the Q-Former would silently train on a token grid the saved model never sees again."""
    size, patch = vision_config.image_size, vision_config.patch_size
    tokens, expected = cached_tokens(folder), (size // patch) ** 2 + 1
    if tokens is not None and tokens != expected:
        raise SystemExit(
            f"--features {folder} holds {tokens} ViT tokens per image, but the vision tower at {size} px makes "
            f"{expected}: they were cached at another image size. Train from the images (drop --features), "
            f"or cache features from a model at {size} px"
        )


class WebDatasetShards(IterableDataset):
    """Image-text pairs from WebDataset tar shards (`.jpg`/`.png` + `.txt`/`.json`), split per rank and worker.

    A corrupt shard is skipped with a warning; a sample whose image cannot be decoded yields None, which the
    collator drops and counts.
    """

    def __init__(self, urls: list[str], transform: ImageTransform, text_field: str = "text") -> None:
        self.urls, self.transform, self.text_field = urls, transform, text_field

    def _my_urls(self) -> list[str]:
        worker = get_worker_info()
        num_workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        stride = distributed.world_size() * num_workers
        return self.urls[distributed.rank() * num_workers + worker_id :: stride]

    def __iter__(self) -> Iterator[dict | None]:
        import webdataset as wds

        def skip(error: Exception) -> bool:
            log.warning("skipping corrupt WebDataset data: %s", error)
            return True

        pipeline = wds.WebDataset(self._my_urls(), shardshuffle=False, handler=skip, nodesplitter=None)
        for sample in pipeline:
            yield self._decode(sample)

    def _decode(self, sample: dict) -> dict | None:
        image_bytes = next((sample[k] for k in SHARD_IMAGE_KEYS if k in sample), None)
        if image_bytes is None:
            return None
        try:
            pixels = self.transform(load_image(image_bytes))
        except IMAGE_ERRORS as error:
            log.warning("skipping %s: %s", sample.get("__key__"), error)
            return None
        meta = json.loads(sample["json"]) if "json" in sample else None
        if meta is not None:
            text = meta.get(self.text_field) or meta.get("caption")
        else:
            text = (
                sample["txt"].decode("utf-8") if isinstance(sample.get("txt"), bytes) else sample.get("txt")
            )
        if not text:
            return None
        problem = text_problem(text)
        if problem is not None:
            log.warning("skipping %s: %s", sample.get("__key__"), problem)
            return None
        # The row's fields travel with the sample: a VQA collator reads its question from them.
        row = (meta or {}) | {"key": sample["__key__"]}
        return {"pixel_values": pixels, "text": text, "image_id": _shard_image_id(row), "row": row}


def _shard_image_id(row: dict) -> int:
    """The row's `image_id` when it is an integer, else a stable hash of it or of the sample key: the same
    on every DDP rank, as ranks gather each other's ids for same-image positives."""
    image_id = row.get("image_id")
    if isinstance(image_id, int) and not isinstance(image_id, bool):
        return image_id
    return stable_id(str(image_id if image_id is not None else row["key"]))


def build_dataset(
    s: DataSourceSettings, vision_config: PretrainedConfig, text_field: str = "text"
) -> Dataset:
    """The training data the settings name, for a vision tower already at its training size (see
    `resize_vision_tower`): cached features, WebDataset shards or a manifest's images."""
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


def training_text_processing(s: DataSourceSettings) -> TextProcessing | None:
    """The text processing a training run applies to its captions and questions (and records)."""
    return TextProcessing() if s.text_processing else None


def text_tokens(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """A padded batch of token ids for texts, tokenised as text: a caption that spells `[SEP]` or `</s>`
    gets those characters, never the control token; the tokenizer's template still adds its own."""
    return tokenizer(
        texts,
        padding="longest",
        truncation=True,
        max_length=max_length,
        split_special_tokens=True,
        return_tensors="pt",
    )


class Collator:
    """Drops unreadable samples, stacks images (or cached features), gives each row its image and caption
    ids and, given a tokenizer, tokenizes texts. Given a `TextProcessing`, the texts are captions and go
    through it first (as LAVIS's datasets pass captions through their text processor)."""

    def __init__(
        self, tokenizer=None, max_text_length: int = 32, text_processing: TextProcessing | None = None
    ) -> None:
        self.tokenizer, self.max_text_length = tokenizer, max_text_length
        self.text_processing = text_processing

    def __call__(self, samples: list[dict | None]) -> Batch:
        kept = [s for s in samples if s is not None]
        batch = Batch(size=len(kept), skipped=len(samples) - len(kept))
        if not kept:
            return batch
        for key in ("pixel_values", "vision_hidden"):  # a dataset gives one of the two
            if key in kept[0]:
                setattr(batch, key, torch.stack([s[key] for s in kept]))
        texts = [s["text"] for s in kept]
        if self.text_processing is not None:
            texts = [self.text_processing.caption(text) for text in texts]
        if self.tokenizer is not None:
            tokens = text_tokens(self.tokenizer, texts, self.max_text_length)
            batch.input_ids, batch.attention_mask = tokens["input_ids"], tokens["attention_mask"]
        batch.image_ids = torch.tensor([s["image_id"] for s in kept])
        batch.texts = texts
        batch.caption_ids = caption_ids(texts)  # for --same-caption-positives
        batch.rows = [s["row"] for s in kept]
        return batch
