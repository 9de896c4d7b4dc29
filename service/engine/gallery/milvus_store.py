"""The gallery on a Milvus server (BLIP2_GALLERY_URI), which several replicas share: one row per image.

A row: image_id (the primary key), sha256 (INVERTED index: an add's duplicate check is a look-up), file,
added_at, meta (JSON: what filters match), mean (the normalised mean query vector, with the vector index
BLIP2_GALLERY_INDEX on it) and vectors (every query vector as float16 bytes in base64: Milvus Lite's server,
which the tests run, has no FLOAT16_VECTOR type, and the second pass reads them rather than searches them).
The same two passes as the embedded store: the index over `mean` returns C candidates with the filter applied
in the search, then their exact ITC.

The collection is reached through an alias (BLIP2_GALLERY_COLLECTION), so a re-index fills a new collection
and moves the alias at the end; the gallery's model and shape are a property of the collection.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient

from service.engine.gallery.common import (
    GalleryError,
    Record,
    Stored,
    best,
    mean_vector,
    model_of,
    top_by_max_sim,
)
from service.engine.gallery.legacy import PROPERTY, collection_info, old_records
from service.settings import Settings

log = logging.getLogger("service.gallery")
logging.getLogger("pymilvus").setLevel(
    logging.ERROR
)  # iterators warn of MVCC details that do not matter here
FIELDS = ["image_id", "sha256", "file", "added_at", "meta"]
MAX_LIMIT = 16384  # Milvus's bound on a search's limit and a query's


def literal(value: Any) -> str:
    """A JSON scalar as a Milvus expression literal (strings quoted and escaped, never spliced raw)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    raise ValueError(f"{value!r}: a filter value is a string, number or boolean")


def metadata_filter(conditions: dict[str, list[Any]] | None) -> str:
    """Checked conditions (common.check_filter) -> an expression: every key matches one of its values."""
    parts = [
        "(" + " or ".join(f'meta["{key}"] == {literal(v)}' for v in values) + ")"
        for key, values in (conditions or {}).items()
    ]
    return " and ".join(parts)


def pack(vectors: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vectors, dtype=np.float16).tobytes()).decode()


class MilvusStore:
    """The gallery's records in a Milvus collection (see the module's docstring)."""

    engine = "milvus"

    def __init__(self, settings: Settings, client: MilvusClient, info: dict[str, Any]) -> None:
        self.settings, self.client, self.info = settings, client, info
        self.name = settings.gallery_collection

    @classmethod
    def connect(cls, settings: Settings) -> MilvusClient:
        token = settings.gallery_token.get_secret_value() if settings.gallery_token else ""
        try:
            return MilvusClient(uri=settings.gallery_uri, token=token)
        except Exception as exc:
            raise GalleryError(
                f"cannot reach the gallery's Milvus server at {settings.gallery_uri}: {exc}"
            ) from exc

    @classmethod
    def open(cls, settings: Settings, model: dict[str, Any]) -> MilvusStore:
        """The gallery named BLIP2_GALLERY_COLLECTION on the server, created for `model` when there is none."""
        client = cls.connect(settings)
        try:
            info = collection_info(client, settings.gallery_collection)
            if info is None:
                info = cls.create(client, settings, model, 1)
                client.create_alias(info["collection"], settings.gallery_collection)
            elif info.get("format") != 2:
                info = cls._convert(client, settings, info)
            client.load_collection(info["collection"])
        except BaseException:
            client.close()
            raise
        return cls(settings, client, info)

    @staticmethod
    def create(
        client: MilvusClient, settings: Settings, model: dict[str, Any], generation: int
    ) -> dict[str, Any]:
        """A new physical collection `<name>_<generation>` for `model`; the caller points the alias at it."""
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("image_id", DataType.VARCHAR, is_primary=True, max_length=128)
        schema.add_field("sha256", DataType.VARCHAR, max_length=64)
        schema.add_field("file", DataType.VARCHAR, max_length=200)
        schema.add_field("added_at", DataType.INT64)  # milliseconds since the epoch
        schema.add_field("meta", DataType.JSON)
        schema.add_field("mean", DataType.FLOAT_VECTOR, dim=model["dim"])
        schema.add_field("vectors", DataType.VARCHAR, max_length=65535)
        index = client.prepare_index_params()
        params = {"HNSW": {"M": 16, "efConstruction": 200}, "IVF_FLAT": {"nlist": 1024}}.get(
            settings.gallery_index, {}
        )
        index.add_index("mean", index_type=settings.gallery_index, metric_type="IP", params=params)
        index.add_index("sha256", index_type="INVERTED")
        collection = f"{settings.gallery_collection}_{generation}"
        record = {
            "format": 2,
            "fingerprint": model["fingerprint"],
            "model": model["name"],
            "dim": model["dim"],
            "queries": model["queries"],
            "index": settings.gallery_index,
            "created": time.time(),
        }
        client.create_collection(
            collection,
            schema=schema,
            index_params=index,
            num_shards=1,
            properties={PROPERTY: json.dumps(record)},
        )
        return record | {"collection": collection}

    @classmethod
    def _convert(cls, client: MilvusClient, settings: Settings, old: dict[str, Any]) -> dict[str, Any]:
        """An old-format gallery (legacy.py) copied into a new collection; the alias moves at the end."""
        name = settings.gallery_collection
        for collection in client.list_collections():  # a conversion or re-index that died half-way
            if collection.startswith(f"{name}_") and collection != old["collection"]:
                client.drop_collection(collection)
        log.info("converting the gallery %r on %s to one row per image", name, settings.gallery_uri)
        info = cls.create(client, settings, model_of(old), int(old["collection"].rsplit("_", 1)[1]) + 1)
        client.load_collection(old["collection"])
        writer = cls(settings, client, info)
        for batch in old_records(client, old["collection"], old):
            writer.add(batch, collection=info["collection"])
        client.alter_alias(info["collection"], name)
        client.drop_collection(old["collection"])
        return info

    def start_rebuild(self, model: dict[str, Any]) -> MilvusStore:
        """A new, empty collection for `model`, written while this one serves (a re-index fills it)."""
        for collection in self.client.list_collections():  # a re-index that died half-way
            if collection.startswith(f"{self.name}_") and collection != self.info["collection"]:
                self.client.drop_collection(collection)
        info = self.create(
            self.client, self.settings, model, int(self.info["collection"].rsplit("_", 1)[1]) + 1
        )
        target = MilvusStore(self.settings, self.client, info)
        target.name = info["collection"]
        return target

    def finish_rebuild(self, target: MilvusStore) -> MilvusStore:
        """Point the gallery at a filled rebuild and drop the old collection; returns the store to use."""
        self.client.load_collection(target.info["collection"])
        self.client.alter_alias(target.info["collection"], self.name)
        self.client.drop_collection(self.info["collection"])
        target.name = self.name
        return target

    def close(self) -> None:
        self.client.close()

    # -- reading -------------------------------------------------------------------------------------
    def _query(self, where: str, fields: list[str], limit: int = MAX_LIMIT) -> list[dict[str, Any]]:
        return self.client.query(self.name, filter=where, output_fields=fields, limit=limit)

    @staticmethod
    def _stored(row: dict[str, Any]) -> Stored:
        return Stored(row["image_id"], row["sha256"], row["file"], row["added_at"] / 1000, row["meta"] or {})

    def _unpack(self, text: str) -> np.ndarray:
        flat = np.frombuffer(base64.b64decode(text), dtype=np.float16)
        return flat.reshape(self.info["queries"], self.info["dim"])

    def lookup(self, ids: list[str], hashes: list[str]) -> tuple[dict[str, str], dict[str, str]]:
        found_ids: dict[str, str] = {}
        found_hashes: dict[str, str] = {}
        if ids:
            for row in self._query(f"image_id in {json.dumps(ids)}", ["image_id", "sha256"]):
                found_ids[row["image_id"]] = row["sha256"]
        if hashes:
            for row in self._query(f"sha256 in {json.dumps(hashes)}", ["image_id", "sha256"]):
                found_hashes[row["sha256"]] = row["image_id"]
        return found_ids, found_hashes

    def get(self, image_id: str) -> Stored | None:
        rows = self._query(f"image_id == {literal(image_id)}", FIELDS, limit=1)
        return self._stored(rows[0]) if rows else None

    def count(self) -> int:
        rows = self.client.query(self.name, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def query_vectors(self, ids: list[str]) -> dict[str, np.ndarray]:
        if not ids:
            return {}
        rows = self._query(f"image_id in {json.dumps(ids)}", ["image_id", "vectors"])
        return {row["image_id"]: self._unpack(row["vectors"]) for row in rows}

    def records(self, batch_size: int = 256) -> Iterator[list[Record]]:
        iterator = self.client.query_iterator(
            self.name, batch_size=batch_size, filter="", output_fields=[*FIELDS, "vectors"]
        )
        try:
            while batch := iterator.next():
                yield [
                    Record(**vars(self._stored(row)), vectors=self._unpack(row["vectors"]).astype(np.float32))
                    for row in batch
                ]
        finally:
            iterator.close()

    # -- writing -------------------------------------------------------------------------------------
    def _row(self, record: Record) -> dict[str, Any]:
        vectors = np.asarray(record.vectors, dtype=np.float32)
        if vectors.shape != (self.info["queries"], self.info["dim"]):
            raise ValueError(
                f"query vectors of shape {vectors.shape}; this gallery holds {(self.info['queries'], self.info['dim'])}"
            )
        return {
            "image_id": record.image_id,
            "sha256": record.sha256,
            "file": record.file,
            "added_at": int(record.added_at * 1000),
            "meta": record.metadata,
            "mean": mean_vector(vectors),
            "vectors": pack(vectors),
        }

    def add(self, records: list[Record], collection: str | None = None) -> None:
        """One insert: one collection with one shard takes it as one message, whole or not at all."""
        if records:
            self.client.insert(collection or self.name, [self._row(r) for r in records])

    def delete(self, image_id: str) -> bool:
        if self.get(image_id) is None:
            return False
        self.client.delete(self.name, filter=f"image_id == {literal(image_id)}")
        return True

    # -- searching -----------------------------------------------------------------------------------
    def _first_pass(
        self, vectors: np.ndarray, conditions: dict[str, list[Any]] | None, limit: int, fields: list[str]
    ):
        params = {"HNSW": {"ef": max(64, limit)}, "IVF_FLAT": {"nprobe": self.settings.gallery_nprobes}}
        return self.client.search(
            self.name,
            data=np.asarray(vectors, dtype=np.float32),
            anns_field="mean",
            limit=min(limit, MAX_LIMIT),
            filter=metadata_filter(conditions),
            output_fields=fields,
            search_params={"metric_type": "IP", "params": params.get(self.info.get("index", ""), {})},
        )

    def search(
        self, vectors: np.ndarray, k: int, conditions: dict[str, list[Any]] | None = None
    ) -> list[tuple[Stored, float]]:
        """Two passes: C candidates by each query vector against the mean vectors, then their exact ITC."""
        queries = np.asarray(vectors, dtype=np.float32).reshape(-1, self.info["dim"])
        limit = max(k, self.settings.gallery_candidates)
        candidates: dict[str, tuple[Stored, np.ndarray]] = {}
        for hits in self._first_pass(queries, conditions, limit, [*FIELDS, "vectors"]):
            for hit in hits:
                entity = hit["entity"]
                if entity["image_id"] not in candidates:
                    candidates[entity["image_id"]] = (self._stored(entity), self._unpack(entity["vectors"]))
        if not candidates:
            return []
        stored = [s for s, _ in candidates.values()]
        kept, scores = top_by_max_sim(np.stack([v for _, v in candidates.values()]), queries, k)
        return best([(stored[n], score) for n, score in zip(kept.tolist(), scores.tolist(), strict=True)], k)

    def similar(
        self, vectors: np.ndarray, k: int, conditions: dict[str, list[Any]] | None = None
    ) -> list[tuple[Stored, float]]:
        hits = self._first_pass(mean_vector(vectors)[None], conditions, k, FIELDS)[0]
        return [(self._stored(hit["entity"]), float(hit["distance"])) for hit in hits]

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "location": self.settings.gallery_uri,
            "collection": self.name,
            "vector_index": self.info.get("index"),
        }
