"""The gallery's stores, called directly with given vectors (no model): the two-pass search (exact while the
gallery is no bigger than the first pass's candidates, the filter applied in the first pass), look-ups by key,
the background maintenance, kill -9 in the middle of adds and deletes, and the conversion of galleries written
by earlier versions (Milvus Lite's milvus.db, the same format on a Milvus server, the first LanceDB format)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from legacy_gallery import insert_old_rows, write_format2_gallery, write_old_gallery
from pymilvus import MilvusClient
from servertools import milvus_server, settings_for

from service.engine.gallery import (
    Gallery,
    NewImage,
    Record,
    content_key,
    lance_store,
    mean_vector,
    search_memory,
)
from service.engine.gallery.common import PRESELECT_MARGIN, candidate_count, within_reach
from service.engine.gallery.legacy import release_embedded

QUERIES, DIM = 8, 16
MODEL = {"fingerprint": "f" * 64, "name": "synthetic", "dim": DIM, "queries": QUERIES}
FLOAT16 = 2e-3  # how far a score from float16 vectors may be from float32's (unit vectors of 16 values)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def images(count: int, seed: int = 0, start: int = 0) -> list[NewImage]:
    """Synthetic images: clustered unit query vectors (as real images' are), every fifth tagged north."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(12, DIM)))
    made = []
    for n in range(start, start + count):
        vectors = unit(centres[n % 12] + 0.6 * rng.normal(size=(QUERIES, DIM)))
        data = f"image {n}".encode()
        metadata = {"shop": "north" if n % 5 == 0 else "south", "n": n}
        made.append(NewImage(f"image-{n}", content_key(data, None)[0], data, metadata, vectors))
    return made


def exact(stored: list[NewImage], query: np.ndarray, k: int) -> list[tuple[str, float]]:
    scores = [(image.image_id, float((image.vectors @ query.T).max())) for image in stored]
    return sorted(scores, key=lambda pair: (-pair[1], pair[0]))[:k]


def two_passes(stored: list[NewImage], query: np.ndarray, candidates: int, k: int) -> list[tuple[str, float]]:
    """What the embedded store's search must find: the best `candidates` by mean vector, then exactly."""
    means = np.stack([mean_vector(image.vectors) for image in stored])
    first = np.argsort(-(means @ query[0]), kind="stable")[:candidates]
    return exact([stored[n] for n in first], query, k)


def open_gallery(folder: Path, **settings) -> Gallery:
    return Gallery.open(settings_for(None, None, gallery_dir=str(folder), **settings), MODEL)


def test_a_gallery_no_bigger_than_the_candidates_is_searched_exactly(tmp_path):
    added = images(300)
    gallery = open_gallery(tmp_path / "g", gallery_candidates=300)
    gallery.add(added)
    query = unit(np.random.default_rng(7).normal(size=(1, DIM)))
    found = gallery.search(query, 10)
    few = open_gallery(tmp_path / "few", gallery_candidates=20)
    few.add(added)
    approximate = few.search(query, 10)
    gallery.close()
    few.close()
    expected = exact(added, query, 10)
    assert [s.image_id for s, _ in found] == [i for i, _ in expected]
    assert [score for _, score in found] == pytest.approx([s for _, s in expected], abs=FLOAT16)
    # With fewer candidates the second pass still scores each one exactly (by all its query vectors).
    truth = {image.image_id: float((image.vectors @ query.T).max()) for image in added}
    assert len(approximate) == 10
    assert all(score == pytest.approx(truth[s.image_id], abs=FLOAT16) for s, score in approximate)


def test_the_filter_is_applied_in_the_first_pass(tmp_path):
    """Ten candidates of 300 images hold about two north ones: filtered after the first pass, a page of ten
    north images would come back nearly empty. In the first pass, it is full, and right."""
    added = images(300)
    gallery = open_gallery(tmp_path / "g", gallery_candidates=10)
    gallery.add(added)
    query = unit(np.random.default_rng(8).normal(size=(1, DIM)))
    found = gallery.search(query, 10, {"shop": ["north"]})
    mixed = gallery.search(query, 10, {"shop": ["north"], "n": [0, 5, 7]})
    gallery.close()
    assert len(found) == 10 and all(s.metadata["shop"] == "north" for s, _ in found)
    assert sorted(s.image_id for s, _ in mixed) == ["image-0", "image-5"]


def test_lookups_are_by_key_and_row_ids_outlive_maintenance(tmp_path):
    """Maintenance compacts the table in the background and adds new rows to the id and sha256 indexes, which
    an add's checks then use; the in-memory first pass finds rows by their row ids, which stay through
    compaction, so searches stay exact across it, across deletes and in a reopened gallery."""
    gallery = open_gallery(tmp_path / "g", gallery_optimize_rows=64, gallery_candidates=40)
    added = images(320)
    for start in range(0, len(added), 16):
        gallery.add(added[start : start + 16])
    gallery.store.wait_for_maintenance()
    assert gallery.store.table.stats()["fragment_stats"]["num_fragments"] < 4  # 20 adds, compacted
    late = images(4, seed=1, start=1000)
    gallery.add(late)  # after the maintenance: looked up by a scan of the new rows until the next one
    for column in ("id", "sha256"):
        plan = gallery.store.table.search(None).where(f"{column} IN ('x')").select(["id"]).explain_plan()
        assert f"{column}_idx(BTree)" in plan, plan
    plans = gallery.plan([(b"image 3", None), (b"image 3", "other"), (b"new", "image-4")])
    assert [(p.status, p.holder) for p in plans] == [
        ("duplicate", "image-3"),
        ("duplicate", "image-3"),
        ("conflict", "image-4"),
    ]
    removed = [image.image_id for image in added[::7]]
    for image_id in removed:
        assert gallery.delete(image_id)
    kept = [image for image in added + late if image.image_id not in removed]
    queries = unit(np.random.default_rng(5).normal(size=(3, 1, DIM)))
    expected = [[i for i, _ in two_passes(kept, query, 40, 10)] for query in queries]
    for reopened in (False, True):
        if reopened:
            gallery.close()
            gallery = open_gallery(tmp_path / "g", gallery_candidates=40)
        assert [[s.image_id for s, _ in gallery.search(query, 10)] for query in queries] == expected
        # each image's mean vector in memory leads to its own row
        assert all(gallery.similar(image.vectors, 1)[0][0].image_id == image.image_id for image in kept)
    gallery.close()


def test_what_searches_hold_in_memory_appends_deletes_and_ranks_like_numpy(monkeypatch):
    """InMemory (chunks of 4 images here) ranks by mean like numpy over the live images, with and without a
    filter, across chunk boundaries and after dropping its dead slots, and its coarse ITC is within 1e-2 of
    the exact one (16-d test vectors); a snapshot taken before an append or a drop still reads what it held."""
    monkeypatch.setattr(search_memory, "CHUNK_ROWS", 4)
    rng = np.random.default_rng(0)
    memory = search_memory.InMemory(QUERIES, DIM)
    vectors = unit(rng.normal(size=(3000, QUERIES, DIM)))
    means = np.stack([mean_vector(v) for v in vectors])
    codes, scales, _, _ = lance_store.quantize(vectors)
    row_ids = np.arange(0, 6000, 2, dtype=np.uint64)  # stable row ids grow, with gaps
    for start, end in ((0, 3), (3, 10), (10, 1500), (1500, 3000)):  # ending inside a chunk, spanning many
        part = slice(end - 1, start - 1 if start else None, -1)  # any order within a batch
        memory.append(row_ids[part], means[part], codes[part], scales[part])
    held = memory.snapshot
    query = unit(rng.normal(size=(1, DIM)))

    score_of = dict(zip(row_ids.tolist(), (means @ query[0]).tolist(), strict=True))

    def expected(live: np.ndarray, limit: int) -> list[float]:
        return sorted((score_of[r] for r in row_ids[live].tolist()), reverse=True)[:limit]

    def top(limit: int, allowed: np.ndarray | None = None) -> list[float]:
        """The scores of what the first pass returns, in its order (float16 may swap near-ties)."""
        snapshot = memory.snapshot
        return [score_of[r] for r in snapshot[0][memory.top(snapshot, query, limit, allowed)].tolist()]

    live = np.ones(3000, dtype=bool)
    assert top(20) == pytest.approx(expected(live, 20), abs=FLOAT16)
    slots = np.sort(memory.top(held, query, 50))
    exact_itc = (vectors[slots] @ query[0]).max(axis=1)
    assert_within_its_bound(memory.rough(held, slots, query), exact_itc)
    live[::2] = False  # 1,500 dead: more than 1,024 and a quarter, so the dead slots are dropped
    memory.remove(row_ids[::2])
    assert len(memory.snapshot[0]) == 1500 and len(held[0]) == 3000
    assert top(20) == pytest.approx(expected(live, 20), abs=FLOAT16)
    assert top(7, row_ids[::3]) == pytest.approx(expected(live & (np.arange(3000) % 3 == 0), 7), abs=FLOAT16)
    everything = top(5000)  # fewer than asked: every live one, best first
    assert sorted(everything) == sorted(expected(live, 5000))
    assert everything[:20] == pytest.approx(expected(live, 20), abs=FLOAT16)
    slots = np.sort(memory.top(memory.snapshot, query, 50))
    exact_itc = (vectors[live][slots] @ query[0]).max(axis=1)
    assert_within_its_bound(memory.rough(memory.snapshot, slots, query), exact_itc)


def assert_within_its_bound(rough: tuple[np.ndarray, float], exact_itc: np.ndarray) -> None:
    scores, error = rough
    assert np.abs(scores - exact_itc).max() <= error < 2e-2


def test_the_last_pass_reads_every_candidate_that_can_be_among_the_k_best():
    """within_reach keeps each candidate whose exact score can reach the k best, given rough scores within
    `error` of the exact ones, and no more than k + 64; C grows with the square root beyond 100,000 images."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        exact_scores = rng.normal(0.3, 0.05, size=2000)
        rough = exact_scores + rng.uniform(-3e-3, 3e-3, size=2000)
        kept = within_reach(rough, 10, 3e-3)
        assert set(np.argsort(-exact_scores)[:10]) <= set(kept.tolist())
        assert list(kept) == sorted(kept, key=lambda n: -rough[n])
    near_equal = 0.3 + rng.uniform(-3e-3, 3e-3, size=2000)
    assert len(within_reach(near_equal, 10, 3e-3)) == 10 + PRESELECT_MARGIN
    assert len(within_reach(np.linspace(1, 0, 1000), 10, 1e-4)) == 10  # far apart: the k best alone
    assert [candidate_count(2000, n) for n in (10, 100_000, 400_000, 1_000_000)] == [2000, 2000, 4000, 6325]


def test_two_int8_layers_are_closer_than_float16():
    vectors = unit(np.random.default_rng(1).normal(size=(50, 32, 256)))
    coarse, coarse_scale, fine, fine_scale = lance_store.quantize(vectors)
    both = lance_store.dequantize(coarse, coarse_scale) + lance_store.dequantize(fine, fine_scale)
    float16 = vectors.astype(np.float16).astype(np.float32)
    assert np.abs(both - vectors).max() < np.abs(float16 - vectors).max()
    assert coarse.dtype == fine.dtype == np.int8


WRITER = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from servertools import settings_for
from test_gallery_store import MODEL, images
from service.engine.gallery import Gallery

settings = settings_for(None, None, gallery_dir={folder!r}, gallery_optimize_rows=8)
gallery = Gallery.open(settings, MODEL)  # compaction and index updates run between the adds
for batch in range(1000):
    made = images(4, seed=batch, start=4 * batch)
    gallery.add(made)
    print("added", *[i.image_id for i in made], flush=True)
    if batch % 3 == 2:
        gallery.delete(made[0].image_id)
        print("deleted", made[0].image_id, flush=True)
"""


def test_kill_9_mid_writes_keeps_every_acknowledged_image_whole(tmp_path):
    """A process adding and deleting without pause, its maintenance compacting and indexing in the background,
    is killed: every add it reported is there with all its vectors and its file, nothing deleted came back,
    and nothing is there that it did not try to add."""
    folder = tmp_path / "g"
    script = WRITER.format(tests=str(Path(__file__).parent), folder=str(folder))
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    lines = []
    while len(lines) < 40:
        lines.append(writer.stdout.readline().split())
        assert lines[-1], "the writer stopped"
    writer.kill()
    writer.wait()
    writer.stdout.close()
    added = {i for kind, *ids in lines if kind == "added" for i in ids}
    deleted = {i for kind, *ids in lines if kind == "deleted" for i in ids}
    gallery = open_gallery(folder)
    counts = gallery.vector_counts()
    files = {image_id: (gallery.images_dir / gallery.get(image_id).file).exists() for image_id in counts}
    gallery.close()
    assert added - deleted <= set(counts) and not deleted & set(counts)
    assert set(counts.values()) == {QUERIES} and all(files.values())
    tried = {f"image-{n}" for n in range(4 * len(lines))}  # at most one add went past the last line read
    assert set(counts) <= tried


def old_records(count: int) -> list[Record]:
    return [
        Record(
            i.image_id, i.sha256, f"{i.sha256[:2]}/{i.sha256}", 1_700_000_000.123 + n, i.metadata, i.vectors
        )
        for n, i in enumerate(images(count))
    ]


def check_converted(gallery: Gallery, records: list[Record]) -> None:
    """Every image, id, sha256, file, time and metadata of `records` is in `gallery`, with its vectors."""
    assert gallery.count() == len(records)
    vectors = gallery.query_vectors([r.image_id for r in records])
    for record in records:
        stored = gallery.get(record.image_id)
        assert (stored.sha256, stored.file, stored.metadata) == (record.sha256, record.file, record.metadata)
        assert stored.added_at == pytest.approx(record.added_at, abs=1e-3)
        np.testing.assert_allclose(vectors[record.image_id], record.vectors, atol=1e-3)
    query = unit(np.random.default_rng(9).normal(size=(1, DIM)))
    expected = exact([NewImage(r.image_id, r.sha256, b"", r.metadata, r.vectors) for r in records], query, 5)
    assert [s.image_id for s, _ in gallery.search(query, 5)] == [i for i, _ in expected]
    assert gallery.similar(records[3].vectors, 1)[0][0].image_id == records[3].image_id


def test_a_first_format_lancedb_gallery_is_converted_when_opened(tmp_path):
    """A LanceDB gallery of format 2 (no stable row ids: compaction moved its rows; float16 vectors) is copied
    into a new table when opened, nothing lost, and its old table dropped."""
    folder = tmp_path / "g"
    folder.mkdir()
    records = old_records(40)
    write_format2_gallery(folder, MODEL, records)
    gallery = open_gallery(folder)
    check_converted(gallery, records)
    assert gallery.store.info["format"] == lance_store.FORMAT and gallery.store.db.table_names() == [
        gallery.store.info["table"]
    ]
    gallery.close()


def test_an_old_embedded_gallery_is_converted_when_opened(tmp_path):
    """A Milvus Lite gallery (milvus.db), some of it flushed and some only in its write-ahead log, as the old
    code left it after a kill -9: opened, it becomes a LanceDB one with nothing lost, and the old database is
    kept aside under another name."""
    folder = tmp_path / "g"
    folder.mkdir()
    records = old_records(40)
    location = folder / "milvus.db"
    client = MilvusClient(uri=str(location))
    write_old_gallery(client, MODEL, records[:30], flush=True)
    insert_old_rows(client, records[30:])  # in its write-ahead log only
    release_embedded(client, location)
    gallery = open_gallery(folder)
    check_converted(gallery, records)
    gallery.close()
    assert not location.exists() and (folder / "milvus.db.converted").exists()
    gallery = open_gallery(folder)  # opened again: the converted gallery, nothing converted twice
    assert gallery.count() == len(records) and gallery.describe()["engine"] == "lancedb"
    gallery.close()


@pytest.fixture
def milvus_uri(tmp_path):
    with milvus_server(tmp_path / "milvus") as uri:
        yield uri


def test_a_milvus_server_gallery_searches_in_two_passes_and_old_ones_are_converted(tmp_path, milvus_uri):
    records = old_records(30)
    client = MilvusClient(uri=milvus_uri)
    write_old_gallery(client, MODEL, records, flush=False)
    client.close()
    settings = dict(gallery_uri=milvus_uri, gallery_candidates=10)
    gallery = open_gallery(tmp_path / "shared", **settings | {"gallery_candidates": 30})
    check_converted(gallery, records)
    gallery.close()
    gallery = open_gallery(tmp_path / "shared", **settings)
    query = unit(np.random.default_rng(8).normal(size=(1, DIM)))
    found = gallery.search(query, 5, {"shop": ["north"]})
    assert len(found) == 5 and all(s.metadata["shop"] == "north" for s, _ in found)
    assert gallery.describe()["engine"] == "milvus" and gallery.delete(records[0].image_id)
    assert gallery.get(records[0].image_id) is None and gallery.count() == len(records) - 1
    gallery.close()
