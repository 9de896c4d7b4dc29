"""Which first pass for the gallery's two-pass search: candidates by an ANN index, then the exact max-sim.

    python bench/gallery_first_pass.py --vectors synthetic --images 10000,100000
    python bench/gallery_first_pass.py --vectors real --images 5000      # the built-in model, easy-VQA images
    python bench/gallery_first_pass.py --vectors synthetic --images 10000 --today /work/main   # + Milvus Lite 3

The same vectors and text queries go through every method in one run; each method's ranking is judged by
recall@10 against the exact max-sim over every image's 32 query vectors in float32 (ties within 1e-4 count).

- exact float16: every image's 32 vectors kept as float16 in memory, scored in blocks (the baseline).
- LanceDB, one mean vector per image (normalised mean of its query vectors) in an ANN index (IVF_FLAT,
  IVF_PQ, IVF_HNSW_SQ, cosine): the best C images, then the exact max-sim over their float16 vectors.
- --methods mean-exact: the mean first pass without an index (the exact best C by mean cosine), to separate
  what the mean vector loses from what an ANN index loses.
- LanceDB multivector column (all 32 vectors of an image, max-sim natively) with an index: the best C
  images, then the same exact re-scoring.
- --today CHECKOUT: the gallery of that checkout (Milvus Lite 3, `service.engine.gallery.Gallery`), fed the same
  vectors in a child process that imports that checkout's package.
- --store CHECKOUT: that checkout's gallery store as `gallery.py --part scale` measures it (synthetic only: it
  makes the same images and texts from the same seeds).

synthetic: clustered unit vectors as `common.synthetic` makes them (the texts are random unit vectors).
real: the first N easy-VQA images (train, then test) and 35 colour/shape phrases through a real `blip2-serve`
with the built-in model, `POST /embed` with `return_query_embeddings` (cached under the bench cache).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CACHE,
    DEFAULT_MODEL,
    DIM,
    QUERIES,
    Server,
    disk_bytes,
    machine,
    max_sim,
    now,
    percentile,
    png_b64,
    recall_at,
    rss_bytes,
    synthetic_gallery,
    synthetic_texts,
)

CANDIDATES = (100, 200, 500, 1000, 2000)
K = 10


# -- the vectors: float16 per image, the text queries, and the exact float32 scores --------------------
class VectorSet:
    def __init__(self, vectors16: np.ndarray, texts: np.ndarray, exact: np.ndarray, source: str) -> None:
        self.vectors16, self.texts, self.exact, self.source = vectors16, texts, exact, source

    def save(self, path: Path) -> None:
        np.savez(path, vectors16=self.vectors16, texts=self.texts, exact=self.exact, source=self.source)

    @classmethod
    def load(cls, path: Path) -> VectorSet:
        data = np.load(path)
        return cls(data["vectors16"], data["texts"], data["exact"], str(data["source"]))


def synthetic_set(count: int, searches: int) -> VectorSet:
    texts = synthetic_texts(searches)
    vectors16 = np.empty((count, QUERIES, DIM), np.float16)
    exact = np.empty((searches, count), np.float32)
    for start, part in synthetic_gallery(count):
        vectors16[start : start + len(part)] = part
        exact[:, start : start + len(part)] = max_sim(part, texts)
    return VectorSet(vectors16, texts, exact, f"synthetic clustered, {count} images")


def real_set(count: int) -> VectorSet:
    """Query vectors of the first `count` easy-VQA images and text vectors of colour/shape phrases, by /embed."""
    import easy_vqa

    cache = CACHE / f"gallery_real_vectors_{count}.npz"
    for cached in CACHE.glob("gallery_real_vectors_*.npz"):  # the first `count` of a bigger set are the same
        if int(cached.stem.rsplit("_", 1)[1]) >= count:
            found = VectorSet.load(cached)
            source = found.source.replace(f"{len(found.vectors16)} easy-VQA", f"{count} easy-VQA")
            return VectorSet(found.vectors16[:count], found.texts, found.exact[:, :count], source)
    paths = list(easy_vqa.get_train_image_paths().values()) + list(easy_vqa.get_test_image_paths().values())
    shapes = ("circle", "rectangle", "triangle")
    colours = [a for a in easy_vqa.get_answers() if a not in (*shapes, "yes", "no")]
    phrases = [f"a {c} {s}" for c in colours for s in shapes] + [f"a {c} shape" for c in colours]
    phrases += [f"a {s}" for s in shapes]
    env = {"BLIP2_RETRIEVAL_MODEL": str(DEFAULT_MODEL / "stage1"), "BLIP2_MAX_BATCH_SIZE": "32"}
    with Server(env) as server, httpx.Client(base_url=server.url, timeout=300) as client:

        def embed(body: dict) -> dict:
            response = client.post("/embed", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"/embed answered {response.status_code}: {response.text}")
            return response.json()

        texts = np.array(embed({"texts": phrases})["text_embeddings"], np.float32)
        vectors = []
        for start in range(0, min(count, len(paths)), 16):  # /embed takes 16 at most
            images = [png_b64(Path(p).read_bytes()) for p in paths[start : start + 16]]
            vectors += embed({"images": images, "return_query_embeddings": True})["image_query_embeddings"]
    vectors32 = np.array(vectors, np.float32)
    found = VectorSet(
        vectors32.astype(np.float16),
        texts,
        max_sim(vectors32, texts),
        f"built-in model (service/default_model/stage1), {len(vectors32)} easy-VQA images, {len(phrases)} phrases",
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    found.save(cache)
    return found


# -- the methods ----------------------------------------------------------------------------------------
def rescore(vectors16: np.ndarray, candidates: np.ndarray, text: np.ndarray, k: int = K) -> list[int]:
    """The exact max-sim over the candidates' float16 vectors: the best k candidates, best first."""
    scores = (vectors16[candidates].astype(np.float32) @ text).max(axis=1)
    return [int(candidates[i]) for i in np.argsort(-scores, kind="stable")[:k]]


def exact_float16(vectors16: np.ndarray, text: np.ndarray, block: int = 4096) -> list[int]:
    scores = np.concatenate(
        [
            (vectors16[s : s + block].astype(np.float32) @ text).max(axis=1)
            for s in range(0, len(vectors16), block)
        ]
    )
    return list(np.argsort(-scores, kind="stable")[:K])


def exact_mean_rows(data: VectorSet, candidates: tuple[int, ...]) -> list[dict]:
    """The mean first pass without ANN error: the exact best C by mean-vector cosine, then exact max-sim."""
    means = np.concatenate(
        [
            data.vectors16[s : s + 4096].astype(np.float32).mean(axis=1)
            for s in range(0, len(data.vectors16), 4096)
        ]
    )
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    rows = []
    for limit in candidates:

        def search(text: np.ndarray, limit: int = limit) -> list[int]:
            best = min(limit, len(means))  # a gallery smaller than C is searched whole
            return rescore(data.vectors16, np.argpartition(-(means @ text), best - 1)[:best], text)

        rows.append({"method": "exact mean ranking -> exact", "C": limit, **timed(search, data)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def timed(search: Callable[[np.ndarray], list[int]], data: VectorSet) -> dict:
    """p50 of `search` over the texts (after one warm-up) and its recall@10 against the exact ranking."""
    search(data.texts[0])
    latencies, recalls = [], []
    for text, exact in zip(data.texts, data.exact, strict=True):
        started = time.perf_counter()
        found = search(text)
        latencies.append(time.perf_counter() - started)
        recalls.append(recall_at(found, exact))
    return {
        "p50 ms": round(1000 * percentile(latencies, 50), 2),
        "recall@10": round(statistics.fmean(recalls), 4),
    }


def lance_row_batches(data: VectorSet, multivector: bool, size: int = 5000):
    import pyarrow as pa

    for start in range(0, len(data.vectors16), size):
        part = data.vectors16[start : start + size].astype(np.float32)
        mean = part.mean(axis=1)
        mean /= np.linalg.norm(mean, axis=1, keepdims=True)
        columns = {
            "id": pa.array(np.arange(start, start + len(part))),
            "mean": pa.FixedSizeListArray.from_arrays(pa.array(mean.ravel()), DIM),
        }
        if multivector:
            inner = pa.FixedSizeListArray.from_arrays(pa.array(part.ravel()), DIM)
            columns["multi"] = pa.ListArray.from_arrays(
                pa.array(np.arange(0, part.shape[0] * part.shape[1] + 1, part.shape[1], dtype=np.int32)),
                inner,
            )
        yield pa.table(columns)


def lance_methods(data: VectorSet, folder: Path, args, multivector: bool) -> list[dict]:
    import lancedb

    count = len(data.vectors16)
    db = lancedb.connect(folder)
    batches = lance_row_batches(data, multivector)
    started = time.perf_counter()
    table = db.create_table("images", data=next(batches))
    for batch in batches:
        table.add(batch)
    rows = [{"method": "LanceDB insert", "images/s": round(count / (time.perf_counter() - started))}]
    columns = (["mean"] if "mean" in args.methods.split(",") else []) + (["multi"] if multivector else [])
    for column in columns:
        vectors = count * (data.vectors16.shape[1] if column == "multi" else 1)
        partitions = max(16, int(np.sqrt(vectors)))
        for name in ("IVF_FLAT", "IVF_PQ", "IVF_HNSW_SQ"):
            if column == "multi" and name == "IVF_FLAT":
                continue  # a flat multivector index is the exact scan, measured as "exact float16"
            config, nprobes = index_config(name, partitions)
            started = time.perf_counter()
            table.create_index(column, config=config, replace=True)
            build_s = time.perf_counter() - started
            for limit in map(int, args.candidates.split(",")):
                first_pass = partial(lance_first_pass, table, column, name, nprobes, limit)
                first = timed(lambda t, f=first_pass: list(f(t)[:K]), data)
                both = timed(lambda t, f=first_pass: rescore(data.vectors16, f(t), t), data)
                rows.append(
                    {
                        "method": f"LanceDB {column} {name} -> exact",
                        "C": limit,
                        "build s": round(build_s, 1),
                        "first pass p50 ms": first["p50 ms"],
                        "first pass alone recall@10": first["recall@10"],
                        "two-pass p50 ms": both["p50 ms"],
                        "recall@10": both["recall@10"],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    rows.append(
        {"method": "LanceDB disk bytes/image (mean + multivector)", "value": disk_bytes(folder) / count}
    )
    if "vectors" in args.methods.split(","):
        rows += lance_all_vectors(data, db, tuple(map(int, args.vector_k.split(","))))
    return rows


def lance_all_vectors(data: VectorSet, db, vector_ks: tuple[int, ...]) -> list[dict]:
    """One row per query vector (image id, float16 vector) in an ANN index: the best K vectors, their distinct
    images, then the exact max-sim over those images' float16 vectors."""
    import pyarrow as pa

    count, queries = data.vectors16.shape[:2]
    rows, table = [], None
    started = time.perf_counter()
    for start in range(0, count, 5000):
        part = data.vectors16[start : start + 5000]
        batch = pa.table(
            {
                "image": pa.array(np.repeat(np.arange(start, start + len(part)), queries)),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1)), DIM),
            }
        )
        table = db.create_table("vectors", data=batch) if table is None else table
        if start:
            table.add(batch)
    rows.append(
        {
            "method": "LanceDB per-vector table insert",
            "images/s": round(count / (time.perf_counter() - started)),
        }
    )
    partitions = max(16, int(np.sqrt(count * queries)))
    for name in ("IVF_PQ", "IVF_HNSW_SQ"):
        config, nprobes = index_config(name, partitions)
        started = time.perf_counter()
        table.create_index("vector", config=config, replace=True)
        build_s = time.perf_counter() - started
        for k in vector_ks:
            vectors_first = partial(lance_first_pass, table, "vector", name, nprobes, k, column_out="image")
            first = timed(lambda t, f=vectors_first: list(dict.fromkeys(f(t)))[:K], data)
            both = timed(lambda t, f=vectors_first: rescore(data.vectors16, np.unique(f(t)), t), data)
            rows.append(
                {
                    "method": f"LanceDB all vectors {name} -> distinct images -> exact",
                    "K vectors": k,
                    "build s": round(build_s, 1),
                    "first pass p50 ms": first["p50 ms"],
                    "first pass alone recall@10": first["recall@10"],
                    "two-pass p50 ms": both["p50 ms"],
                    "recall@10": both["recall@10"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def lance_first_pass(
    table, column: str, index: str, nprobes: int, limit: int, text: np.ndarray, column_out: str = "id"
) -> np.ndarray:
    """The ids of the best `limit` images for one text by the index on `column` ("mean" or "multi")."""
    query = text[None] if column == "multi" else text
    search = table.search(query, vector_column_name=column).distance_type("cosine").nprobes(nprobes)
    if "HNSW" in index:
        search = search.ef(int(1.5 * limit))
    return search.limit(limit).select([column_out]).to_arrow()[column_out].to_numpy()


def index_config(name: str, partitions: int):
    """(LanceDB index config, nprobes): IVF over sqrt(vectors) partitions, probing an eighth (16 at least);
    HNSW graphs inside a few large partitions, all probed."""
    from lancedb.index import IvfFlat, IvfHnswSq, IvfPq

    if name == "IVF_FLAT":
        return IvfFlat(distance_type="cosine", num_partitions=partitions), max(16, partitions // 8)
    if name == "IVF_PQ":
        return IvfPq(distance_type="cosine", num_partitions=partitions, num_sub_vectors=32), max(
            16, partitions // 8
        )
    hnsw_partitions = max(1, partitions // 64)
    return IvfHnswSq(distance_type="cosine", num_partitions=hnsw_partitions), hnsw_partitions


# -- today's store, in a child process that imports the given checkout's package ------------------------
def today_worker(path: Path, searches: int) -> dict:
    from service.engine.gallery import Gallery, NewImage
    from service.settings import Settings

    data = VectorSet.load(path)
    folder = Path(tempfile.mkdtemp(prefix="gallery-today-"))
    gallery = Gallery.open(
        Settings(gallery_dir=str(folder), gallery_index="FLAT"),
        {"fingerprint": "synthetic", "name": "synthetic", "dim": DIM, "queries": QUERIES},
    )
    started = time.perf_counter()
    for start in range(0, len(data.vectors16), 256):  # as gallery.py --part scale: no duplicate look-ups
        part = data.vectors16[start : start + 256].astype(np.float32)
        images = [NewImage(f"{start + n}", f"{start + n:064x}", b"", {}, v) for n, v in enumerate(part)]
        gallery.client.insert(gallery.name, [row for i in images for row in gallery._rows(i, "", 0)])
    gallery.client.flush(gallery.name)
    insert_s = time.perf_counter() - started
    data.texts = data.texts[:searches]
    data.exact = data.exact[:searches]
    result = timed(lambda t: [int(s.image_id) for s, _ in gallery.search(t[None], K)], data)
    gallery.close()
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "method": "Milvus Lite 3 (today's Gallery, FLAT)",
        "images/s": round(len(data.vectors16) / insert_s),
        **result,
    }


def today(checkout: Path, data: VectorSet, searches: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "vectors.npz"
        data.save(path)
        command = [sys.executable, __file__, "--today-worker", str(path), "--searches", str(searches)]
        env = {"PYTHONPATH": str(checkout), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
        out = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def new_store(checkout: Path, count: int, searches: int) -> dict:
    """`gallery.py --part scale` with that checkout's package: the same synthetic images and texts as here."""
    command = [sys.executable, str(Path(__file__).with_name("gallery.py")), "--part", "scale"]
    command += ["--images", str(count), "--searches", str(searches)]
    env = {"PYTHONPATH": str(checkout), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, check=True)
    return {
        "method": f"the gallery store of {checkout.name}",
        **json.loads(out.stdout.strip().splitlines()[-1]),
    }


def measure(data: VectorSet, args) -> dict:
    count = len(data.vectors16)
    report = {"vectors": data.source, "images": count, "texts": len(data.texts), "rows": []}
    rows = report["rows"]
    rows.append(
        {
            "method": "exact float16 (numpy, blocks of 4096)",
            **timed(lambda t: exact_float16(data.vectors16, t), data),
        }
    )
    print(json.dumps(rows[-1]), flush=True)
    if "mean-exact" in args.methods.split(","):
        rows += exact_mean_rows(data, tuple(map(int, args.candidates.split(","))))
    folder = Path(tempfile.mkdtemp(prefix="lance-first-pass-"))
    rss = rss_bytes()
    try:
        rows += lance_methods(data, folder, args, count <= args.multivector_max)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report["LanceDB process RSS growth bytes"] = rss_bytes() - rss
    if args.today:
        rows.append(today(Path(args.today), data, args.today_searches))
        print(json.dumps(rows[-1]), flush=True)
    if args.store:
        rows.append(new_store(Path(args.store), count, len(data.texts)))
        print(json.dumps(rows[-1]), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vectors", choices=["synthetic", "real"], default="synthetic")
    parser.add_argument("--images", default="10000", help="gallery sizes, comma-separated")
    parser.add_argument("--searches", type=int, default=30, help="synthetic text queries")
    parser.add_argument(
        "--methods", default="mean,vectors", help="of mean,mean-exact,vectors (multivector: by size)"
    )
    parser.add_argument("--vector-k", default="100,300,1000", help="K vectors for the all-vectors first pass")
    parser.add_argument("--candidates", default=",".join(map(str, CANDIDATES)), help="values of C")
    parser.add_argument(
        "--multivector-max", type=int, default=10_000, help="largest size for the multivector column"
    )
    parser.add_argument(
        "--today", help="also measure this checkout's gallery (Milvus Lite 3) on the same vectors"
    )
    parser.add_argument("--today-searches", type=int, default=10, help="searches for --today (slow at 100k)")
    parser.add_argument(
        "--store", help="also measure this checkout's gallery store (gallery.py --part scale), same vectors"
    )
    parser.add_argument("--today-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    if args.today_worker:
        print(json.dumps(today_worker(args.today_worker, args.searches)))
        return
    report = {"date": now(), "machine": machine(), "command": " ".join(sys.argv), "sizes": []}
    print(json.dumps({k: report[k] for k in ("date", "machine")}), flush=True)
    for count in map(int, args.images.split(",")):
        data = synthetic_set(count, args.searches) if args.vectors == "synthetic" else real_set(count)
        report["sizes"].append(measure(data, args))
        del data
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
