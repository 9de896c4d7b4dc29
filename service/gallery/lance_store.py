"""The embedded gallery store: one LanceDB table in BLIP2_GALLERY_DIR, one row per image, and the mean
vectors of all its images in memory.

Why LanceDB (figures in docs/BENCHMARKS.md): a maintained engine whose every write is an atomic new version
(data files first, then a manifest that names them), so an add that returned is on disk whole and a crash
mid-write leaves the previous version; it opens in a fraction of a second, takes thousands of images a
second, keeps scalar indexes (BTREE on id and sha256, LABEL_LIST on the filter tags) so an add's duplicate
checks and a filter are look-ups by key, and reads rows back by their stable row id.

A row: id, sha256, file, added_at, meta (JSON text), tags (one `key=value` per scalar metadata value: what a
filter matches), mean (the normalised mean query vector, float32) and vectors (all query vectors, float16,
flattened). The table is created with stable row ids, so a row keeps its id through compaction.

A text search is two passes, each exact in what it computes:
1. every image's mean vector, held in memory as float16 (512 bytes per image: 51 MB at 100,000 images),
   times the text's vector: one matrix-vector product over the whole gallery (~3 ms at 100,000 images on 2
   cores), the metadata filter applied as a mask before the top C (BLIP2_GALLERY_CANDIDATES) are taken;
2. those C rows read back by row id and ranked by their exact ITC, the best inner product over all their
   query vectors.
What it can miss is an image among the true top k whose mean is not among the best C means. No ANN index: at a million images the scan reads 512 MB per search, which an HNSW or IVF index would cut, but
on vectors like these (one direction per image, texts in any direction) the ANN indexes measured lost 1-20%
of the true top 10 that an exact scan keeps (docs/BENCHMARKS.md, issue 21), and they cost minutes of
background building that slowed adds. The memory copy is rebuilt from the table when the gallery opens.

Maintenance: once the rows added since the last one are BLIP2_GALLERY_OPTIMIZE_ROWS and 5% of the gallery, a
background thread compacts the table, adds the new rows to the scalar indexes and deletes the files of
versions older than a minute. An add never waits for it. Rows not indexed yet are looked up by a scan of
themselves meanwhile, so results are right throughout.

`gallery.json` names the table in use and the model whose vectors it holds; it is replaced atomically
(rename), so creating a gallery, converting an old one and re-indexing switch at one point, and a table it
does not name is a leftover of one that died: dropped on open. A gallery of format 2 (this store before
stable row ids and the in-memory first pass) is copied into a new table when opened.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

# Lance's Rust side logs warnings to stderr by itself (a future default of a statistic, a column it will stop
# adding): noise for the people reading a server's output. Its errors are raised to us as exceptions anyway.
os.environ.setdefault("LANCEDB_LOG", "error")

import lancedb  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from lancedb.index import BTree, LabelList  # noqa: E402
from lancedb.table import CompactionOptions  # noqa: E402

from service.gallery.common import (  # noqa: E402
    PRESELECT_MARGIN,
    Record,
    Stored,
    best,
    mean_vector,
    model_of,
    top_by_max_sim,
)
from service.settings import Settings  # noqa: E402

log = logging.getLogger("service.gallery")
RECORD_FILE = "gallery.json"
TABLES_DIR = "lance"
FORMAT = 3  # 2: no stable row ids, an ANN index over `mean`; copied into a new table when opened
FIELDS = ["id", "sha256", "file", "added_at", "meta"]
# What a search still reading an older version may need; files only older versions name go after that, at the
# next maintenance (so the disk holds the live rows plus what the last minute's compaction rewrote).
KEEP_OLD_VERSIONS = timedelta(minutes=1)
# Compaction merges fragments smaller than this many rows (~570 MB of 32 x 256 images): a maintenance rewrites
# the newest few fragments, never the whole table (Lance's default target, a million rows, would rewrite a
# 16 GB fragment after every few thousand adds).
COMPACTION = CompactionOptions(target_rows_per_fragment=32768)
GROWTH_PER_MAINTENANCE = 0.05  # maintenance once the rows not yet indexed are 5% of the gallery
STABLE_ROW_IDS = {"new_table_enable_stable_row_ids": "true"}
CHUNK_ROWS = 65536  # the in-memory first pass grows by 32 MB chunks (256-d float16 means), never moved


def sql_text(value: str) -> str:
    """A string as an SQL literal (quotes doubled: never spliced raw)."""
    return "'" + value.replace("'", "''") + "'"


def filter_tag(key: str, value: Any) -> str:
    """The tag a metadata value is found by: `key=` and the value as JSON (strings quoted, so "1" and 1 differ;
    1 and 1.0 alike, as JSON compares them)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)
    return f"{key}={json.dumps(value)}"


def tags(metadata: dict[str, Any]) -> list[str]:
    """The filter tags of an image's metadata: one per top-level string, number or boolean value."""
    return [filter_tag(k, v) for k, v in metadata.items() if isinstance(v, (str, int, float, bool))]


def tags_filter(conditions: dict[str, list[Any]] | None) -> str | None:
    """Checked conditions (common.check_filter) -> SQL: every key matches one of its values."""
    if not conditions:
        return None
    return " AND ".join(
        "array_has_any(tags, [" + ", ".join(sql_text(filter_tag(k, v)) for v in values) + "])"
        for k, values in conditions.items()
    )


def in_list(column: str, values: list[str]) -> str:
    return f"{column} IN ({', '.join(sql_text(v) for v in values)})"


def schema(dim: int, queries: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("sha256", pa.string(), nullable=False),
            pa.field("file", pa.string(), nullable=False),
            pa.field("added_at", pa.float64(), nullable=False),  # seconds since the epoch
            pa.field("meta", pa.string(), nullable=False),
            pa.field("tags", pa.list_(pa.string())),
            pa.field("mean", pa.list_(pa.float32(), dim)),
            pa.field("vectors", pa.list_(pa.float16(), queries * dim)),
        ]
    )


def column_values(rows: pa.Table, name: str, dtype: type) -> np.ndarray:
    """A fixed-size-list column's values, flat, read from Arrow's buffer in place where it can be (pyarrow
    converts float16 to numpy value by value: 100 ms for 500 images)."""
    values = rows[name].combine_chunks().flatten()  # the child array, sliced as the column is
    if len(values) == 0:
        return np.zeros(0, dtype=dtype)
    return np.frombuffer(
        values.buffers()[1], dtype=dtype, count=len(values), offset=values.offset * np.dtype(dtype).itemsize
    )


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text`, whole or not at all, and durably (file and folder synced)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    with temporary.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class MeanVectors:
    """The first pass: every stored image's mean vector (float16) and row id, in row-id order (stable row ids
    only grow, and adds append under the store's write lock). The means fill chunks of CHUNK_ROWS that are
    never moved, so an add costs the same at any size (the row ids, 8 bytes each, sit in one array that doubles
    when full). A search reads one snapshot (row ids, chunks, alive), the first n slots of each: an append
    writes past every snapshot taken before it, then publishes a longer one. A deleted image's slot is marked
    dead, which a search in progress may or may not see; the dead are dropped once they are a quarter."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._empty()

    def _empty(self) -> None:
        self._row_ids = np.zeros(CHUNK_ROWS, dtype=np.uint64)
        self._alive = np.zeros(CHUNK_ROWS, dtype=bool)
        self._chunks: list[torch.Tensor] = []
        self._publish(0)

    def _publish(self, count: int) -> None:
        self.snapshot = (self._row_ids[:count], list(self._chunks), self._alive[:count])

    def append(self, row_ids: np.ndarray, means: np.ndarray) -> None:
        count, added = len(self.snapshot[0]), len(row_ids)
        order = np.argsort(row_ids, kind="stable")
        row_ids = np.asarray(row_ids, dtype=np.uint64)[order]
        if count and added and row_ids[0] <= self._row_ids[count - 1]:
            raise RuntimeError("row ids out of order: the in-memory first pass no longer matches the table")
        if count + added > len(self._row_ids):
            capacity = max(2 * len(self._row_ids), count + added)
            self._row_ids = np.concatenate(
                [self._row_ids, np.zeros(capacity - len(self._row_ids), np.uint64)]
            )
            self._alive = np.concatenate([self._alive, np.zeros(capacity - len(self._alive), bool)])
        self._row_ids[count : count + added] = row_ids
        self._alive[count : count + added] = True
        means = torch.from_numpy(np.asarray(means, dtype=np.float16)[order])
        written = 0
        while written < added:
            chunk, offset = divmod(count + written, CHUNK_ROWS)
            if chunk == len(self._chunks):
                self._chunks.append(torch.zeros((CHUNK_ROWS, self.dim), dtype=torch.float16))
            step = min(CHUNK_ROWS - offset, added - written)
            self._chunks[chunk][offset : offset + step] = means[written : written + step]
            written += step
        self._publish(count + added)

    @staticmethod
    def _slots(known: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
        """The slots in `known` (sorted row ids) of those of `row_ids` that are there."""
        if len(known) == 0:
            return np.zeros(0, dtype=np.int64)
        row_ids = np.asarray(row_ids, dtype=np.uint64)
        found = np.searchsorted(known, row_ids).clip(max=len(known) - 1)
        return found[known[found] == row_ids]

    def remove(self, row_ids: np.ndarray) -> None:
        known, chunks, alive = self.snapshot
        alive[self._slots(known, row_ids)] = False
        if (~alive).sum() > max(1024, len(alive) // 4):  # new arrays: searches keep the old ones they hold
            keep = np.flatnonzero(alive)
            means = torch.cat(chunks)[torch.from_numpy(keep)] if len(keep) else torch.zeros((0, self.dim))
            self._empty()
            self.append(known[keep], means.numpy())

    def top(self, queries: np.ndarray, limit: int, allowed: np.ndarray | None = None) -> np.ndarray:
        """The row ids of the `limit` best images by the best inner product of their mean vector with any of
        `queries` (n, dim), among the live ones (and among the `allowed` row ids, if given), best first."""
        known, chunks, alive = self.snapshot
        if len(known) == 0:
            return known
        half = torch.from_numpy(np.asarray(queries, dtype=np.float16).reshape(-1, self.dim).copy())
        used = [chunk[: len(known) - n * CHUNK_ROWS] for n, chunk in enumerate(chunks)]
        scores = torch.cat([torch.stack([chunk @ query for query in half]).amax(dim=0) for chunk in used])
        scores = scores.float()
        scores[torch.from_numpy(~alive)] = -torch.inf
        if allowed is not None:  # a filter: the best of its images only
            slots = self._slots(known, allowed)
            known, scores = known[slots], scores[torch.from_numpy(slots)]
        found = torch.topk(scores, min(limit, len(known)))
        return known[found.indices.numpy()[np.isfinite(found.values.numpy())]]


class LanceStore:
    """The gallery's records in one LanceDB table (see the module's docstring). Thread-safe: routes call it
    from worker threads while its own thread maintains the indexes."""

    engine = "lancedb"

    def __init__(self, folder: Path, settings: Settings, info: dict[str, Any]) -> None:
        self.folder, self.settings, self.info = folder, settings, info
        self.db = lancedb.connect(folder / TABLES_DIR)
        self.table = self.db.open_table(info["table"])
        self.means = MeanVectors(info["dim"])
        self._writing = threading.Lock()  # an add or delete changes the table and `means` as one step
        self._maintainer: threading.Thread | None = None
        self._maintaining = threading.Lock()  # one maintenance run at a time
        self._closed = False
        self._unindexed = self._count_unindexed()

    # -- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: Path, settings: Settings) -> LanceStore | None:
        """The gallery in `folder`, or None when it has none yet. Tables it does not name are dropped; a
        gallery of an older format is copied into a new table first."""
        record = folder / RECORD_FILE
        if not record.exists():
            return None
        info = json.loads(record.read_text())
        store = cls(folder, settings, info)
        store._drop_unnamed_tables()
        if info.get("format", 2) < FORMAT:
            store = store._upgraded()
        else:
            store._load_means()
        store._maybe_maintain()
        return store

    def _upgraded(self) -> LanceStore:
        """This older-format gallery copied, image by image as stored, into a new table of this format."""
        started = time.perf_counter()
        target = self.start_rebuild(model_of(self.info))
        for records in self.records(1024):
            target.add(records)
        log.info(
            "converted the gallery in %s from format %s to %s: %d images in %.1f s",
            self.folder,
            self.info.get("format", 2),
            FORMAT,
            target.count(),
            time.perf_counter() - started,
        )
        return self.finish_rebuild(target)

    @classmethod
    def create(
        cls, folder: Path, settings: Settings, model: dict[str, Any], publish: bool = True
    ) -> LanceStore:
        """A new, empty gallery for `model` ({"fingerprint", "name", "dim", "queries"}). Unpublished (publish=
        False: a conversion fills it first), it is a leftover until `publish()`."""
        db = lancedb.connect(folder / TABLES_DIR)
        existing = set(db.table_names())
        generation = 1 + max((int(n.rsplit("_", 1)[1]) for n in existing), default=0)
        name = f"images_{generation}"
        table = db.create_table(
            name, schema=schema(model["dim"], model["queries"]), storage_options=STABLE_ROW_IDS
        )
        # Look-ups by key from the first add on; the indexes cover new rows once maintenance adds them.
        for column, config in (("id", BTree()), ("sha256", BTree()), ("tags", LabelList())):
            table.create_index(column, config=config)
        info = {
            "format": FORMAT,
            "engine": cls.engine,
            "table": name,
            "fingerprint": model["fingerprint"],
            "model": model["name"],
            "dim": model["dim"],
            "queries": model["queries"],
            "created": time.time(),
        }
        store = cls(folder, settings, info)
        if publish:
            store.publish()
        return store

    def publish(self) -> None:
        """Make this table the gallery (an atomic switch) and drop any other."""
        write_atomically(self.folder / RECORD_FILE, json.dumps(self.info, indent=1))
        self._drop_unnamed_tables()

    def _drop_unnamed_tables(self) -> None:
        for name in self.db.table_names():
            if name != self.info["table"]:
                log.info(
                    "dropping the gallery table %s, a leftover of an unfinished create or re-index", name
                )
                self.db.drop_table(name)

    def _load_means(self) -> None:
        """The in-memory first pass, read from the table (a column of 1 kB per image)."""
        rows = self.table.search(None).select(["mean"]).with_row_id(True).to_arrow()
        self.means.append(
            rows["_rowid"].to_numpy(), column_values(rows, "mean", np.float32).reshape(-1, self.info["dim"])
        )

    def start_rebuild(self, model: dict[str, Any]) -> LanceStore:
        """A new, unpublished table for `model`, written while this one serves (a re-index fills it)."""
        return self.create(self.folder, self.settings, model, publish=False)

    def finish_rebuild(self, target: LanceStore) -> LanceStore:
        """Switch the gallery to a filled rebuild (gallery.json names it) and drop this table."""
        self.close()
        target.publish()
        return target

    def close(self) -> None:
        self._closed = True
        if self._maintainer is not None:
            self._maintainer.join()  # its commit lands, or never started: nothing half-done either way
        # No search of this process reads an old version any more, and no other process opens the gallery (the
        # folder's lock): what only old versions name can go now, which Lance warns about for the general case.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"optimize\(cleanup_older_than=0\)")
            self.table.optimize(cleanup_older_than=timedelta(0), compaction_options=COMPACTION)

    # -- reading -------------------------------------------------------------------------------------
    def _rows(self, where: str, columns: list[str], limit: int, row_ids: bool = False) -> pa.Table:
        query = self.table.search(None).where(where).select(columns).limit(limit)
        return query.with_row_id(row_ids).to_arrow()

    @staticmethod
    def _stored(row: dict[str, Any]) -> Stored:
        return Stored(row["id"], row["sha256"], row["file"], row["added_at"], json.loads(row["meta"]))

    def lookup(self, ids: list[str], hashes: list[str]) -> tuple[dict[str, str], dict[str, str]]:
        found_ids: dict[str, str] = {}
        found_hashes: dict[str, str] = {}
        if ids:
            for row in self._rows(in_list("id", ids), ["id", "sha256"], len(ids)).to_pylist():
                found_ids[row["id"]] = row["sha256"]
        if hashes:
            for row in self._rows(in_list("sha256", hashes), ["id", "sha256"], len(hashes)).to_pylist():
                found_hashes[row["sha256"]] = row["id"]
        return found_ids, found_hashes

    def get(self, image_id: str) -> Stored | None:
        rows = self._rows(in_list("id", [image_id]), FIELDS, 1).to_pylist()
        return self._stored(rows[0]) if rows else None

    def count(self) -> int:
        return self.table.count_rows()

    def query_vectors(self, ids: list[str]) -> dict[str, np.ndarray]:
        if not ids:
            return {}
        rows = self._rows(in_list("id", ids), ["id", "vectors"], len(ids))
        return dict(zip(rows["id"].to_pylist(), self._vectors(rows), strict=True))

    def _vectors(self, rows: pa.Table) -> np.ndarray:
        """The `vectors` column of `rows` as (rows, queries, dim) float16."""
        return column_values(rows, "vectors", np.float16).reshape(-1, self.info["queries"], self.info["dim"])

    def records(self, batch_size: int = 256) -> Iterator[list[Record]]:
        for batch in self.table.search(None).select([*FIELDS, "vectors"]).to_batches(batch_size):
            rows = pa.Table.from_batches([batch])
            vectors = self._vectors(rows)
            yield [
                Record(**vars(self._stored(row)), vectors=v.astype(np.float32))
                for row, v in zip(rows.select(FIELDS).to_pylist(), vectors, strict=True)
            ]

    # -- writing -------------------------------------------------------------------------------------
    def _arrow(self, records: list[Record]) -> tuple[pa.Table, np.ndarray]:
        queries, dim = self.info["queries"], self.info["dim"]
        vectors = np.stack([np.asarray(r.vectors, dtype=np.float32) for r in records])
        if vectors.shape[1:] != (queries, dim):
            raise ValueError(
                f"query vectors of shape {vectors.shape[1:]}; this gallery holds {(queries, dim)}"
            )
        means = np.stack([mean_vector(v) for v in vectors])
        table = pa.table(
            {
                "id": [r.image_id for r in records],
                "sha256": [r.sha256 for r in records],
                "file": [r.file for r in records],
                "added_at": [float(r.added_at) for r in records],
                "meta": [json.dumps(r.metadata) for r in records],
                "tags": [tags(r.metadata) for r in records],
                "mean": pa.FixedSizeListArray.from_arrays(pa.array(means.reshape(-1)), dim),
                "vectors": pa.FixedSizeListArray.from_arrays(
                    pa.array(vectors.astype(np.float16).reshape(-1)), queries * dim
                ),
            },
            schema=self.table.schema,
        )
        return table, means

    def add(self, records: list[Record]) -> None:
        """One commit (a new table version) for all of them; then their row ids into the first pass."""
        if not records:
            return
        table, means = self._arrow(records)
        with self._writing:
            self.table.add(table)
            added = self._rows(in_list("id", [r.image_id for r in records]), ["id"], len(records), True)
            position = {image_id: n for n, image_id in enumerate(table["id"].to_pylist())}
            order = [position[image_id] for image_id in added["id"].to_pylist()]
            self.means.append(added["_rowid"].to_numpy(), means[order])
            self._unindexed += len(records)
        self._maybe_maintain()

    def delete(self, image_id: str) -> bool:
        with self._writing:
            found = self._rows(in_list("id", [image_id]), ["id"], 1, True)
            if found.num_rows == 0:
                return False
            # a compaction committed meanwhile may conflict: the delete is tried again
            for attempt in range(5):
                try:
                    self.table.delete(f"id = {sql_text(image_id)}")
                    break
                except Exception as exc:
                    if "onflict" not in str(exc) or attempt == 4:
                        raise
                    time.sleep(0.05 * (attempt + 1))
            self.means.remove(found["_rowid"].to_numpy())
        return True

    # -- searching -----------------------------------------------------------------------------------
    def _allowed(self, conditions: dict[str, list[Any]] | None) -> np.ndarray | None:
        """The row ids of the images a filter lets through (by the tags' LABEL_LIST index), or None for no
        filter."""
        where = tags_filter(conditions)
        if where is None:
            return None
        rows = self._rows(where, ["id"], max(1, self.count()), row_ids=True)
        return rows["_rowid"].to_numpy()

    def _take(self, row_ids: np.ndarray, columns: list[str], with_row_ids: bool = False) -> pa.Table:
        """Rows by row id (one that was deleted meanwhile is simply missing)."""
        if len(row_ids) == 0:
            return self._rows("false", columns, 1, with_row_ids)
        return self.table.take_row_ids(row_ids.tolist(), with_row_id=with_row_ids).select(columns).to_arrow()

    def search(
        self, vectors: np.ndarray, k: int, conditions: dict[str, list[Any]] | None = None
    ) -> list[tuple[Stored, float]]:
        """Two passes: C candidates by the mean vectors in memory, then their exact ITC. Only the k best
        become Python objects (1,000 candidates' rows as dicts cost more than the search)."""
        queries = np.asarray(vectors, dtype=np.float32).reshape(-1, self.info["dim"])
        limit = max(k, self.settings.gallery_candidates)
        row_ids = self.means.top(queries, limit, self._allowed(conditions))
        # Only the vectors of the candidates, and the fields of the k best: Lance reads each row's columns
        # apart, ~20 us per row and column (1,000 rows' fields besides their vectors: +40 ms).
        rows = self._take(row_ids, ["vectors"], with_row_ids=True)
        if rows.num_rows == 0:
            return []
        kept, scores = top_by_max_sim(self._vectors(rows), queries, k)
        found = rows["_rowid"].to_numpy()[kept]
        fields = self._take(found, [*FIELDS], with_row_ids=True)
        stored = dict(zip(fields["_rowid"].to_pylist(), map(self._stored, fields.to_pylist()), strict=True))
        # a row deleted between the two reads is left out
        return best(
            [(stored[r], s) for r, s in zip(found.tolist(), scores.tolist(), strict=True) if r in stored], k
        )

    def similar(
        self, vectors: np.ndarray, k: int, conditions: dict[str, list[Any]] | None = None
    ) -> list[tuple[Stored, float]]:
        """By the cosine of the mean vectors: the best k + a margin in float16, then their exact cosines."""
        mean = mean_vector(vectors)
        row_ids = self.means.top(mean[None], k + PRESELECT_MARGIN, self._allowed(conditions))
        rows = self._take(row_ids, [*FIELDS, "mean"])
        if rows.num_rows == 0:
            return []
        means = column_values(rows, "mean", np.float32).reshape(rows.num_rows, -1)
        scored = [self._stored(row) for row in rows.select(FIELDS).to_pylist()]
        return best(list(zip(scored, (means @ mean).tolist(), strict=True)), k)

    # -- maintenance ---------------------------------------------------------------------------------
    def _count_unindexed(self) -> int:
        try:
            return self.table.index_stats("id_idx").num_unindexed_rows
        except Exception:  # no such index (never expected): maintenance will make the indexes whole
            return self.table.count_rows()

    def _maybe_maintain(self) -> None:
        """Start the background maintenance when it is due (see the module's docstring)."""
        if self._closed or self._maintaining.locked():
            return
        rows_due = max(self.settings.gallery_optimize_rows, int(self.count() * GROWTH_PER_MAINTENANCE))
        if self._unindexed >= rows_due:
            self._maintainer = threading.Thread(target=self._maintain, name="gallery-index", daemon=True)
            self._maintaining.acquire()
            self._maintainer.start()

    def _maintain(self) -> None:
        try:
            pending = self._unindexed
            # compaction (row ids stay: the table has stable ones), the new rows into the scalar indexes, the
            # files of versions older than KEEP_OLD_VERSIONS
            self.table.optimize(cleanup_older_than=KEEP_OLD_VERSIONS, compaction_options=COMPACTION)
            self._unindexed = max(0, self._unindexed - pending)
        except Exception as exc:  # nothing is committed by a failed run; the next add tries again
            log.warning("gallery maintenance failed (searches stay right, maybe slower): %s", exc)
        finally:
            self._maintaining.release()

    def wait_for_maintenance(self) -> None:
        """Block until a running maintenance is done (benchmarks and tests measure a settled gallery)."""
        if self._maintainer is not None:
            self._maintainer.join()

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "location": str(self.folder / TABLES_DIR / f"{self.info['table']}.lance"),
            "table": self.info["table"],
            "first_pass": "exact, mean vectors in memory",
            "candidates": self.settings.gallery_candidates,
        }
