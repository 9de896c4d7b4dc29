"""The embedded gallery store: one LanceDB table in BLIP2_GALLERY_DIR, one row per image.

Why LanceDB (figures in docs/BENCHMARKS.md): a maintained engine whose every write is an atomic new version
(data files first, then a manifest that names them), so an add that returned is on disk whole and a crash
mid-write leaves the previous version; it opens in a fraction of a second, takes thousands of images a
second, keeps scalar indexes (BTREE on id and sha256, LABEL_LIST on the filter tags) so an add's duplicate
checks are look-ups by key, and an ANN index over a vector column searched with the filter applied first.

A row: id, sha256, file, added_at, meta (JSON text), tags (one `key=value` per scalar metadata value: what a
filter matches), mean (the normalised mean query vector, float32) and vectors (all query vectors, float16,
flattened). A text search is two passes: the ANN (or, before there is an index, exact) search over `mean`
returns C candidates (BLIP2_GALLERY_CANDIDATES), then their exact ITC from `vectors`. A gallery of at most C
images (after the filter) is therefore searched exactly.

With BLIP2_GALLERY_FIRST_PASS=centroids (chosen when the gallery is created) the first pass searches a second
table instead, `probes`: a few k-means centres of each image's query vectors (id, tags, probe), which find
images whose query vectors point several ways. An add writes its centres first and its images second, a delete
the other way round, so a crash between the two leaves only centres of no image, which searches skip.

Index rule: no vector index below BLIP2_GALLERY_INDEX_MIN_IMAGES images (an exact scan of 1 kB per image is
cheap there, and an IVF index needs rows to train on). Once there are that many, a background thread builds
it. Once the rows added since are BLIP2_GALLERY_OPTIMIZE_ROWS and 5% of the gallery, the same thread compacts
the table and adds them to every index; the ANN index takes them as one more segment, which each search walks,
so past BLIP2_GALLERY_INDEX_MAX_SEGMENTS segments it is rebuilt as one. LanceDB searches rows not indexed yet
exactly, so results are right meanwhile. An add never waits for any of this: it commits its own version
beside them.

`gallery.json` names the table in use and the model whose vectors it holds; it is replaced atomically
(rename), so creating a gallery, converting an old one and re-indexing switch at one point, and a table it
does not name is a leftover of one that died: dropped on open.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

# Lance's Rust side logs warnings to stderr by itself (a future default of a statistic, a column it will stop
# adding): noise for the people reading a server's output. Its errors are raised to us as exceptions anyway.
os.environ.setdefault("LANCEDB_LOG", "error")
os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")

import lancedb  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from lancedb.index import BTree, IvfFlat, IvfHnswSq, IvfPq, LabelList  # noqa: E402
from lancedb.table import CompactionOptions  # noqa: E402

from service.gallery.common import Record, Stored, best, centroids, mean_vector, top_by_max_sim  # noqa: E402
from service.settings import Settings  # noqa: E402

log = logging.getLogger("service.gallery")
RECORD_FILE = "gallery.json"
TABLES_DIR = "lance"
FIELDS = ["id", "sha256", "file", "added_at", "meta"]
VECTOR_INDEXES = {"IVF_HNSW_SQ": IvfHnswSq, "IVF_PQ": IvfPq, "IVF_FLAT": IvfFlat}
# What a search still reading an older version may need; files only older versions name go after that, at the
# next maintenance (so the disk holds the live rows plus what the last minute's compaction rewrote).
KEEP_OLD_VERSIONS = timedelta(minutes=1)
# Compaction merges fragments smaller than this many rows (~570 MB of 32 x 256 images): a maintenance rewrites
# the newest few fragments, never the whole table (Lance's default target, a million rows, would rewrite a
# 16 GB fragment after every few thousand adds).
COMPACTION = CompactionOptions(target_rows_per_fragment=32768)
GROWTH_PER_MAINTENANCE = 0.05  # maintenance once the rows not yet indexed are 5% of the gallery


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


def probe_schema(dim: int) -> pa.Schema:
    """The centroids table (BLIP2_GALLERY_FIRST_PASS=centroids): a few rows per image, found by `probe`."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("tags", pa.list_(pa.string())),
            pa.field("probe", pa.list_(pa.float32(), dim)),
        ]
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


class LanceStore:
    """The gallery's records in one LanceDB table (see the module's docstring). Thread-safe: routes call it
    from worker threads while its own thread maintains the indexes."""

    engine = "lancedb"

    def __init__(self, folder: Path, settings: Settings, info: dict[str, Any]) -> None:
        self.folder, self.settings, self.info = folder, settings, info
        self.db = lancedb.connect(folder / TABLES_DIR)
        self.table = self.db.open_table(info["table"])
        self.probes = self.db.open_table(info["probes"]) if info.get("probes") else None
        self._maintainer: threading.Thread | None = None
        self._maintaining = threading.Lock()  # one maintenance run at a time
        self._closed = False
        self._unindexed = self._count_unindexed()
        self._indexed = {
            column
            for table, column in self._searched()
            for index in table.list_indices()
            if index.columns == [column]
        }

    # -- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: Path, settings: Settings) -> LanceStore | None:
        """The gallery in `folder`, or None when it has none yet. Tables it does not name are dropped."""
        record = folder / RECORD_FILE
        if not record.exists():
            return None
        store = cls(folder, settings, json.loads(record.read_text()))
        store._drop_unnamed_tables()
        store._maybe_maintain()
        return store

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
        table = db.create_table(name, schema=schema(model["dim"], model["queries"]))
        # Look-ups by key from the first add on; the indexes cover new rows once maintenance adds them.
        for column, config in (("id", BTree()), ("sha256", BTree()), ("tags", LabelList())):
            table.create_index(column, config=config)
        probes = {}
        if settings.gallery_first_pass == "centroids":
            probes = {"probes": f"probes_{generation}", "centroids": settings.gallery_centroids}
            probe_table = db.create_table(probes["probes"], schema=probe_schema(model["dim"]))
            for column, config in (("id", BTree()), ("tags", LabelList())):
                probe_table.create_index(column, config=config)
        info = {
            "format": 2,
            "engine": cls.engine,
            "table": name,
            "fingerprint": model["fingerprint"],
            "model": model["name"],
            "dim": model["dim"],
            "queries": model["queries"],
            "created": time.time(),
        } | probes
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
            if name not in (self.info["table"], self.info.get("probes")):
                log.info(
                    "dropping the gallery table %s, a leftover of an unfinished create or re-index", name
                )
                self.db.drop_table(name)

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

    # -- reading -------------------------------------------------------------------------------------
    def _rows(self, where: str, columns: list[str], limit: int) -> pa.Table:
        return self.table.search(None).where(where).select(columns).limit(limit).to_arrow()

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
        """The `vectors` column of `rows` as (rows, queries, dim) float16, read from Arrow's buffer in place
        (pyarrow converts float16 to numpy value by value: 100 ms for 500 images)."""
        return self._column(rows, "vectors", np.float16).reshape(-1, self.info["queries"], self.info["dim"])

    @staticmethod
    def _column(rows: pa.Table, name: str, dtype: type) -> np.ndarray:
        """A fixed-size-list column's values, flat, without a copy where Arrow allows."""
        values = rows[name].combine_chunks().flatten()  # the child array, sliced as the column is
        if len(values) == 0:
            return np.zeros(0, dtype=dtype)
        return np.frombuffer(
            values.buffers()[1],
            dtype=dtype,
            count=len(values),
            offset=values.offset * np.dtype(dtype).itemsize,
        )

    def records(self, batch_size: int = 256) -> Iterator[list[Record]]:
        for batch in self.table.search(None).select([*FIELDS, "vectors"]).to_batches(batch_size):
            rows = pa.Table.from_batches([batch])
            vectors = self._vectors(rows)
            yield [
                Record(**vars(self._stored(row)), vectors=v.astype(np.float32))
                for row, v in zip(rows.select(FIELDS).to_pylist(), vectors, strict=True)
            ]

    # -- writing -------------------------------------------------------------------------------------
    def _arrow(self, records: list[Record]) -> pa.Table:
        queries, dim = self.info["queries"], self.info["dim"]
        vectors = np.stack([np.asarray(r.vectors, dtype=np.float32) for r in records])
        if vectors.shape[1:] != (queries, dim):
            raise ValueError(
                f"query vectors of shape {vectors.shape[1:]}; this gallery holds {(queries, dim)}"
            )
        means = np.stack([mean_vector(v) for v in vectors])
        return pa.table(
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

    def add(self, records: list[Record]) -> None:
        """One commit (a new table version) for all of them."""
        if records:
            if self.probes is not None:  # first: a crash between the two leaves probes of no image, ignored
                self.probes.add(self._probe_rows(records))
            self.table.add(self._arrow(records))
            self._unindexed += len(records)
            self._maybe_maintain()

    def _probe_rows(self, records: list[Record]) -> pa.Table:
        per_image = self.info["centroids"]
        centres = centroids(np.stack([np.asarray(r.vectors, dtype=np.float32) for r in records]), per_image)
        return pa.table(
            {
                "id": [r.image_id for r in records for _ in range(per_image)],
                "tags": [tags(r.metadata) for r in records for _ in range(per_image)],
                "probe": pa.FixedSizeListArray.from_arrays(pa.array(centres.reshape(-1)), self.info["dim"]),
            },
            schema=self.probes.schema,
        )

    def delete(self, image_id: str) -> bool:
        if self.get(image_id) is None:
            return False
        self._delete_from(self.table, image_id)  # the image is gone from here on
        if self.probes is not None:  # a crash before this leaves probes of no image: ignored by searches
            self._delete_from(self.probes, image_id)
        return True

    @staticmethod
    def _delete_from(table: Any, image_id: str) -> None:
        for attempt in range(5):  # a compaction committed meanwhile may conflict: the delete is tried again
            try:
                table.delete(f"id = {sql_text(image_id)}")
                return
            except Exception as exc:
                if "onflict" not in str(exc) or attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))

    # -- searching -----------------------------------------------------------------------------------
    def _first_pass(
        self, vector: np.ndarray, where: str | None, limit: int, columns: list[str], probes: bool = False
    ) -> pa.Table:
        table, column = (self.probes, "probe") if probes else (self.table, "mean")
        query = table.search(np.asarray(vector, dtype=np.float32), vector_column_name=column)
        query = query.distance_type("dot").limit(limit).select(columns)
        if column in self._indexed:
            query = query.nprobes(self.settings.gallery_nprobes).ef(max(self.settings.gallery_ef, limit))
        if where:
            query = query.where(where, prefilter=True)
        return query.to_arrow()

    def search(
        self, vectors: np.ndarray, k: int, conditions: dict[str, list[Any]] | None = None
    ) -> list[tuple[Stored, float]]:
        """Two passes: C candidates by each query vector against the mean vectors, then their exact ITC.
        Only the k best become Python objects (500 candidates' rows as dicts cost more than the search)."""
        queries = np.asarray(vectors, dtype=np.float32).reshape(-1, self.info["dim"])
        limit, where = max(k, self.settings.gallery_candidates), tags_filter(conditions)
        if self.probes is not None:
            rows = self._by_probes(queries, where, limit)
        else:
            found = [self._first_pass(query, where, limit, [*FIELDS, "vectors"]) for query in queries]
            rows = found[0] if len(found) == 1 else pa.concat_tables(found)
        if rows.num_rows == 0:
            return []
        ids = np.array(rows["id"].to_pylist())
        _, first = np.unique(ids, return_index=True)  # a candidate of several query vectors, once
        kept, scores = top_by_max_sim(self._vectors(rows)[first], queries, k)
        first = first[kept]
        order = first[np.lexsort((ids[first], -scores))][:k]  # best first, ties in id order
        stored = [self._stored(row) for row in rows.select(FIELDS).take(order).to_pylist()]
        by_row = dict(zip(first.tolist(), scores.tolist(), strict=True))
        return [(item, by_row[row]) for item, row in zip(stored, order.tolist(), strict=True)]

    def _by_probes(self, queries: np.ndarray, where: str | None, limit: int) -> pa.Table:
        """The rows of the `limit` images whose centres come nearest the query vectors (each image has
        `centroids` of them, so that many times the rows are asked for)."""
        ids: dict[str, None] = {}  # in order of their best centre
        for query in queries:
            rows = self._first_pass(query, where, limit * self.info["centroids"], ["id"], probes=True)
            ids.update(dict.fromkeys(rows["id"].to_pylist()))
        chosen = list(ids)[: limit * len(queries)]
        if not chosen:
            return self.table.schema.empty_table()
        return self._rows(in_list("id", chosen), [*FIELDS, "vectors"], len(chosen))

    def similar(
        self, vectors: np.ndarray, k: int, conditions: dict[str, list[Any]] | None = None
    ) -> list[tuple[Stored, float]]:
        """By the cosine of the mean vectors, exact on the candidates the index returns (a few more than k)."""
        mean = mean_vector(vectors)
        limit = max(k, min(4 * k, self.settings.gallery_candidates))
        rows = self._first_pass(mean, tags_filter(conditions), limit, [*FIELDS, "mean"])
        if rows.num_rows == 0:
            return []
        means = self._column(rows, "mean", np.float32).reshape(rows.num_rows, -1)
        scored = [self._stored(row) for row in rows.select(FIELDS).to_pylist()]
        return best(list(zip(scored, (means @ mean).tolist(), strict=True)), k)

    # -- maintenance ---------------------------------------------------------------------------------
    def _has_vector_index(self) -> bool:
        return "mean" in self._indexed

    def _searched(self) -> list[tuple[Any, str]]:
        """(table, vector column) of each table with an ANN index: the images', and the centres' if any."""
        return [(self.table, "mean")] + ([(self.probes, "probe")] if self.probes is not None else [])

    def _count_unindexed(self) -> int:
        try:
            return self.table.index_stats("id_idx").num_unindexed_rows
        except Exception:  # no such index (never expected): maintenance will make the indexes whole
            return self.table.count_rows()

    def _maybe_maintain(self) -> None:
        """Start the background maintenance when it is due (see the module's docstring)."""
        if self._closed or self._maintaining.locked():
            return
        count = self.count()
        index_due = count >= self.settings.gallery_index_min_images and not self._has_vector_index()
        # A maintenance adds the new rows to the ANN index as one more segment, which every search then walks:
        # so not after a fixed number of rows but after a share of the gallery (a few segments per doubling).
        rows_due = max(self.settings.gallery_optimize_rows, int(count * GROWTH_PER_MAINTENANCE))
        if index_due or self._unindexed >= rows_due:
            self._maintainer = threading.Thread(target=self._maintain, name="gallery-index", daemon=True)
            self._maintaining.acquire()
            self._maintainer.start()

    def _maintain(self) -> None:
        try:
            pending = self._unindexed
            for table, column in self._searched():
                # compaction, the new rows into every index, the files of versions older than KEEP_OLD_VERSIONS
                table.optimize(cleanup_older_than=KEEP_OLD_VERSIONS, compaction_options=COMPACTION)
                count = self.count()
                if count >= self.settings.gallery_index_min_images and (
                    column not in self._indexed
                    or table.index_stats(f"{column}_idx").num_indices
                    > self.settings.gallery_index_max_segments
                ):
                    self._build_vector_index(table, column, count)
            self._unindexed = max(0, self._unindexed - pending)
        except Exception as exc:  # nothing is committed by a failed run; the next add tries again
            log.warning("gallery index maintenance failed (searches stay right, maybe slower): %s", exc)
        finally:
            self._maintaining.release()

    def _vector_segments(self) -> int:
        return self.table.index_stats("mean_idx").num_indices

    def _build_vector_index(self, table: Any, column: str, count: int) -> None:
        """(Re)build the ANN index over every row as one segment; searches use the old one until it commits."""
        started = time.perf_counter()
        kind = self.settings.gallery_embedded_index
        # One HNSW graph unless told otherwise: with IVF partitions around it a first pass probing a few of them
        # lost candidates (bench helper: recall@10 0.867 at 100,000 images against 1.00 for one partition).
        partitions = self.settings.gallery_index_partitions or (1 if kind == "IVF_HNSW_SQ" else None)
        config = VECTOR_INDEXES[kind](distance_type="dot", num_partitions=partitions)
        table.create_index(column, config=config, replace=True)
        self._indexed.add(column)
        log.info(
            "the gallery's %s index on %s over %d images: built in %.1f s",
            self.settings.gallery_embedded_index,
            column,
            count,
            time.perf_counter() - started,
        )

    def wait_for_maintenance(self) -> None:
        """Block until a running maintenance is done (benchmarks and tests measure a settled gallery)."""
        if self._maintainer is not None:
            self._maintainer.join()

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "location": str(self.folder / TABLES_DIR / f"{self.info['table']}.lance"),
            "table": self.info["table"],
            "vector_index": self.settings.gallery_embedded_index if self._has_vector_index() else None,
            "first_pass": "centroids" if self.probes is not None else "mean",
        }
