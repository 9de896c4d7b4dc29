"""The persistent image gallery's storage: vectors in Milvus, image files on disk.

Milvus Lite (embedded in BLIP2_GALLERY_DIR) or a Milvus server (BLIP2_GALLERY_URI): the same pymilvus client
and the same calls for both. One row per query vector of an image: BLIP-2's ITC score of an image is the
maximum over its query vectors, so a search grouped by image id ranks images exactly as ITC does. One more row
per image (query -1) holds the normalised mean of its query vectors: what search by image compares, because
on a small model every image's best pair of query vectors is nearly parallel to every other's (max-pair
cosines of 0.97-1.00 for any two images of the built-in model), while the mean vectors tell them apart.

What is acknowledged is kept, whole:
- all rows of an add go in with one insert; Milvus Lite writes an insert as one WAL record batch and its
  recovery keeps a batch whole or drops it, so after a crash an image has all its vectors or none;
- an image file is written under a temporary name and renamed, before its rows exist;
- Milvus Lite writes its index files (derived from the data files) in place, so a process killed while
  writing one leaves a truncated file that fails every later load: an embedded gallery that does not load
  drops its index files and loads again, rebuilding them from the data;
- one process at a time opens an embedded gallery (a lock on the folder); a gallery remembers the
  fingerprint of the retrieval model that made its vectors and refuses another (`blip2-serve gallery
  reindex` re-embeds the stored images into a new collection and switches the alias at the end).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from service.settings import Settings

log = logging.getLogger("service.gallery")
# pymilvus warns on every query iterator that Milvus Lite has no MVCC timestamp to give (it needs none).
logging.getLogger("pymilvus").setLevel(logging.ERROR)

# One rule for image ids and metadata keys (a key that can be stored can be filtered on).
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$"
NAME_RULE = "1 to 128 characters: letters, digits, `_`, `.`, `:` or `-`, the first a letter, digit or `_`"
MAX_METADATA_BYTES = 4096
PROPERTY = "blip2.gallery"  # the collection property holding the gallery's model and shape
FINGERPRINT_SUFFIXES = (".safetensors", ".json", ".txt", ".model")
MAX_LIMIT = 16384  # Milvus's bound on a search's limit
FIELDS = ["image_id", "sha256", "file", "added_at", "meta"]
MEAN = -1  # the `query` of an image's mean-vector row


def check_name(value: str, what: str) -> str:
    """`value` if it is a valid image id or metadata key; a ValueError that states the rule otherwise."""
    if not isinstance(value, str) or not re.match(NAME_PATTERN, value):
        raise ValueError(f"{what} {value!r} is not valid: {NAME_RULE}")
    return value


def _wide_integer(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_wide_integer(v) for v in value.values())
    if isinstance(value, list):
        return any(_wide_integer(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63


def check_metadata(metadata: Any) -> dict[str, Any]:
    """`metadata` if a gallery can keep it (a JSON object, its keys valid names, small); a ValueError saying
    why not otherwise. Only top-level keys are filtered on, so only they follow the name rule."""
    if not isinstance(metadata, dict):
        raise ValueError("metadata must be a JSON object")
    for key in metadata:
        check_name(key, "metadata key")
    if _wide_integer(metadata):  # the store's JSON holds 64-bit integers; wider ones failed the insert (500)
        raise ValueError("metadata: integers must fit in 64 bits")
    if len(json.dumps(metadata)) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata: at most {MAX_METADATA_BYTES} bytes of JSON")
    return metadata


def mean_vector(vectors: np.ndarray) -> np.ndarray:
    """The normalised mean of an image's query vectors (queries, dim): what search by image compares."""
    mean = np.asarray(vectors, dtype=np.float32).mean(axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


def content_key(data: bytes, image_id: str | None) -> tuple[str, str]:
    """(sha256 of the bytes, the image's id): an image given no id is named by its content, so adding the
    same bytes again, by the API or by `blip2-serve gallery add`, finds it."""
    digest = hashlib.sha256(data).hexdigest()
    return digest, image_id or digest[:32]


class GalleryError(RuntimeError):
    """The gallery cannot be opened as asked; the message says why and what to do."""


@dataclass
class Stored:
    """One image of the gallery, as GET /gallery/images/{id} shows it."""

    image_id: str
    sha256: str
    file: str  # relative to the images folder
    added_at: float  # seconds since the epoch
    metadata: dict[str, Any]


@dataclass
class NewImage:
    image_id: str
    sha256: str
    data: bytes  # the bytes as sent, kept for the ITM re-rank and a re-index
    metadata: dict[str, Any]
    vectors: np.ndarray  # (queries, dim), L2-normalised


@dataclass
class Planned:
    """Where one image of an add stands before the insert (`Gallery.plan`)."""

    image_id: str  # the id asked for, or the content-named one
    sha256: str
    # "new": to embed and insert; "repeat": the same id and bytes came earlier in this add; "exists": the
    # id holds these bytes; "conflict": the id holds other bytes; "duplicate": these bytes are stored, or
    # come earlier in this add, under `holder`; "reused_id": an earlier image of this add has this id and
    # other bytes.
    status: str
    holder: str  # the id that holds, or will hold, these bytes


def model_fingerprint(source: str) -> str:
    """sha256 over a checkpoint folder's weights, configs and tokenizer files (names and bytes): equal for
    the same checkpoint on any device or dtype, different after any training step."""
    folder = Path(source)
    if not folder.is_dir():  # a hub id, already downloaded by the model loader
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, local_files_only=True))
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix in FINGERPRINT_SUFFIXES
        and not any(part.startswith(".") for part in p.parts)
    )
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def literal(value: Any) -> str:
    """A JSON scalar as a Milvus expression literal (strings quoted and escaped, never spliced raw)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, int) and not -(2**63) <= value < 2**63:  # Milvus's integers (a 500 before)
            raise ValueError(f"{value!r}: a filter integer fits in 64 bits")
        return repr(value)
    if isinstance(value, str):
        if any(
            ord(c) < 0x20 for c in value
        ):  # json.dumps writes them as \u00XX, which Milvus refuses (a 500)
            raise ValueError(f"{value!r}: a filter string holds no control characters")
        return json.dumps(value, ensure_ascii=False)
    raise ValueError(f"{value!r}: a filter value is a string, number or boolean")


def metadata_filter(conditions: dict[str, Any]) -> str:
    """{"shop": "a", "year": [2023, 2024]} -> an expression: every key matches, a list means any of its values."""
    parts = []
    for key, wanted in conditions.items():
        check_name(key, "filter key")
        values = wanted if isinstance(wanted, list) else [wanted]
        if not values:
            raise ValueError(f"filter key {key!r}: an empty list matches nothing")
        parts.append("(" + " or ".join(f'meta["{key}"] == {literal(v)}' for v in values) + ")")
    return " and ".join(parts)


class FolderLock:
    """An exclusive lock on a folder, held while the gallery is open; it dies with the process (flock)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "LOCK"
        self.handle = self.path.open("a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise GalleryError(
                f"the gallery in {folder} is open in {holder}: an embedded gallery serves one process. Stop "
                "that one, or keep the vectors in a Milvus server (BLIP2_GALLERY_URI) that replicas share"
            ) from None
        self.handle.truncate(0)
        self.handle.write(f"pid {os.getpid()}\n")
        self.handle.flush()

    def release(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


class Gallery:
    """The gallery's vectors and files. Methods block (gRPC, disk): routes call them in a thread."""

    def __init__(self, settings: Settings, model: dict[str, Any]) -> None:
        """`model`: {"fingerprint", "name", "dim", "queries"} of the retrieval model in use."""
        folder = Path(settings.gallery_dir).expanduser().resolve()
        self.images_dir = folder / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.name, self.index = settings.gallery_collection, settings.gallery_index
        self.model = model
        self.embedded = settings.gallery_uri is None
        self._lock = FolderLock(folder) if self.embedded else None
        self.location = str(folder / "milvus.db") if self.embedded else settings.gallery_uri
        self._token = settings.gallery_token.get_secret_value() if settings.gallery_token else ""
        self._connect()
        self._writing = threading.Lock()  # check-then-insert is one step within this process
        self.info: dict[str, Any] = {}

    # -- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, settings: Settings, model: dict[str, Any], other_model_ok: bool = False) -> Gallery:
        gallery = cls(settings, model)
        try:
            gallery.info = gallery._collection_info() or gallery._create_first()
            gallery._load()
            if not other_model_ok:
                gallery._check_model()
                gallery._add_missing_means()
        except BaseException:
            gallery.close()
            raise
        return gallery

    def _connect(self) -> None:
        try:
            self.client = MilvusClient(uri=self.location, token=self._token)
        except Exception as exc:
            self.close()
            raise GalleryError(f"cannot open the gallery's vector store at {self.location}: {exc}") from exc

    def _disconnect(self) -> None:
        with contextlib.suppress(Exception):
            if hasattr(self, "client"):
                self.client.close()
        if self.embedded:
            # Milvus Lite serves the folder from a thread of this process until released: release it, so the
            # folder's own lock goes too and the same process may open it again (tests, re-index).
            from milvus_lite import server_manager_instance

            server_manager_instance.release_server(self.location)

    def _load(self) -> None:
        """Load the collection for search (reopened collections start released); an embedded one whose index
        files do not load (a process killed while writing one) loads again without them."""
        try:
            self.client.load_collection(self.info["collection"])
        except MilvusException as exc:
            index_files = sorted(Path(self.location).glob("collections/*/partitions/*/indexes/*"))
            if not self.embedded or not index_files:
                raise
            log.warning(
                "the gallery's vector store at %s did not load (%s): rebuilding its %d index files from the data",
                self.location,
                exc.message,
                len(index_files),
            )
            self._disconnect()
            for path in index_files:
                path.unlink()
            self._connect()
            self.client.load_collection(self.info["collection"])

    def _physical_name(self, generation: int) -> str:
        return f"{self.name}_{generation}"

    def _collection_info(self) -> dict[str, Any] | None:
        """The gallery's record (model, shape, physical collection), or None for a new gallery."""
        for collection in self.client.list_collections():
            if self.name in self.client.list_aliases(collection)["aliases"]:
                properties = self.client.describe_collection(collection)["properties"]
                return json.loads(properties[PROPERTY]) | {"collection": collection}
        return None

    def _create_first(self) -> dict[str, Any]:
        info = self._create(self._physical_name(1))
        self.client.create_alias(info["collection"], self.name)
        return info

    def _create(self, collection: str) -> dict[str, Any]:
        """A new physical collection for the current model, reached through the gallery's alias."""
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=200)  # "<image id>/<query>"
        schema.add_field("image_id", DataType.VARCHAR, max_length=128)
        schema.add_field("query", DataType.INT16)
        schema.add_field("sha256", DataType.VARCHAR, max_length=64)
        schema.add_field("file", DataType.VARCHAR, max_length=200)
        schema.add_field("added_at", DataType.INT64)  # milliseconds since the epoch
        schema.add_field("meta", DataType.JSON)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.model["dim"])
        index = self.client.prepare_index_params()
        params = {"HNSW": {"M": 16, "efConstruction": 200}, "IVF_FLAT": {"nlist": 1024}}.get(self.index, {})
        index.add_index("vector", index_type=self.index, metric_type="IP", params=params)
        for field in ("image_id", "sha256"):  # looked up on every add, and by get and delete
            index.add_index(field, index_type="INVERTED")
        record = {
            "fingerprint": self.model["fingerprint"],
            "model": self.model["name"],
            "dim": self.model["dim"],
            "queries": self.model["queries"],
            "index": self.index,
            "created": time.time(),
        }
        # One shard: a Milvus server then takes each insert (all rows of an add) as one message.
        self.client.create_collection(
            collection,
            schema=schema,
            index_params=index,
            num_shards=1,
            properties={PROPERTY: json.dumps(record)},
        )
        return record | {"collection": collection}

    def _check_model(self) -> None:
        if self.info["fingerprint"] == self.model["fingerprint"]:
            return
        raise GalleryError(
            f"the gallery {self.name!r} at {self.location} was indexed by the retrieval model "
            f"{self.info['model']!r} (fingerprint {self.info['fingerprint'][:12]}), not by this server's "
            f"{self.model['name']!r} ({self.model['fingerprint'][:12]}): its vectors would not compare. Serve it "
            "with the model that indexed it, or re-index it with this one: `blip2-serve gallery reindex` with "
            "the same --gallery-dir and --retrieval-model"
        )

    def close(self) -> None:
        self._disconnect()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- reading -------------------------------------------------------------------------------------
    def _query(self, where: str, limit: int = MAX_LIMIT, fields: list[str] = FIELDS) -> list[dict[str, Any]]:
        return self.client.query(self.name, filter=where, output_fields=fields, limit=limit)

    @staticmethod
    def _stored(row: dict[str, Any]) -> Stored:
        return Stored(row["image_id"], row["sha256"], row["file"], row["added_at"] / 1000, row["meta"] or {})

    def get(self, image_id: str) -> Stored | None:
        rows = self._query(f"query == 0 and image_id == {literal(image_id)}", limit=1)
        return self._stored(rows[0]) if rows else None

    def lookup(self, ids: list[str], hashes: list[str]) -> tuple[dict[str, str], dict[str, str]]:
        """The stored images among `ids` (id -> its hash) and among `hashes` (hash -> its id)."""
        if not ids and not hashes:
            return {}, {}
        where = f"query == 0 and (image_id in {json.dumps(ids)} or sha256 in {json.dumps(hashes)})"
        rows = self._query(where)
        return {r["image_id"]: r["sha256"] for r in rows}, {r["sha256"]: r["image_id"] for r in rows}

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
        stored_ids, stored_hashes = self.lookup(list(first_digest), list(first_with))
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

    def count(self, where: str = "query == 0") -> int:
        """How many images (or rows matching `where`)."""
        rows = self.client.query(self.name, filter=where, output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def vector_counts(self) -> dict[str, int]:
        """Rows per image (each should have `queries`): for checks after a crash."""
        counts: dict[str, int] = {}
        for batch in self._batches("query >= 0", ["image_id"]):
            for row in batch:
                counts[row["image_id"]] = counts.get(row["image_id"], 0) + 1
        return counts

    def _batches(self, where: str, fields: list[str], size: int = 1000) -> Iterator[list[dict[str, Any]]]:
        iterator = self.client.query_iterator(self.name, batch_size=size, filter=where, output_fields=fields)
        try:
            while batch := iterator.next():
                yield batch
        finally:
            iterator.close()

    def read_image(self, stored: Stored) -> bytes:
        return (self.images_dir / stored.file).read_bytes()

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

    def _rows(self, image: NewImage, file: str, added_ms: int) -> list[dict[str, Any]]:
        """An image's rows: one per query vector, then its mean vector's (query -1), inserted together."""
        vectors = np.asarray(image.vectors, dtype=np.float32)
        numbered = [*enumerate(vectors), (MEAN, mean_vector(vectors))]
        return [self._row(image, file, added_ms, q, vector) for q, vector in numbered]

    @staticmethod
    def _row(image: NewImage, file: str, added_ms: int, query: int, vector: np.ndarray) -> dict[str, Any]:
        return {
            "pk": f"{image.image_id}/{query}",
            "image_id": image.image_id,
            "query": query,
            "sha256": image.sha256,
            "file": file,
            "added_at": added_ms,
            "meta": image.metadata,
            "vector": vector,
        }

    def add(self, images: list[NewImage]) -> dict[str, str]:
        """Store what is not there yet, in one insert. Returns each image's id -> "added", or the id of the
        image already holding its id or content (another request may have added it since it was checked)."""
        with self._writing:
            ids, hashes = self.lookup([i.image_id for i in images], [i.sha256 for i in images])
            outcome, rows = {}, []
            added_ms = int(time.time() * 1000)
            for image in images:
                if image.image_id in ids:
                    outcome[image.image_id] = image.image_id
                elif image.sha256 in hashes:
                    outcome[image.image_id] = hashes[image.sha256]
                else:
                    hashes[image.sha256] = image.image_id
                    outcome[image.image_id] = "added"
                    rows += self._rows(image, self._put_file(image.sha256, image.data), added_ms)
            if rows:
                self.client.insert(self.name, rows)
                if self.embedded:
                    # Milvus Lite searches rows still in its memory table by a slow path (~35x slower); a flush
                    # moves them into an indexed segment. A server seals segments itself and must not be
                    # flushed per insert.
                    self.client.flush(self.name)
        return outcome

    def delete(self, image_id: str) -> bool:
        stored = self.get(image_id)
        if stored is None:
            return False
        with self._writing:
            self.client.delete(self.name, filter=f"image_id == {literal(image_id)}")
            if not self.lookup([], [stored.sha256])[1]:  # no other image holds these bytes
                with contextlib.suppress(FileNotFoundError):
                    (self.images_dir / stored.file).unlink()
        return True

    # -- searching -----------------------------------------------------------------------------------
    def search(self, vectors: np.ndarray, k: int, where: str = "") -> list[tuple[Stored, float]]:
        """The k best images for query vectors (n, dim): each image's score is its best inner product over
        its own query vectors and the n given ones (n=1 for a text: exactly BLIP-2's ITC)."""
        limit, found_before = k, -1
        where = f"query >= 0 and ({where})" if where else "query >= 0"  # not the mean-vector rows
        while True:
            lists = self.client.search(
                self.name,
                data=np.asarray(vectors, dtype=np.float32),
                limit=limit,
                group_by_field="image_id",
                filter=where,
                output_fields=FIELDS,
                search_params={"metric_type": "IP", "params": self._search_params(limit)},
            )
            found = min(len(hits) for hits in lists)
            # Milvus Lite groups the best 10 x limit rows, so an image whose query vectors all rank high can
            # leave a list short of k images: ask for more while that brings more (a server fills it at once).
            if found >= k or found <= found_before or limit >= MAX_LIMIT:
                break
            limit, found_before = min(limit * 4, MAX_LIMIT), found
        best: dict[str, tuple[Stored, float]] = {}
        for hits in lists:  # an image's best over the query vectors: the max of its best in each list
            for hit in hits:
                entity, score = hit["entity"], float(hit["distance"])
                if entity["image_id"] not in best or score > best[entity["image_id"]][1]:
                    best[entity["image_id"]] = (self._stored(entity), score)
        return sorted(best.values(), key=lambda pair: -pair[1])[:k]

    def similar(self, vectors: np.ndarray, k: int, where: str = "") -> list[tuple[Stored, float]]:
        """The k images most like an image given by its query vectors (queries, dim): by the cosine of the
        normalised means of both images' query vectors, best first."""
        hits = self.client.search(
            self.name,
            data=mean_vector(vectors)[None],
            limit=k,
            filter=f"query == {MEAN} and ({where})" if where else f"query == {MEAN}",
            output_fields=FIELDS,
            search_params={"metric_type": "IP", "params": self._search_params(k)},
        )[0]
        return [(self._stored(hit["entity"]), float(hit["distance"])) for hit in hits]

    def query_vectors(self, ids: list[str]) -> dict[str, np.ndarray]:
        """Each image's query vectors (queries, dim), in query order, for the given ids."""
        grouped: dict[str, list[tuple[int, Any]]] = {}
        per_query = max(1, MAX_LIMIT // self.info["queries"])  # images whose rows fit one query's limit
        for start in range(0, len(ids), per_query):
            where = f"query >= 0 and image_id in {json.dumps(ids[start : start + per_query])}"
            for row in self._query(where, fields=["image_id", "query", "vector"]):
                grouped.setdefault(row["image_id"], []).append((row["query"], row["vector"]))
        return {
            image_id: np.array([vector for _, vector in sorted(rows, key=lambda r: r[0])], dtype=np.float32)
            for image_id, rows in grouped.items()
        }

    def _add_missing_means(self) -> None:
        """A gallery written before images had a mean-vector row gets them, from its stored query vectors
        (an upsert: servers sharing a Milvus server may do this at once)."""
        if self.count(f"query == {MEAN}") == self.count():
            return
        have = {row["image_id"] for batch in self._batches(f"query == {MEAN}", ["image_id"]) for row in batch}
        missing = [
            stored
            for batch in self._batches("query == 0", FIELDS)
            for row in batch
            if (stored := self._stored(row)).image_id not in have
        ]
        for start in range(0, len(missing), 256):
            part = missing[start : start + 256]
            vectors = self.query_vectors([s.image_id for s in part])
            rows = [
                self._row(
                    NewImage(s.image_id, s.sha256, b"", s.metadata, vectors[s.image_id]),
                    s.file,
                    int(s.added_at * 1000),
                    MEAN,
                    mean_vector(vectors[s.image_id]),
                )
                for s in part
                if s.image_id in vectors
            ]
            self.client.upsert(self.name, rows)
        if missing:
            if self.embedded:
                self.client.flush(self.name)
            log.info("the gallery's %d images got their mean vectors (search by image)", len(missing))

    def _search_params(self, limit: int) -> dict[str, Any]:
        return {"HNSW": {"ef": max(64, limit)}, "IVF_FLAT": {"nprobe": 64}}.get(self.index, {})

    # -- re-indexing ---------------------------------------------------------------------------------
    def reindex(self, embed: Callable[[list[bytes]], np.ndarray], batch_size: int = 32) -> int:
        """Re-embed every stored image with the current model into a new collection; the alias moves to it
        only at the end, so a crash leaves the old gallery whole (and a re-run starts over)."""
        old = self.info["collection"]
        for collection in self.client.list_collections():  # a re-index that died half-way
            if collection.startswith(f"{self.name}_") and collection != old:
                self.client.drop_collection(collection)
        generation = int(old.rsplit("_", 1)[1]) + 1
        new = self._physical_name(generation)
        info = self._create(new)
        done = 0
        for batch in self._batches("query == 0", FIELDS, size=batch_size):
            stored = [self._stored(row) for row in batch]
            vectors = embed([self.read_image(s) for s in stored])
            rows = []
            for item, item_vectors in zip(stored, vectors, strict=True):
                image = NewImage(item.image_id, item.sha256, b"", item.metadata, item_vectors)
                rows += self._rows(image, item.file, int(item.added_at * 1000))
            self.client.insert(new, rows)
            done += len(stored)
        self.client.alter_alias(new, self.name)
        self.client.drop_collection(old)
        self.info = info
        return done

    def describe(self) -> dict[str, Any]:
        return {
            "engine": "milvus-lite" if self.embedded else "milvus",
            "location": self.location,
            "collection": self.name,
            "index": self.info.get("index", self.index),
            "images_dir": str(self.images_dir),
        }


def model_label(source: str) -> str:
    """A model's name for people: its folder's name (the run's, for the `stage1/` folder blip2-train writes)."""
    path = Path(source.rstrip("/"))
    return path.parent.name if path.name in ("stage1", "model") and path.parent.name else path.name


def open_gallery(settings: Settings, retrieval_model, other_model_ok: bool = False) -> Gallery:
    """The gallery for a loaded retrieval model (a Blip2ForImageTextRetrieval), checked against it."""
    config = retrieval_model.config
    model = {
        "fingerprint": model_fingerprint(retrieval_model.name_or_path),
        "name": model_label(retrieval_model.name_or_path),
        "dim": config.image_text_hidden_size,
        "queries": config.num_query_tokens,
    }
    return Gallery.open(settings, model, other_model_ok)
