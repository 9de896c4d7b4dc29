"""The embedded gallery store: one LanceDB table in BLIP2_GALLERY_DIR, one row per image, and what a search
needs of every image held in memory.

Why LanceDB (figures in docs/BENCHMARKS.md): a maintained engine whose every write is an atomic new version
(data files first, then a manifest that names them), so an add that returned is on disk whole and a crash
mid-write leaves the previous version; it opens in a fraction of a second, takes thousands of images a
second, keeps scalar indexes (BTREE on id and sha256, LABEL_LIST on the filter tags) so an add's duplicate
checks and a filter are look-ups by key, and reads rows back by their stable row id.

A row: id, sha256, file, added_at, meta (JSON text), tags (one `key=value` per scalar metadata value: what a
filter matches), mean (the normalised mean query vector, float32) and the query vectors in two int8 layers
(`quantize`: coarse codes and what they leave, each with a scale per vector; together closer to the vectors
than float16, in the same 16 kB). The table has stable row ids, so a row keeps its id through compaction.

A text search is three passes, the first two in memory (search_memory.py's `InMemory`: 8.5 kB per image
with 32 x 256 vectors, 850 MB at 100,000 images, read from the table when the gallery opens):
1. every image's mean vector (float16) times the text's vector, one product over the whole gallery, the
   metadata filter applied as a mask: the best C (BLIP2_GALLERY_CANDIDATES; more beyond 100,000 images,
   common.candidate_count);
2. their ITC from the coarse codes, with a bound on its error from the codes' steps: those within reach of
   the k best (common.within_reach; typically 15-45 for k = 10, at most k + 64);
3. those rows' fine layer and fields read from the table in one take, and their exact ITC, the best inner
   product over all their query vectors.
What it can miss is an image among the true top k whose mean is not among the best C means. Nothing but the
few rows of the last pass is read from disk: on the machines measured, the page cache did not keep the table,
and a random row cost 20-150 us.
No ANN index: on vectors like these (one direction per image, texts in any direction) the ANN indexes measured
lost 1-20% of the true top 10 that an exact scan keeps (docs/BENCHMARKS.md, issue 21), and they cost minutes
of background building that slowed adds.

Maintenance: once the rows added since the last one are BLIP2_GALLERY_OPTIMIZE_ROWS and 5% of the gallery, a
background thread compacts the table, adds the new rows to the scalar indexes and deletes the files of
versions older than a minute (closing the gallery deletes the rest). An add never waits for it. Rows not
indexed yet are looked up by a scan of themselves meanwhile, so results are right throughout.

`gallery.json` names the table in use and the model whose vectors it holds; it is replaced atomically
(rename), so creating a gallery, converting an old one and re-indexing switch at one point, and a table it
does not name is a leftover of one that died: dropped on open. A gallery of an earlier format (2: an ANN
index, no stable row ids; 3: float16 vectors) is copied into a new table when opened.
"""

from __future__ import annotations

import ctypes
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
M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)

import lancedb  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from lancedb.index import BTree, LabelList  # noqa: E402
from lancedb.table import CompactionOptions  # noqa: E402

from service.engine.gallery.common import (  # noqa: E402
    PRESELECT_MARGIN,
    Record,
    Stored,
    best,
    candidate_count,
    int8_codes,
    max_sim,
    mean_vector,
    model_of,
    within_reach,
)
from service.engine.gallery.search_memory import InMemory  # noqa: E402
from service.settings import Settings  # noqa: E402

log = logging.getLogger("service.gallery")
RECORD_FILE = "gallery.json"
TABLES_DIR = "lance"
FORMAT = 4  # 2: an ANN index over `mean`, float16 `vectors`; 3: float16 `vectors`; both copied when opened
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
LOAD_ROWS = 4096  # rows per batch read when the gallery opens (37 MB with 32 x 256 vectors: memory it frees)


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
            # the query vectors in two int8 layers (quantize): `coarse` is what searches hold in memory,
            # `fine` what the second pass reads for its few best candidates
            pa.field("coarse", pa.list_(pa.int8(), queries * dim)),
            pa.field("coarse_scale", pa.list_(pa.float32(), queries)),
            pa.field("fine", pa.list_(pa.int8(), queries * dim)),
            pa.field("fine_scale", pa.list_(pa.float32(), queries)),
        ]
    )


def quantize(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(coarse, coarse_scale, fine, fine_scale) of query vectors (..., dim): int8 codes times a scale per
    vector, then the same for what is left over. coarse alone is within 1/254 of each vector's largest value
    (what a middle pass needs); with fine, within 1/64,516 (closer than float16's 1/2,048), in the same
    16 kB as float16."""
    vectors = np.asarray(vectors, dtype=np.float32)
    layers = []
    for _ in range(2):
        codes, scale = int8_codes(vectors)
        layers += [codes, scale]
        vectors = vectors - codes * scale[..., None]
    return layers[0], layers[1], layers[2], layers[3]


def dequantize(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scale[..., None]


def column_values(rows: pa.Table, name: str, dtype: type) -> np.ndarray:
    """A fixed-size-list column's values, flat, read from Arrow's buffer in place where it can be (pyarrow
    converts float16 to numpy value by value: 100 ms for 500 images)."""
    values = rows[name].combine_chunks().flatten()  # the child array, sliced as the column is
    if len(values) == 0:
        return np.zeros(0, dtype=dtype)
    return np.frombuffer(
        values.buffers()[1], dtype=dtype, count=len(values), offset=values.offset * np.dtype(dtype).itemsize
    )


def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (Linux), whose heap the two functions below tune; None elsewhere."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def limit_heap_arenas() -> None:
    """At most two glibc heaps ("arenas") for the whole process. Lance reads on many threads, and glibc gives
    each its own heap, which keeps what the thread freed for its reuse: 150-250 MB of resident memory left in
    them after a 100,000-image gallery loads. Two arenas hold ~1.3 GB there instead of 1.45-1.6 GB (bench/
    gallery.py --part scale); allocation is not what any thread of the server waits on."""
    libc = glibc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, 2)


def release_freed_heap() -> None:
    """Give the memory freed on the C heap (the gallery's load: batches of rows) back to the system."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def connect(folder: Path) -> lancedb.DBConnection:
    """The gallery folder's LanceDB database, the process's heap limited first (before Lance's threads start)."""
    limit_heap_arenas()
    return lancedb.connect(folder / TABLES_DIR)


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
        self.db = connect(folder)
        self.table = self.db.open_table(info["table"])
        self.memory = InMemory(info["queries"], info["dim"])
        self._writing = threading.Lock()  # an add or delete changes the table and `memory` as one step
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
            store._load_memory()
        store._warm_up()
        store._maybe_maintain()
        return store

    def _warm_up(self) -> None:
        """One search before the first client's: it pays for torch's first kernels and Lance's first read of
        the table's metadata (~0.6 s at a million images), which the server's start-up then includes."""
        if len(self.memory.snapshot[0]):
            self.search(np.full((1, self.info["dim"]), self.info["dim"] ** -0.5, dtype=np.float32), 1)

    def _upgraded(self) -> LanceStore:
        """This older-format gallery copied, image by image as stored, into a new table of this format."""
        source = f"LanceDB format {self.info.get('format', 2)}"
        return self.copied(self.folder, self.settings, model_of(self.info), self.records(1024), source, self)

    @classmethod
    def copied(
        cls,
        folder: Path,
        settings: Settings,
        model: dict[str, Any],
        batches: Iterator[list[Record]],
        source: str,
        old: LanceStore | None = None,
    ) -> LanceStore:
        """A gallery converted from an earlier one (`source`, for the log): a new table filled with its images
        as stored, then published, the `old` table (if any) closed first. One that dies on the way leaves the
        earlier gallery as it was, and the next open converts it again."""
        started = time.perf_counter()
        store = cls.create(folder, settings, model, publish=False)
        for records in batches:
            store.add(records)
        if old is None:
            store.publish()
        else:
            store = old.finish_rebuild(store)
        log.info(
            "converted the gallery in %s from %s: %d images in %.1f s",
            folder,
            source,
            store.count(),
            time.perf_counter() - started,
        )
        return store

    @classmethod
    def create(
        cls, folder: Path, settings: Settings, model: dict[str, Any], publish: bool = True
    ) -> LanceStore:
        """A new, empty gallery for `model` ({"fingerprint", "name", "dim", "queries"}). Unpublished (publish=
        False: a conversion fills it first), it is a leftover until `publish()`."""
        db = connect(folder)
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

    def _load_memory(self) -> None:
        """What searches hold in memory, read from the table: the row ids first (their order decides the
        slots), then the means and coarse codes in batches (never the whole table at once)."""
        row_ids = self.table.search(None).select(["added_at"]).with_row_id(True).to_arrow()["_rowid"]
        columns = ["mean", "coarse", "coarse_scale"]
        batches = self.table.search(None).select(columns).with_row_id(True).to_batches(LOAD_ROWS)
        self.memory.load(map(self._memory_columns, batches), row_ids.to_numpy())
        pa.default_memory_pool().release_unused()  # the batches' memory, which the pool would keep
        release_freed_heap()

    def _memory_columns(self, batch: pa.RecordBatch) -> tuple[np.ndarray, ...]:
        """A batch of rows as InMemory takes them: (row ids, means, coarse codes, their scales)."""
        rows, queries, dim = pa.Table.from_batches([batch]), self.info["queries"], self.info["dim"]
        return (
            rows["_rowid"].to_numpy(),
            column_values(rows, "mean", np.float32).reshape(rows.num_rows, dim),
            column_values(rows, "coarse", np.int8).reshape(rows.num_rows, queries, dim),
            column_values(rows, "coarse_scale", np.float32).reshape(rows.num_rows, queries),
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
        rows = self._rows(in_list("id", ids), ["id", *self._vector_columns()], len(ids))
        return dict(zip(rows["id"].to_pylist(), self._vectors(rows), strict=True))

    def _vector_columns(self) -> list[str]:
        """The columns a row's query vectors are in (`vectors` in float16 before format 4)."""
        return (
            ["vectors"]
            if self.info.get("format", 2) < 4
            else ["coarse", "coarse_scale", "fine", "fine_scale"]
        )

    def _vectors(self, rows: pa.Table) -> np.ndarray:
        """The query vectors of `rows`, (rows, queries, dim) float32."""
        if "vectors" in rows.column_names:
            shape = (rows.num_rows, self.info["queries"], self.info["dim"])
            return column_values(rows, "vectors", np.float16).reshape(shape).astype(np.float32)
        return self._layer(rows, "coarse") + self._layer(rows, "fine")

    def _layer(self, rows: pa.Table, name: str) -> np.ndarray:
        """One int8 layer (`coarse` or `fine`) of the query vectors of `rows`, as float32."""
        shape = (rows.num_rows, self.info["queries"], self.info["dim"])
        codes = column_values(rows, name, np.int8).reshape(shape)
        return dequantize(codes, column_values(rows, f"{name}_scale", np.float32).reshape(shape[:2]))

    def records(self, batch_size: int = 256) -> Iterator[list[Record]]:
        columns = [*FIELDS, *self._vector_columns()]
        for batch in self.table.search(None).select(columns).to_batches(batch_size):
            rows = pa.Table.from_batches([batch])
            vectors = self._vectors(rows)
            yield [
                Record(**vars(self._stored(row)), vectors=v)
                for row, v in zip(rows.select(FIELDS).to_pylist(), vectors, strict=True)
            ]

    # -- writing -------------------------------------------------------------------------------------
    def _arrow(self, records: list[Record]) -> tuple[pa.Table, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        queries, dim = self.info["queries"], self.info["dim"]
        vectors = np.stack([np.asarray(r.vectors, dtype=np.float32) for r in records])
        if vectors.shape[1:] != (queries, dim):
            raise ValueError(
                f"query vectors of shape {vectors.shape[1:]}; this gallery holds {(queries, dim)}"
            )
        means = np.stack([mean_vector(v) for v in vectors])
        coarse, coarse_scale, fine, fine_scale = quantize(vectors)

        def fixed(values: np.ndarray, size: int) -> pa.Array:
            return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), size)

        table = pa.table(
            {
                "id": [r.image_id for r in records],
                "sha256": [r.sha256 for r in records],
                "file": [r.file for r in records],
                "added_at": [float(r.added_at) for r in records],
                "meta": [json.dumps(r.metadata) for r in records],
                "tags": [tags(r.metadata) for r in records],
                "mean": fixed(means, dim),
                "coarse": fixed(coarse, queries * dim),
                "coarse_scale": fixed(coarse_scale, queries),
                "fine": fixed(fine, queries * dim),
                "fine_scale": fixed(fine_scale, queries),
            },
            schema=self.table.schema,
        )
        return table, (means, coarse, coarse_scale)

    def add(self, records: list[Record]) -> None:
        """One commit (a new table version) for all of them; then their row ids into the first pass."""
        if not records:
            return
        table, (means, codes, scales) = self._arrow(records)
        with self._writing:
            self.table.add(table)
            added = self._rows(in_list("id", [r.image_id for r in records]), ["id"], len(records), True)
            position = {image_id: n for n, image_id in enumerate(table["id"].to_pylist())}
            order = [position[image_id] for image_id in added["id"].to_pylist()]
            self.memory.append(added["_rowid"].to_numpy(), means[order], codes[order], scales[order])
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
            self.memory.remove(found["_rowid"].to_numpy())
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
        """Three passes, the first two in memory: C candidates by their mean vectors, those of them within reach
        of the k best by ITC from their coarse codes, and their exact ITC from both layers; the fine layer
        and the fields come from the table in one read (~20-150 us a row, so only for these few)."""
        queries = np.asarray(vectors, dtype=np.float32).reshape(-1, self.info["dim"])
        snapshot = self.memory.snapshot
        limit = max(k, candidate_count(self.settings.gallery_candidates, len(snapshot[0])))
        slots = np.sort(self.memory.top(snapshot, queries, limit, self._allowed(conditions)))
        if len(slots) == 0:
            return []
        rough, error = self.memory.rough(snapshot, slots, queries)
        chosen = np.sort(slots[within_reach(rough, k, error)])
        codes, scales = self.memory.gather(snapshot, chosen, ("codes", "scales"))
        row_ids = snapshot[0][chosen]  # sorted, as the slots are
        rows = self._take(row_ids, [*FIELDS, "fine", "fine_scale"], with_row_ids=True)
        # the rows in the take's order; one deleted meanwhile is missing
        at = np.searchsorted(row_ids, rows["_rowid"].to_numpy())
        coarse = dequantize(codes.numpy()[at], scales.numpy()[at])
        scores = max_sim(coarse + self._layer(rows, "fine"), queries)
        stored = map(self._stored, rows.select(FIELDS).to_pylist())
        return best(list(zip(stored, scores.tolist(), strict=True)), k)

    def similar(
        self, vectors: np.ndarray, k: int, conditions: dict[str, list[Any]] | None = None
    ) -> list[tuple[Stored, float]]:
        """By the cosine of the mean vectors: the best k + a margin in float16, then their exact cosines."""
        mean = mean_vector(vectors)
        snapshot = self.memory.snapshot
        slots = self.memory.top(snapshot, mean[None], k + PRESELECT_MARGIN, self._allowed(conditions))
        row_ids = snapshot[0][slots]
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
            "candidates": candidate_count(self.settings.gallery_candidates, self.count()),
        }
