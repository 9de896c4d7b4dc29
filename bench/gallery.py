"""The persistent gallery's figures: search quality on the built-in model, recall against brute force, cost.

    python bench/gallery.py --part quality          # easy-VQA's 1,000 test images through a real blip2-serve
    python bench/gallery.py --part scale --images 1000,10000,100000   # synthetic vectors, in-process Gallery
    python bench/gallery.py --part by-image [--revision HEAD~1]   # search by image: precision@5, 400 images

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
a Gallery (Milvus Lite in a temporary folder) by the same code the server runs; 30 random unit "text"
vectors are searched (k=10): recall@10 against the brute-force max-over-query-vectors ranking of the same
vectors, latency p50/p99, insert speed, disk and resident memory per image.
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
from common import DEFAULT_MODEL, Server, checkout, machine, now, percentile, png_b64, rss_bytes  # noqa: E402

QUERIES, DIM = 32, 256


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


# -- recall and cost at scale, synthetic vectors ----------------------------------------------------
def synthetic(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, 32, 256) unit vectors; an image's 32 share a direction, as BLIP-2's query vectors do."""
    centre = rng.normal(size=(count, 1, DIM)).astype(np.float32)
    vectors = centre + 0.7 * rng.normal(size=(count, QUERIES, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def disk_bytes(folder: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(folder)], capture_output=True, text=True).stdout.split()[0])


def scale(count: int, index: str, searches: int) -> dict:
    from service.gallery import Gallery, NewImage
    from service.settings import Settings

    folder = Path(tempfile.mkdtemp(prefix=f"gallery-{count}-"))
    settings = Settings(gallery_dir=str(folder), gallery_index=index)
    model = {"fingerprint": "synthetic", "name": "synthetic", "dim": DIM, "queries": QUERIES}
    rng = np.random.default_rng(0)
    rss_before = rss_bytes()
    gallery = Gallery.open(settings, model)
    vectors = np.empty((count, QUERIES, DIM), np.float32)
    started = time.perf_counter()
    # The gallery's own rows, one insert per 256 images and a flush per 10,000, without the duplicate look-up
    # each add makes (at 100k images Milvus Lite takes seconds per look-up; adds are timed by --part quality).
    for start in range(0, count, 256):
        part = synthetic(rng, min(256, count - start))
        vectors[start : start + len(part)] = part
        images = [NewImage(f"{start + n}", f"{start + n:064x}", b"", {}, v) for n, v in enumerate(part)]
        gallery.client.insert(gallery.name, [row for i in images for row in gallery._rows(i, "", 0)])
        if (start + 256) % 10240 == 0 or start + 256 >= count:
            gallery.client.flush(gallery.name)
    insert_s = time.perf_counter() - started
    texts = rng.normal(size=(searches, DIM)).astype(np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    recalls, latencies = [], []
    gallery.search(texts[:1], 10)  # the first search loads what the engine keeps lazily
    for text in texts:
        started = time.perf_counter()
        found = gallery.search(text[None], 10)
        latencies.append(time.perf_counter() - started)
        exact = np.argsort(-(vectors @ text).max(axis=1), kind="stable")[:10]
        recalls.append(len({s.image_id for s, _ in found} & {str(i) for i in exact}) / 10)
    report = {
        "images": count,
        "index": index,
        "insert images/s": round(count / insert_s, 1),
        "recall@10": statistics.fmean(recalls),
        "search ms p50": round(1000 * percentile(latencies, 50), 1),
        "search ms p99": round(1000 * percentile(latencies, 99), 1),
        "disk bytes/image": round(disk_bytes(folder / "milvus.db") / count),
        "rss bytes/image": round((rss_bytes() - rss_before) / count),
    }
    gallery.close()
    shutil.rmtree(folder, ignore_errors=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["quality", "by-image", "scale", "all"], default="all")
    parser.add_argument("--by-image-count", type=int, default=400, help="gallery size for --part by-image")
    parser.add_argument("--revision", help="--part by-image: serve this git revision's service package")
    parser.add_argument("--images", default="1000,10000,100000", help="gallery sizes for --part scale")
    parser.add_argument("--index", default="FLAT", help="BLIP2_GALLERY_INDEX for --part scale")
    parser.add_argument("--searches", type=int, default=30, help="searches per size for --part scale")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    report = {"date": now(), "machine": machine()}
    print(json.dumps(report), flush=True)
    if args.part in ("quality", "all"):
        report["quality"] = quality(args)
        print(json.dumps(report["quality"]), flush=True)
    if args.part in ("by-image", "all"):
        report["by_image"] = by_image(args)
        print(json.dumps(report["by_image"]), flush=True)
    if args.part in ("scale", "all"):
        report["scale"] = []
        for count in map(int, args.images.split(",")):
            report["scale"].append(scale(count, args.index, args.searches))
            print(json.dumps(report["scale"][-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
