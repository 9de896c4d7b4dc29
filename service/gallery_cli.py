"""`blip2-serve gallery add FOLDER_OR_MANIFEST` and `blip2-serve gallery reindex`: the gallery offline.

`add` embeds images in batches with the retrieval model and stores them as POST /gallery/images does (same
ids, same duplicate rules). Each batch is committed whole before the next starts and the gallery itself is the
record of what is done, so a run that dies (Ctrl-C, kill -9, a full disk) is resumed by running it again: what
is stored is skipped, nothing is added twice. Unreadable files are skipped and counted.

Sources: a folder (every file under it, metadata `{"path": ...}`), or a JSONL manifest of
`{"image": path relative to the manifest, "id"?: ..., "metadata"?: {...}}` (without `metadata`, a row's
other fields are its metadata, so caption manifests work as they are).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydantic import ValidationError
from tqdm import tqdm

from service.cli import configure_logging
from service.engine.gallery import (
    Gallery,
    GalleryError,
    NewImage,
    check_metadata,
    check_name,
    model_description,
    open_gallery,
)
from service.engine.images import ImageTooLarge, InvalidImage, decode_image
from service.engine.inference import Runner
from service.engine.jobs import EmbedJob
from service.engine.loading import ModelLoadError, load_models
from service.settings import Settings


def entries(source: Path) -> list[dict]:
    """What to index: {"path", "id", "metadata"} per image, in a stable order."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
        return [
            {"path": p, "id": None, "metadata": {"path": p.relative_to(source).as_posix()}} for p in files
        ]
    rows = []
    for number, line in enumerate(source.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "image" not in row:
            raise ValueError(f"{source}:{number}: a row needs `image`")
        metadata = row.get("metadata", {k: v for k, v in row.items() if k not in ("image", "id")})
        rows.append({"path": source.parent / row["image"], "id": row.get("id"), "metadata": metadata})
    return rows


def embed(runner: Runner, images: list) -> np.ndarray:
    """(images, queries, dim) query vectors, as the server's embed jobs compute them."""
    return runner([EmbedJob(images, [], query_vectors=True)])[0]["image_queries"].numpy()


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Indexer:
    def __init__(self, gallery: Gallery, runner: Runner, settings: Settings) -> None:
        self.gallery, self.runner, self.settings = gallery, runner, settings
        self.counts: Counter[str] = Counter()

    def read(self, entry: dict) -> tuple[bytes, object] | None:
        """The file's bytes and decoded image, or None (counted) when it cannot be an image of the gallery."""
        try:
            data = entry["path"].read_bytes()
            check_metadata(entry["metadata"])  # the server's rules for an add
            if entry["id"] is not None:
                check_name(entry["id"], "id")
            return data, decode_image(data, self.settings)
        except (OSError, InvalidImage, ImageTooLarge, ValueError):
            self.counts["unreadable"] += 1
            return None

    def add(self, batch: list[dict]) -> None:
        """One batch: read, skip what is stored (by id or content), embed the rest, commit them in one insert."""
        readable = [(entry, read) for entry in batch if (read := self.read(entry)) is not None]
        plans = self.gallery.plan([(read[0], entry["id"]) for entry, read in readable])
        new = []
        for plan, (entry, read) in zip(plans, readable, strict=True):
            if plan.status == "new":
                new.append((plan, read, entry["metadata"]))
            else:  # a conflicting id is left as it is, like an existing one
                self.counts["exists" if plan.status in ("exists", "conflict") else "duplicate"] += 1
        if new:
            vectors = embed(self.runner, [read[1] for _, read, _ in new])
            fresh = [
                NewImage(plan.image_id, plan.sha256, read[0], metadata, v)
                for (plan, read, metadata), v in zip(new, vectors, strict=True)
            ]
            outcome = self.gallery.add(fresh)
            self.counts.update("added" if status == "added" else "duplicate" for status in outcome.values())


def run(command: str, args: dict) -> int:
    """`blip2-serve gallery COMMAND` (`add` or `reindex`) with its parsed flags (service/cli.py); the exit
    status. Progress lines and the summary go to stdout as JSON."""
    batch_size, quiet = args.pop("batch_size"), args.pop("no_progress", False)
    source, log_level = args.pop("source", None), args.pop("log_level", "warning")
    try:
        settings = Settings(**args)
    except ValidationError as exc:
        print(f"blip2-serve gallery: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if settings.gallery_dir is None:
        print("blip2-serve gallery: give --gallery-dir (BLIP2_GALLERY_DIR)", file=sys.stderr)
        return 2
    configure_logging(log_level)
    started = time.perf_counter()
    try:
        todo = entries(source) if command == "add" else []
        retrieval = settings.retrieval_model or settings.model
        models = load_models(settings.model_copy(update={"model": None, "retrieval_model": retrieval}))
        runner = Runner(models)
        gallery = open_gallery(settings, models.retrieval.model, other_model_ok=command == "reindex")
    except (GalleryError, ModelLoadError, OSError, ValueError) as exc:
        print(f"blip2-serve gallery: {exc}", file=sys.stderr)
        return 1
    try:
        if command == "reindex":
            done = gallery.reindex(
                lambda data: embed(runner, [decode_image(d, settings) for d in data]),
                model_description(models.retrieval.model),
                batch_size,
            )
            summary = {"reindexed": done, "model": gallery.info["model"]}
        else:
            indexer = Indexer(gallery, runner, settings)
            with tqdm(total=len(todo), unit="img", disable=quiet, file=sys.stderr) as bar:
                for number, batch in enumerate(chunks(todo, batch_size), 1):
                    indexer.add(batch)
                    bar.update(len(batch))
                    print(json.dumps({"batch": number, **indexer.counts}), flush=True)
            seconds = time.perf_counter() - started
            summary = {**indexer.counts, "count": gallery.count(), "seconds": round(seconds, 2)}
    finally:
        gallery.close()
    print(json.dumps({"summary": summary}), flush=True)
    return 0
