"""The persistent image gallery: image files on disk, one record per image in a store.

The store is LanceDB, embedded in BLIP2_GALLERY_DIR (lance_store.py), or a Milvus server by BLIP2_GALLERY_URI
(milvus_store.py); the routes, `blip2-serve gallery add` and `reindex` use this class and never the engines.

What is acknowledged is kept, whole:
- an image file is written under a temporary name and renamed before its record exists, and an add's records
  are committed in one write (a LanceDB version; one Milvus insert), so after a crash an image is there with
  all its vectors or not at all;
- a delete is committed before it returns, so a deleted image never comes back;
- one process at a time opens an embedded gallery (a lock on the folder); a gallery remembers the
  fingerprint of the retrieval model that made its vectors and refuses another (`blip2-serve gallery
  reindex` re-embeds the stored images into a new table and switches to it at the end);
- a gallery written by an earlier version (Milvus Lite's milvus.db, one row per query vector) is converted
  when it is opened (legacy.py), every image, id and metadata kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from service.engine.gallery import legacy
from service.engine.gallery.common import (
    FolderLock,
    GalleryError,
    NewImage,
    Planned,
    Record,
    Store,
    Stored,
    content_key,
    model_fingerprint,
    model_of,
)
from service.engine.gallery.lance_store import LanceStore
from service.settings import Settings

log = logging.getLogger("service.gallery")


def open_store(settings: Settings, model: dict[str, Any]) -> Store:
    """The store BLIP2_GALLERY_URI / BLIP2_GALLERY_DIR name, created for `model` if new, an old-format one
    converted. An embedded store's folder must be locked by the caller (Gallery.open does)."""
    if settings.gallery_uri:
        from service.engine.gallery.milvus_store import (
            MilvusStore,  # pymilvus only for a server (and conversions)
        )

        return MilvusStore.open(settings, model)
    folder = Path(settings.gallery_dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    store = LanceStore.open(folder, settings)
    if store is None:
        store = _convert_embedded(folder, settings) or LanceStore.create(folder, settings, model)
    legacy.retire_embedded(folder)  # converted (maybe by a run that died before this step)
    return store


def _convert_embedded(folder: Path, settings: Settings) -> LanceStore | None:
    """The old Milvus Lite gallery in `folder` copied into a new LanceDB one, published at the end."""
    old = legacy.read_embedded(folder, settings.gallery_collection)
    if old is None:
        return None
    info, records = old
    batches = (records[start : start + 1024] for start in range(0, len(records), 1024))
    return LanceStore.copied(folder, settings, model_of(info), batches, "Milvus Lite")


class Gallery:
    """The gallery's files and records. Methods block (disk, network): routes call them in a thread."""

    def __init__(self, settings: Settings, store: Store, lock: FolderLock | None) -> None:
        self.settings, self.store, self._lock = settings, store, lock
        self.images_dir = Path(settings.gallery_dir).expanduser().resolve() / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self._writing = threading.Lock()  # check-then-insert is one step within this process

    @property
    def info(self) -> dict[str, Any]:
        """The gallery's record: fingerprint, model (its name), dim, queries."""
        return self.store.info

    # -- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, settings: Settings, model: dict[str, Any], other_model_ok: bool = False) -> Gallery:
        """`model`: {"fingerprint", "name", "dim", "queries"} of the retrieval model in use."""
        lock = None
        if settings.gallery_uri is None:
            folder = Path(settings.gallery_dir).expanduser().resolve()
            folder.mkdir(parents=True, exist_ok=True)
            lock = FolderLock(folder)
        try:
            store = open_store(settings, model)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        gallery = cls(settings, store, lock)
        if not other_model_ok:
            try:
                gallery._check_model(model)
            except BaseException:
                gallery.close()
                raise
        log.info("gallery: %d images (%s)", gallery.count(), store.engine)
        return gallery

    def _check_model(self, model: dict[str, Any]) -> None:
        if self.info["fingerprint"] == model["fingerprint"]:
            return
        raise GalleryError(
            f"the gallery in {self.settings.gallery_uri or self.settings.gallery_dir} was indexed by the "
            f"retrieval model {self.info['model']!r} (fingerprint {self.info['fingerprint'][:12]}), not by this "
            f"server's {model['name']!r} ({model['fingerprint'][:12]}): its vectors would not compare. Serve it "
            "with the model that indexed it, or re-index it with this one: `blip2-serve gallery reindex` with "
            "the same --gallery-dir and --retrieval-model"
        )

    def close(self) -> None:
        self.store.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- reading -------------------------------------------------------------------------------------
    def get(self, image_id: str) -> Stored | None:
        return self.store.get(image_id)

    def count(self) -> int:
        return self.store.count()

    def read_image(self, stored: Stored) -> bytes:
        return (self.images_dir / stored.file).read_bytes()

    def query_vectors(self, ids: list[str]) -> dict[str, np.ndarray]:
        """Each image's query vectors (queries, dim) as stored (float16), for the given ids."""
        return self.store.query_vectors(ids)

    def vector_counts(self) -> dict[str, int]:
        """Query vectors per image (each should have `queries`): for checks after a crash."""
        return {r.image_id: len(r.vectors) for batch in self.store.records(256) for r in batch}

    def plan(self, items: list[tuple[bytes, str | None]]) -> list[Planned]:
        """What adding these (bytes, id or None) would do, image by image, in order: one lookup for all.
        POST /gallery/images and `blip2-serve gallery add` both act on it, each in its own way (answers and
        errors, or counters)."""
        keyed = [content_key(data, image_id) for data, image_id in items]
        first_digest: dict[str, str] = {}  # id -> the bytes of its first image in this add
        first_with: dict[str, str] = {}  # bytes -> the first id they come under in this add
        for digest, image_id in keyed:
            first_digest.setdefault(image_id, digest)
            first_with.setdefault(digest, image_id)
        stored_ids, stored_hashes = self.store.lookup(list(first_digest), list(first_with))
        plans, seen = [], set()
        for digest, image_id in keyed:
            if first_digest[image_id] != digest:
                status, holder = "reused_id", image_id
            elif image_id in stored_ids:
                status = "exists" if stored_ids[image_id] == digest else "conflict"
                holder = image_id
            elif digest in stored_hashes:
                status, holder = "duplicate", stored_hashes[digest]
            elif first_with[digest] != image_id:
                status, holder = "duplicate", first_with[digest]
            else:
                status, holder = ("repeat" if image_id in seen else "new"), image_id
                seen.add(image_id)
            plans.append(Planned(image_id, digest, status, holder))
        return plans

    # -- writing -------------------------------------------------------------------------------------
    def _put_file(self, sha256: str, data: bytes) -> str:
        """Content-addressed: an identical image is stored once. Written whole or not at all (rename)."""
        relative = f"{sha256[:2]}/{sha256}"
        path = self.images_dir / relative
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            temporary = path.with_name(f".{sha256}.{os.getpid()}.{threading.get_ident()}")
            temporary.write_bytes(data)
            os.replace(temporary, path)
        return relative

    def add(self, images: list[NewImage]) -> dict[str, str]:
        """Store what is not there yet, in one commit. Returns each image's id -> "added", or the id of the
        image already holding its id or content (another request may have added it since it was checked)."""
        with self._writing:
            ids, hashes = self.store.lookup([i.image_id for i in images], [i.sha256 for i in images])
            outcome, records = {}, []
            added_at = time.time()
            for image in images:
                if image.image_id in ids:
                    outcome[image.image_id] = image.image_id
                elif image.sha256 in hashes:
                    outcome[image.image_id] = hashes[image.sha256]
                else:
                    hashes[image.sha256] = image.image_id
                    outcome[image.image_id] = "added"
                    file = self._put_file(image.sha256, image.data)
                    records.append(
                        Record(image.image_id, image.sha256, file, added_at, image.metadata, image.vectors)
                    )
            self.store.add(records)
        return outcome

    def delete(self, image_id: str) -> bool:
        with self._writing:
            stored = self.store.get(image_id)
            if stored is None or not self.store.delete(image_id):
                return False
            if not self.store.lookup([], [stored.sha256])[1]:  # no other image holds these bytes
                with contextlib.suppress(FileNotFoundError):
                    (self.images_dir / stored.file).unlink()
        return True

    # -- searching -----------------------------------------------------------------------------------
    def search(
        self, vectors: np.ndarray, k: int, conditions: dict[str, list[Any]] | None = None
    ) -> list[tuple[Stored, float]]:
        """The k best images for query vectors (n, dim): each image's score is its best inner product over
        its own query vectors and the n given ones (n=1 for a text: exactly BLIP-2's ITC)."""
        return self.store.search(vectors, k, conditions)

    def similar(
        self, vectors: np.ndarray, k: int, conditions: dict[str, list[Any]] | None = None
    ) -> list[tuple[Stored, float]]:
        """The k images most like an image given by its query vectors (queries, dim): by the cosine of the
        normalised means of both images' query vectors, best first."""
        return self.store.similar(vectors, k, conditions)

    # -- re-indexing ---------------------------------------------------------------------------------
    def reindex(
        self, embed: Callable[[list[bytes]], np.ndarray], model: dict[str, Any], batch_size: int = 32
    ) -> int:
        """Re-embed every stored image with `model` into a new table (collection); the gallery switches to it
        only at the end, so a crash leaves the old gallery whole (and a re-run starts over)."""
        target = self.store.start_rebuild(model)
        done = 0
        for batch in self.store.records(batch_size):
            vectors = embed([self.read_image(r) for r in batch])
            for record, new in zip(batch, vectors, strict=True):
                record.vectors = new
            target.add(batch)
            done += len(batch)
        self.store = self.store.finish_rebuild(target)
        return done

    def describe(self) -> dict[str, Any]:
        return self.store.describe() | {"images_dir": str(self.images_dir)}


def model_label(source: str) -> str:
    """A model's name for people: its folder's name (the run's, for the `stage1/` folder blip2-train writes)."""
    path = Path(source.rstrip("/"))
    return path.parent.name if path.name in ("stage1", "model") and path.parent.name else path.name


def model_description(retrieval_model) -> dict[str, Any]:
    """{"fingerprint", "name", "dim", "queries"} of a loaded retrieval model (a Blip2ForImageTextRetrieval)."""
    config = retrieval_model.config
    return {
        "fingerprint": model_fingerprint(retrieval_model.name_or_path),
        "name": model_label(retrieval_model.name_or_path),
        "dim": config.image_text_hidden_size,
        "queries": config.num_query_tokens,
    }


def open_gallery(settings: Settings, retrieval_model, other_model_ok: bool = False) -> Gallery:
    """The gallery for a loaded retrieval model, checked against it."""
    return Gallery.open(settings, model_description(retrieval_model), other_model_ok)
