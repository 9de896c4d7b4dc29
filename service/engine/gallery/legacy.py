"""Galleries written before the one-record-per-image stores: Milvus collections of one row per query vector
(and, in later ones, a mean-vector row of `query` -1 per image), embedded as Milvus Lite's `milvus.db` in the
gallery folder or on a Milvus server. They are converted when opened, copying every image's id, sha256, file,
added_at, metadata and query vectors as they are (no model needed, nothing re-embedded); the old collection
stays whole until the new store is complete and published, so a conversion that dies starts over.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus import MilvusClient, MilvusException

from service.engine.gallery.common import Record, Stored

log = logging.getLogger("service.gallery")
OLD_FIELDS = ["image_id", "sha256", "file", "added_at", "meta"]
EMBEDDED_FILE = "milvus.db"
CONVERTED_SUFFIX = ".converted"
PROPERTY = "blip2.gallery"  # the collection property holding the gallery's model and shape (old and new)


def _batches(client: MilvusClient, collection: str, where: str, fields: list[str]) -> Iterator[list[dict]]:
    iterator = client.query_iterator(collection, batch_size=1000, filter=where, output_fields=fields)
    try:
        while batch := iterator.next():
            yield batch
    finally:
        iterator.close()


def old_records(
    client: MilvusClient, collection: str, info: dict[str, Any], batch_size: int = 256
) -> Iterator[list[Record]]:
    """Every image of an old-format collection with its query vectors, in batches. One pass over each kind of
    row (a filtered query per batch would scan the whole collection in Milvus Lite each time)."""
    images = {
        row["image_id"]: Stored(
            row["image_id"], row["sha256"], row["file"], row["added_at"] / 1000, row["meta"] or {}
        )
        for batch in _batches(client, collection, "query == 0", OLD_FIELDS)
        for row in batch
    }
    vectors = {image_id: np.zeros((info["queries"], info["dim"]), dtype=np.float16) for image_id in images}
    seen = dict.fromkeys(images, 0)
    for batch in _batches(client, collection, "query >= 0", ["image_id", "query", "vector"]):
        for row in batch:
            if row["image_id"] in vectors:
                vectors[row["image_id"]][row["query"]] = row["vector"]
                seen[row["image_id"]] += 1
    whole = [image_id for image_id, count in seen.items() if count == info["queries"]]
    if len(whole) < len(images):  # the old store added an image's rows in one insert: never seen
        log.warning(
            "%d images of the old gallery lack query vectors and are left out", len(images) - len(whole)
        )
    for start in range(0, len(whole), batch_size):  # float16, as the new stores keep them: half the memory
        yield [Record(**vars(images[i]), vectors=vectors[i]) for i in whole[start : start + batch_size]]


def old_collection(client: MilvusClient, name: str) -> dict[str, Any] | None:
    """The record of the old-format gallery `name` (its alias), with its physical collection, or None."""
    info = collection_info(client, name)
    return info if info is not None and info.get("format") != 2 else None


def load_old(client: MilvusClient, collection: str, location: Path) -> MilvusClient:
    """Load an embedded old collection (the client that did); Milvus Lite wrote its index files in place, so
    one cut by a crash fails the load: those files are derived from the data, dropped, and rebuilt."""
    try:
        client.load_collection(collection)
        return client
    except MilvusException:
        index_files = sorted(location.glob("collections/*/partitions/*/indexes/*"))
        if not index_files:
            raise
        log.warning("the old gallery's index files did not load: rebuilding them from the data")
        release_embedded(client, location)
        for path in index_files:
            path.unlink()
        client = MilvusClient(uri=str(location))
        client.load_collection(collection)
        return client


def release_embedded(client: MilvusClient, location: Path) -> None:
    """Close the client, and stop the Milvus Lite thread serving `location` so its files are let go."""
    with contextlib.suppress(Exception):
        client.close()
    from milvus_lite import server_manager_instance

    server_manager_instance.release_server(str(location))


def read_embedded(folder: Path, collection_name: str) -> tuple[dict[str, Any], list[Record]] | None:
    """(record, images with their vectors) of the old embedded gallery in `folder`, or None if there is none."""
    location = folder / EMBEDDED_FILE
    if not location.exists():
        return None
    client = MilvusClient(uri=str(location))
    try:
        info = old_collection(client, collection_name)
        if info is None:
            return None
        log.info("converting the gallery in %s (Milvus Lite, one row per query vector) to LanceDB", folder)
        client = load_old(client, info["collection"], location)
        return info, [record for batch in old_records(client, info["collection"], info) for record in batch]
    finally:
        release_embedded(client, location)


def retire_embedded(folder: Path) -> None:
    """Once converted, the old database is kept beside the new store under another name (delete it at will)."""
    location = folder / EMBEDDED_FILE
    if location.exists():
        location.rename(location.with_name(EMBEDDED_FILE + CONVERTED_SUFFIX))
        log.info(
            "the old gallery database is kept as %s%s; delete it once the converted gallery is checked",
            location,
            CONVERTED_SUFFIX,
        )


def collection_info(client: MilvusClient, name: str) -> dict[str, Any] | None:
    """The record (model, shape, physical collection) of the gallery `name` (an alias) on a server, either format, or None."""
    for collection in client.list_collections():
        if name in client.list_aliases(collection)["aliases"]:
            properties = client.describe_collection(collection)["properties"]
            return json.loads(properties[PROPERTY]) | {"collection": collection}
    return None
