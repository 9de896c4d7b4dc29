"""The persistent gallery's figures: search quality on the built-in model, recall against brute force, cost.

    python bench/gallery.py --part quality          # easy-VQA's 1,000 test images through a real blip2-serve
    python bench/gallery.py --part scale --images 1000,10000,100000   # synthetic vectors, in-process Gallery
    python bench/gallery.py --part scale --images 1000000 --folder F --keep; ... --part scale-measure --folder F/gallery-*
    python bench/gallery.py --part by-image [--revision HEAD~1]   # search by image: precision@5, 400 images
    python bench/gallery.py --part growth --growth 1000,16000       # HTTP, built-in model, real-vector recall

quality: a `blip2-serve` with the packaged retrieval model and a fresh gallery indexes the 1,000 easy-VQA test
images (POST /gallery/images; indexing speed one image per request, 16 clients one image each, and 16 images
per request, side by side on different images), then searches each of the 24 colour-shape captions ("a red
circle"): precision@10 and @5 of images whose true colour and shape match (from the image's own questions),
ITC alone (itm_top_k 0) vs ITC then ITM on the best 10 (and on the best 30, keeping the first 10), and the
search latency.

by-image: a `blip2-serve` (this tree's, or a worktree of --revision: before/after a change) with the packaged
retrieval model and a fresh gallery indexes the first 400 easy-VQA test images whose colour and shape their
own questions state, then searches by each of them
(multipart `image`, top_k 6): precision@5 of images with the same colour and shape among the 5 best other than
the query itself, and how far apart the ranking's scores lie (`relevance` where the server gives it, else
`itc_score`): the spread between the 1st and the 5th of those 5, median over the queries.

scale: N images of 32 synthetic unit query vectors (256-d, correlated within an image as BLIP-2's are) go into
the gallery's store (vectors given, 1,024 per add, its background maintenance running as in a server); then a
fresh process opens it (open time), searches 30 random unit "text" vectors (k=10: recall@10 against the exact
max-over-query-vectors ranking of the float32 vectors, latency p50/p99), adds 16 new images ten times
(look-ups, files, commit; no embedding) and reports its resident memory; disk per image. The store is the one
of the `service` package imported (PYTHONPATH = a checkout of the commit to measure). With --keep the gallery
and its exact scores stay, and `--part scale-measure --folder <that gallery>` measures it again (a quieter
machine, another commit) without building it again.

growth: a `blip2-serve` with the packaged retrieval model grows a fresh gallery of generated shape images from
the first size to the second through POST /gallery/images (16 per request); at each size, text searches
(itm_top_k 0) and 16-image adds are timed, and the gallery's ranking is compared with the exact max over each
image's query vectors from POST /embed (return_query_embeddings): recall@10, ties within 1e-4 equal.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DEFAULT_MODEL,
    DIM,
    QUERIES,
    Server,
    checkout,
    disk_bytes,
    machine,
    max_sim,
    now,
    percentile,
    png_b64,
    recall_at,
    rss_bytes,
    synthetic,
    synthetic_gallery,
    synthetic_texts,
)


# -- quality through the server ---------------------------------------------------------------------
def easy_vqa_test_images() -> list[tuple[bytes, str | None, str | None]]:
    """(PNG bytes, colour, shape) of each easy-VQA test image; facts from its own questions and answers."""
    import easy_vqa

    from training.importers import SHAPES, YES_NO, image_facts

    colors = {a for a in easy_vqa.get_answers() if a not in SHAPES and a not in YES_NO}
    texts, answers, image_ids = easy_vqa.get_test_questions()
    per_image: dict[int, list] = {}
    for question, answer, image_id in zip(texts, answers, image_ids, strict=True):
        per_image.setdefault(image_id, []).append((question, answer))
    paths = easy_vqa.get_test_image_paths()
    return [(Path(paths[i]).read_bytes(), *image_facts(per_image[i], colors)) for i in sorted(paths)]


def post_images(client: httpx.Client, batch: list[tuple[bytes, str | None, str | None]]) -> list[str]:
    """Add a batch (metadata: its colour and shape); the ids the gallery gave them, in order."""
    items = [{"image": png_b64(data), "metadata": {"color": c, "shape": s}} for data, c, s in batch]
    response = client.post("/gallery/images", json={"images": items})
    response.raise_for_status()
    assert all(i["status"] == "added" for i in response.json()["images"]), response.text
    return [i["id"] for i in response.json()["images"]]


def indexing_rate(url: str, images: list, per_request: int, clients: int) -> float:
    """Images per second for `images` sent `per_request` at a time by `clients` concurrent clients."""
    batches = [images[i : i + per_request] for i in range(0, len(images), per_request)]
    with httpx.Client(base_url=url, timeout=120) as client, ThreadPoolExecutor(clients) as pool:
        started = time.perf_counter()
        list(pool.map(lambda batch: post_images(client, batch), batches))
        return len(images) / (time.perf_counter() - started)


def quality(args) -> dict:
    images = easy_vqa_test_images()
    folder = Path(tempfile.mkdtemp(prefix="gallery-quality-"))
    env = {
        "BLIP2_RETRIEVAL_MODEL": str(DEFAULT_MODEL / "stage1"),
        "BLIP2_GALLERY_DIR": str(folder),
        "BLIP2_MAX_BATCH_SIZE": "32",
        "BLIP2_VISION_CACHE_SIZE": "0",
    }
    report: dict = {"model": "default_model (service/default_model/stage1)", "images": len(images)}
    with Server(env) as server:
        # Indexing, side by side on different images (each is new to the gallery).
        report["index_images_per_s"] = {
            "one per request, 1 client": indexing_rate(server.url, images[0:128], 1, 1),
            "one per request, 16 clients": indexing_rate(server.url, images[128:384], 1, 16),
            "16 per request, 1 client": indexing_rate(server.url, images[384:1000], 16, 1),
        }
        captions = sorted({(c, s) for _, c, s in images if c and s})
        variants = {"itc": (10, 0), "itc+itm": (10, 10), "itc+itm@30": (30, 30)}  # name: (top_k, itm_top_k)
        rows, latency = [], {name: [] for name in variants}
        with httpx.Client(base_url=server.url, timeout=120) as client:
            assert client.get("/gallery").json()["count"] == len(images)
            for color, shape in captions:
                row = {"caption": f"a {color} {shape}"}
                for name, (top_k, itm_top_k) in variants.items():
                    body = {"text": row["caption"], "top_k": top_k, "itm_top_k": itm_top_k}
                    started = time.perf_counter()
                    results = client.post("/gallery/search", json=body).json()["results"][:10]
                    latency[name].append(time.perf_counter() - started)
                    hits = [r["metadata"] == {"color": color, "shape": shape} for r in results]
                    row[f"{name} p@10"], row[f"{name} p@5"] = sum(hits) / 10, sum(hits[:5]) / 5
                rows.append(row)
    shutil.rmtree(folder, ignore_errors=True)
    for name in variants:
        for k in (10, 5):
            report[f"{name} precision@{k}"] = statistics.fmean(r[f"{name} p@{k}"] for r in rows)
        report[f"{name} search ms p50/p99"] = [
            round(1000 * percentile(latency[name], q), 1) for q in (50, 99)
        ]
    report["captions"] = rows
    return report


def by_image(args) -> dict:
    # Only images whose colour and shape are known: a result is then right or wrong for certain.
    images = [image for image in easy_vqa_test_images() if image[1] and image[2]][: args.by_image_count]
    folder = Path(tempfile.mkdtemp(prefix="gallery-by-image-"))
    env = {
        "BLIP2_RETRIEVAL_MODEL": str(DEFAULT_MODEL / "stage1"),
        "BLIP2_GALLERY_DIR": str(folder),
        "BLIP2_MAX_BATCH_SIZE": "32",
    }
    source = checkout(args.revision) if args.revision else None
    report: dict = {
        "model": "default_model (service/default_model/stage1)",
        "server": f"revision {args.revision}" if args.revision else "this tree",
        "images": len(images),
    }
    precisions, spreads = [], []
    with Server(env, source=source) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        ids = [
            i for start in range(0, len(images), 16) for i in post_images(client, images[start : start + 16])
        ]
        for image_id, (data, color, shape) in zip(ids, images, strict=True):
            upload = {"image": ("query.png", data, "image/png")}
            response = client.post("/gallery/search", files=upload, data={"top_k": "6"})
            response.raise_for_status()
            others = [r for r in response.json()["results"] if r["id"] != image_id][:5]
            precisions.append(sum(r["metadata"] == {"color": color, "shape": shape} for r in others) / 5)
            scores = [r.get("relevance", r["itc_score"]) for r in others]
            spreads.append(scores[0] - scores[-1])
    shutil.rmtree(folder, ignore_errors=True)
    report["queries"] = len(precisions)
    report["precision@5"] = round(statistics.fmean(precisions), 3)
    report["score spread 1st-5th, median"] = round(statistics.median(spreads), 4)
    return report


# -- growth and real-vector recall through the server ------------------------------------------------
def shape_images(count: int, seed: int = 0) -> list[tuple[bytes, str, str]]:
    """`count` distinct 64x64 PNGs of one coloured shape (a third) or two (a small second one pasted on the
    first's canvas), as (PNG bytes, colour, shape) of the main shape."""
    import io
    import random

    from recipes.shapes import COLOURS, SHAPES, draw_shape

    rng, seen, images = random.Random(seed), set(), []
    while len(images) < count:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        image = draw_shape(colour, shape, rng)
        if rng.random() < 2 / 3:
            second = draw_shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng, size=28)
            mask = second.convert("L").point(lambda v: 255 if v < 250 else 0)
            image.paste(second, (rng.randint(0, 36), rng.randint(0, 36)), mask)
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        if buffer.getvalue() not in seen:
            seen.add(buffer.getvalue())
            images.append((buffer.getvalue(), colour, shape))
    return images


def growth(args) -> dict:
    """A gallery grown from `small` to `big` images through the HTTP API with the built-in model: search and
    16-image add latency at both sizes, and recall@10 of the gallery's ITC ranking (itm_top_k 0) against the
    exact max over every image's query vectors from /embed (return_query_embeddings), ties within 1e-4."""
    from recipes.shapes import COLOURS, SHAPES

    small, big = map(int, args.growth.split(","))
    images = shape_images(big + 16 * args.adds * 2)
    phrases = [f"a {c} {s}" for c in COLOURS for s in SHAPES] + [f"a {c} shape" for c in COLOURS]
    phrases += [f"a {s}" for s in SHAPES]
    folder = Path(tempfile.mkdtemp(prefix="gallery-growth-", dir=args.folder))
    env = {
        "BLIP2_RETRIEVAL_MODEL": str(DEFAULT_MODEL / "stage1"),
        "BLIP2_GALLERY_DIR": str(folder),
        "BLIP2_MAX_BATCH_SIZE": "32",
        "BLIP2_VISION_CACHE_SIZE": "0",
    }
    report: dict = {
        "model": "default_model (service/default_model/stage1)",
        "phrases": len(phrases),
        "sizes": [],
    }
    with Server(env) as server, httpx.Client(base_url=server.url, timeout=300) as client:

        def embed(body: dict) -> dict:
            response = client.post("/embed", json=body)
            response.raise_for_status()
            return response.json()

        texts = np.array(embed({"texts": phrases})["text_embeddings"], np.float32)
        vectors: dict[str, np.ndarray] = {}  # gallery id -> the image's query vectors from /embed
        spare = images[big:]

        def fill(upto: int) -> None:
            for start in range(len(vectors), upto, 16):
                batch = images[start : min(start + 16, upto)]
                body = {"images": [png_b64(b) for b, _, _ in batch], "return_query_embeddings": True}
                queries = embed(body)["image_query_embeddings"]
                vectors.update(zip(post_images(client, batch), np.array(queries, np.float32), strict=True))

        for size in (small, big):
            fill(size)
            time.sleep(args.settle)  # the store's background index build and compaction, as after a bulk load
            searches, adds, recalls = [], [], []
            ids = list(vectors)
            stacked = np.stack([vectors[i] for i in ids])
            exact = max_sim(stacked, texts)
            position = {image_id: n for n, image_id in enumerate(ids)}
            for _ in range(args.rounds):
                for phrase, row in zip(phrases, exact, strict=True):
                    started = time.perf_counter()
                    response = client.post(
                        "/gallery/search", json={"text": phrase, "top_k": 10, "itm_top_k": 0}
                    )
                    searches.append(time.perf_counter() - started)
                    response.raise_for_status()
                    recalls.append(recall_at([position[r["id"]] for r in response.json()["results"]], row))
            for _ in range(args.adds):  # 16 new images per add (embedding included), removed again after
                batch, spare = spare[:16], spare[16:]
                started = time.perf_counter()
                added = post_images(client, batch)
                adds.append(time.perf_counter() - started)
                for image_id in added:
                    client.delete(f"/gallery/images/{image_id}").raise_for_status()
            report["sizes"].append(
                {
                    "images": size,
                    "text search ms p50 (itm_top_k 0)": round(1000 * percentile(searches, 50), 1),
                    "16-image add ms p50 (embedding included)": round(1000 * percentile(adds, 50), 1),
                    "recall@10 vs exact max over /embed query vectors": round(statistics.fmean(recalls), 4),
                    "gallery": client.get("/gallery").json(),
                }
            )
            print(json.dumps(report["sizes"][-1]), flush=True)
    first, last = report["sizes"]
    for key in ("text search ms p50 (itm_top_k 0)", "16-image add ms p50 (embedding included)"):
        report[f"{key}: {big} / {small}"] = round(last[key] / first[key], 2)
    shutil.rmtree(folder, ignore_errors=True)
    return report


# -- recall and cost at scale, synthetic vectors ----------------------------------------------------
MODEL = {"fingerprint": "synthetic", "name": "synthetic", "dim": DIM, "queries": QUERIES}


def scale(count: int, args) -> dict:
    """Build a gallery of `count` synthetic images through the store (vectors given), then measure it opened
    afresh in a child process; recall against the exact max-sim of the float32 vectors, computed here."""
    from service.engine.gallery import Gallery, Record
    from service.settings import Settings

    folder = Path(tempfile.mkdtemp(prefix=f"gallery-{count}-", dir=args.folder))
    texts = synthetic_texts(args.searches)
    exact = np.empty((args.searches, count), np.float32)
    gallery = Gallery.open(Settings(gallery_dir=str(folder)), MODEL)
    batch, insert_s = [], 0.0
    for start, part in synthetic_gallery(count):
        exact[:, start : start + len(part)] = max_sim(part, texts)
        batch += [Record(f"{start + n}", f"{start + n:064x}", "", 0.0, {}, v) for n, v in enumerate(part)]
        if len(batch) >= 1024 or start + len(part) == count:
            started = time.perf_counter()
            gallery.store.add(batch)  # one commit per 1,024 images, as bulk indexing makes them
            insert_s += time.perf_counter() - started
            batch = []
    # The index and the compaction run in the store's own thread; wait until they cover every row (a benchmark
    # calls the store's maintenance directly when the last add came while one was running).
    started = time.perf_counter()
    gallery.store.wait_for_maintenance()
    gallery.store._maybe_maintain()
    gallery.store.wait_for_maintenance()
    settle_s = time.perf_counter() - started
    described = gallery.describe()
    gallery.close()
    del gallery  # its in-memory search data (8.5 kB per image) before the child loads its own
    if args.keep:  # what `--part scale-measure` needs to measure this gallery again later
        np.save(folder / "exact.npy", exact)
    report = {
        "images": count,
        "store": described,
        "insert images/s (vectors given, 1,024 per add)": round(count / insert_s),
        "maintenance after the last add s": round(settle_s, 1),
        **measure_opened(folder, exact, args),
    }
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return report


def measure_opened(folder: Path, exact: np.ndarray, args) -> dict:
    """Open, search and add in a fresh process (`scale-open`); recall against `exact`; disk per image."""
    command = [sys.executable, __file__, "--part", "scale-open", "--folder", str(folder)]
    command += ["--searches", str(args.searches)]
    opened = json.loads(
        subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
    )
    recalls = [
        # an id that is not a number is an image a run of an older bench/gallery.py added and left: a miss
        recall_at([int(i) if i.isdigit() else -1 for i in found], row)
        for found, row in zip(opened.pop("found"), exact, strict=True)
    ]
    count, kept_scores = exact.shape[1], folder / "exact.npy"
    disk = disk_bytes(folder) - (kept_scores.stat().st_size if kept_scores.exists() else 0)
    return {
        **opened,
        "recall@10": round(statistics.fmean(recalls), 4),
        "disk bytes/image": round(disk / count),
    }


def scale_measure(args) -> dict:
    """A gallery kept by `--part scale --keep`, measured again (on a quieter machine, or by another commit)."""
    exact = np.load(args.folder / "exact.npy")[: args.searches]
    return {"images": exact.shape[1], "folder": str(args.folder), **measure_opened(args.folder, exact, args)}


def scale_open(args) -> dict:
    """In a fresh process: open the gallery, search, add 16 images ten times; time and memory."""
    from service.engine.gallery import Gallery, NewImage
    from service.settings import Settings

    rss_before = rss_bytes()
    started = time.perf_counter()
    gallery = Gallery.open(Settings(gallery_dir=str(args.folder)), MODEL)
    open_s = time.perf_counter() - started
    texts, latencies, found = synthetic_texts(args.searches), [], []
    gallery.search(texts[:1], 10)
    for text in texts:
        started = time.perf_counter()
        results = gallery.search(text[None], 10)
        latencies.append(time.perf_counter() - started)
        found.append([stored.image_id for stored, _ in results])
    rss_search = rss_bytes()
    rng, adds = np.random.default_rng(2), []
    run = time.time_ns()  # new ids and hashes on every run: a kept gallery is measured again
    for round_ in range(10):  # 16 new images per add: look-ups by id and content, files, one commit
        vectors = synthetic(rng, 16)
        images = [
            NewImage(
                f"new-{run}-{round_}-{n}", f"{run:016x}{round_:016x}{n:032x}", b"%d-%d" % (round_, n), {}, v
            )
            for n, v in enumerate(vectors)
        ]
        started = time.perf_counter()
        assert set(gallery.add(images).values()) == {"added"}
        adds.append(time.perf_counter() - started)
        for image in images:  # the gallery as it was, for the next measurement of it
            gallery.delete(image.image_id)
    gallery.close()
    return {
        "open s": round(open_s, 2),
        "search ms p50": round(1000 * percentile(latencies, 50), 1),
        "search ms p99": round(1000 * percentile(latencies, 99), 1),
        "16-image add ms p50 (storage: look-ups, files, commit)": round(1000 * percentile(adds, 50), 1),
        "16-image add ms max": round(1000 * max(adds), 1),
        "RSS after open and searches MB": round(rss_search / 2**20),
        "RSS growth by open and searches MB": round((rss_search - rss_before) / 2**20),
        "found": found,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--part",
        choices=["quality", "by-image", "scale", "scale-open", "scale-measure", "growth", "all"],
        default="all",
    )
    parser.add_argument("--growth", default="1000,16000", help="--part growth: the two gallery sizes")
    parser.add_argument("--rounds", type=int, default=2, help="--part growth: searches per phrase per size")
    parser.add_argument("--adds", type=int, default=10, help="--part growth: 16-image adds per size")
    parser.add_argument("--settle", type=float, default=30, help="--part growth: seconds before measuring")
    parser.add_argument("--by-image-count", type=int, default=400, help="gallery size for --part by-image")
    parser.add_argument("--revision", help="--part by-image: serve this git revision's service package")
    parser.add_argument("--images", default="1000,10000,100000", help="gallery sizes for --part scale")
    parser.add_argument(
        "--folder",
        type=Path,
        help="--part scale: make galleries under this folder; scale-measure: the gallery",
    )
    parser.add_argument("--keep", action="store_true", help="--part scale: keep the galleries")
    parser.add_argument("--searches", type=int, default=30, help="searches per size for --part scale")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    if args.part == "scale-open":
        print(json.dumps(scale_open(args)))
        return
    report = {"date": now(), "machine": machine()}
    if args.part == "scale-measure":
        report["scale"] = [scale_measure(args)]
        print(json.dumps(report["scale"][0]))
    else:
        print(json.dumps(report), flush=True)
    if args.part in ("quality", "all"):
        report["quality"] = quality(args)
        print(json.dumps(report["quality"]), flush=True)
    if args.part in ("by-image", "all"):
        report["by_image"] = by_image(args)
        print(json.dumps(report["by_image"]), flush=True)
    if args.part in ("growth", "all"):
        report["growth"] = growth(args)
        print(json.dumps(report["growth"]), flush=True)
    if args.part in ("scale", "all"):
        report["scale"] = []
        for count in map(int, args.images.split(",")):
            report["scale"].append(scale(count, args))
            print(json.dumps(report["scale"][-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
