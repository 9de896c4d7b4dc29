"""The persistent gallery against the real embedded engine (LanceDB in a temporary folder, no mocks) and a
Milvus-protocol server: its routes, its ranking (ITC over every query vector, then ITM as /retrieve scores it),
and what it keeps through crashes: kill -9 after acknowledged adds, a second server, another model, and a bulk
indexer killed half-way. The stores themselves (two-pass search, look-ups by key, conversion of old galleries,
kill -9 mid-write) are tested in test_gallery_store.py."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from servertools import (
    REPO,
    b64,
    encode,
    metric,
    milvus_server,
    running_app,
    settings_for,
    start_process,
)

from service.__main__ import main as serve_main
from service.engine.gallery import Gallery, NewImage, check_filter, content_key
from service.engine.gallery.lance_store import tags_filter
from service.engine.gallery.milvus_store import metadata_filter
from service.gallery_cli import Indexer

SERVE = Path(sys.executable).parent / "blip2-serve"
QUERIES = 8  # the tiny presets' query tokens


@pytest.fixture(scope="module")
def distinct(photos):
    """Seven photos with distinct bytes (scikit-image's `cat` is `chelsea`)."""
    return photos[:7]


@pytest.fixture(scope="module")
def gallery_app(checkpoints, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gallery")
    settings = settings_for(None, checkpoints["tiny-opt"] / "stage1", gallery_dir=str(folder), itm_top_k=3)
    with running_app(settings) as client:
        yield client, folder


def add(client, images, **item) -> list[dict]:
    response = client.post("/gallery/images", json={"images": [{"image": b64(i)} | item for i in images]})
    assert response.status_code == 200, response.text
    return response.json()["images"]


def test_add_get_delete(gallery_app, distinct):
    client, folder = gallery_app
    before = client.get("/gallery").json()["count"]
    added = add(client, distinct[:2], metadata={"shop": "north"})
    assert [a["status"] for a in added] == ["added", "added"]
    item = client.get(f"/gallery/images/{added[0]['id']}").json()
    assert (
        item["metadata"] == {"shop": "north"}
        and item["model"] == "tiny-opt"
        and item["added_at"].endswith("+00:00")
    )
    upload = [("images", ("a.png", io.BytesIO(encode(distinct[2])), "image/png"))]
    response = client.post(
        "/gallery/images", files=upload, data={"ids": "third", "metadata": '{"shop": "south"}'}
    )
    assert response.json()["images"] == [{"index": 0, "file": "a.png", "id": "third", "status": "added"}]
    info = client.get("/gallery").json()
    assert (
        info["count"] == before + 3
        and info["query_vectors"] == QUERIES
        and info["storage"]["engine"] == "lancedb"
    )
    assert client.delete("/gallery/images/third").json() == {"id": "third", "deleted": True}
    assert client.get("/gallery/images/third").status_code == 404
    assert client.delete("/gallery/images/third").json()["error"]["type"] == "not_found"
    assert client.get("/gallery").json()["count"] == before + 2


def test_idempotent_on_id_and_identical_bytes_stored_once(gallery_app, distinct):
    client, folder = gallery_app
    first = add(client, [distinct[3]], id="coffee-1")
    assert first == [{"index": 0, "id": "coffee-1", "status": "added"}]
    assert add(client, [distinct[3]], id="coffee-1") == [{"index": 0, "id": "coffee-1", "status": "exists"}]
    assert add(client, [distinct[3]], id="coffee-2") == [
        {"index": 0, "id": "coffee-1", "status": "duplicate"}
    ]
    assert add(client, [distinct[3]]) == [{"index": 0, "id": "coffee-1", "status": "duplicate"}]
    assert client.get("/gallery/images/coffee-2").status_code == 404
    files = [p for p in (folder / "images").rglob("*") if p.is_file()]
    assert len(files) == len({p.name for p in files})  # one file per content
    conflict = client.post(
        "/gallery/images", json={"images": [{"image": b64(distinct[4]), "id": "coffee-1"}]}
    )
    assert conflict.status_code == 409 and conflict.json()["error"]["type"] == "conflict"
    one_id_two_images = [
        {"image": b64(distinct[5]), "id": "twice"},
        {"image": b64(distinct[6]), "id": "twice"},
    ]
    reused = client.post("/gallery/images", json={"images": one_id_two_images})
    assert reused.status_code == 422 and "two different images" in reused.json()["error"]["message"]
    assert client.get("/gallery/images/twice").status_code == 404  # nothing of that add was stored


def test_text_search_is_itc_over_every_query_vector_then_itm(gallery_app, distinct):
    client, _ = gallery_app
    add(client, distinct)
    text = "a cat [SEP] on a sofa"  # special-token spellings stay words, as on every route
    found = client.post("/gallery/search", json={"text": text, "top_k": 5}).json()["results"]
    # Brute force over the same images: each image's ITC is the max over its query vectors.
    embedded = client.post(
        "/embed",
        json={"images": [b64(p) for p in distinct], "texts": [text], "return_query_embeddings": True},
    ).json()
    queries, vector = np.array(embedded["image_query_embeddings"]), np.array(embedded["text_embeddings"][0])
    itc = (queries @ vector).max(axis=1)
    ids = [a["id"] for a in add(client, distinct)]
    order = [ids[i] for i in np.argsort(-itc)[:5]]
    assert {r["id"] for r in found} == set(order)
    assert [r["id"] for r in found[3:]] == [i for i in order if i not in {r["id"] for r in found[:3]}]
    for result in found:  # the gallery keeps query vectors in float16: ITC to within ~1e-4
        assert result["itc_score"] == pytest.approx(itc[ids.index(result["id"])], abs=2e-4)
    # The best 3 by ITC are re-ranked by ITM + ITC, as /retrieve scores the same images.
    reranked = found[:3]
    assert {r["id"] for r in reranked} == set(order[:3]) and all(r["itm_score"] is not None for r in reranked)
    assert [r["score"] for r in reranked] == sorted((r["score"] for r in reranked), reverse=True)
    candidates = [distinct[ids.index(r["id"])] for r in reranked]
    retrieved = client.post(
        "/retrieve", json={"text": text, "images": [b64(c) for c in candidates], "top_k": 3}
    )
    by_index = {r["index"]: r for r in retrieved.json()["results"]}
    for n, result in enumerate(reranked):
        assert result["score"] == pytest.approx(by_index[n]["score"], abs=1e-4)
        assert result["itm_score"] == pytest.approx(by_index[n]["itm_score"], abs=1e-5)
    assert all(r["itm_score"] is None for r in found[3:])
    alone = client.post("/gallery/search", json={"text": text, "top_k": 5, "itm_top_k": 0}).json()["results"]
    assert [r["id"] for r in alone] == order


def test_image_search_and_metadata_filter(gallery_app, distinct):
    client, _ = gallery_app
    ids = [a["id"] for a in add(client, distinct)]
    upload = [("image", ("q.png", io.BytesIO(encode(distinct[5])), "image/png"))]
    found = client.post("/gallery/search", files=upload, data={"top_k": "3"}).json()["results"]
    assert found[0]["id"] == ids[5] and found[0]["itc_score"] == pytest.approx(1.0, abs=1e-4)
    tagged = add(client, [distinct[6].rotate(90)], metadata={"shop": "west", "year": 2024})[0]["id"]
    for wanted in ({"shop": "west"}, {"shop": ["east", "west"], "year": 2024}):
        response = client.post("/gallery/search", json={"text": "a photo", "filter": wanted})
        assert [r["id"] for r in response.json()["results"]] == [tagged]
    none = client.post("/gallery/search", json={"text": "a photo", "filter": {"shop": "west", "year": 2023}})
    assert none.json()["results"] == []


def test_filters_never_splice_text():
    assert metadata_filter({"q": ['a" or true or "']}) == '(meta["q"] == "a\\" or true or \\"")'
    assert metadata_filter({"n": [1, True]}) == '(meta["n"] == 1 or meta["n"] == true)'
    assert tags_filter({"q": ["a') OR true OR ('"]}) == "array_has_any(tags, ['q=\"a'') OR true OR (''\"'])"
    assert tags_filter({"n": [1, 1.0, True]}) == "array_has_any(tags, ['n=1', 'n=1', 'n=true'])"
    for bad in ({'x"]': 1}, {"k": [[1]]}, {"k": []}):
        with pytest.raises(ValueError):
            check_filter(bad)


def test_bad_requests(gallery_app, distinct, opt8):
    client, _ = gallery_app
    for body in (
        {"text": "a", "image": b64(distinct[0])},
        {},
        {"text": "a", "filter": {"a b": 1}},
        {"text": "a", "top_k": 1001},
    ):
        response = client.post("/gallery/search", json=body)
        assert response.status_code == 422, body
    assert client.get("/gallery/images/has%20space").status_code == 422
    bad = client.post("/gallery/images", json={"images": [{"image": b64(b"not an image")}]})
    assert bad.status_code == 400
    assert opt8.get("/gallery").json()["error"]["type"] == "gallery_not_configured"


SMALL_MODEL = {"fingerprint": "f", "name": "m", "dim": 4, "queries": QUERIES}


def small_gallery(folder: Path) -> tuple[Gallery, list[NewImage]]:
    """An embedded gallery of 4-wide vectors in `folder`, and three images for it."""
    rng = np.random.default_rng(0)
    images = [
        NewImage(f"image-{n}", f"{n:064x}", b"x", {}, rng.normal(size=(QUERIES, 4)).astype(np.float32))
        for n in range(3)
    ]
    return Gallery.open(settings_for(None, None, gallery_dir=str(folder)), SMALL_MODEL), images


def test_one_plan_for_every_kind_of_add(tmp_path):
    """`Gallery.plan`, which the add route and `blip2-serve gallery add` both act on: each image's status
    against what is stored and what came earlier in the same add."""
    gallery, _ = small_gallery(tmp_path / "g")
    vectors = np.ones((QUERIES, 4), dtype=np.float32)
    stored = {"kept": b"kept bytes", "other": b"other bytes"}
    for image_id, data in stored.items():
        gallery.add([NewImage(image_id, content_key(data, image_id)[0], data, {}, vectors)])
    plans = gallery.plan(
        [
            (b"fresh", "a"),  # new
            (b"fresh", "a"),  # the same image again
            (b"fresh", "b"),  # the same bytes under another id: a duplicate of a
            (b"changed", "a"),  # a's id for other bytes
            (b"kept bytes", "kept"),  # stored as it is
            (b"kept bytes", "copy"),  # stored bytes under a new id: a duplicate of kept
            (b"new bytes", "other"),  # a stored id for other bytes
            (b"no id", None),  # named by its content
        ]
    )
    gallery.close()
    assert [(p.status, p.holder) for p in plans] == [
        ("new", "a"),
        ("repeat", "a"),
        ("duplicate", "a"),
        ("reused_id", "a"),
        ("exists", "kept"),
        ("duplicate", "kept"),
        ("conflict", "other"),
        ("new", content_key(b"no id", None)[1]),
    ]


def test_another_model_is_refused_until_reindexed(checkpoints, tmp_path, distinct):
    folder = str(tmp_path / "g")
    with running_app(settings_for(None, checkpoints["tiny-opt"] / "stage1", gallery_dir=folder)) as client:
        ids = [a["id"] for a in add(client, distinct[:2], metadata={"k": "v"})]
    packaged = REPO / "service" / "default_model" / "stage1"  # trained weights: another fingerprint
    other = settings_for(None, packaged, gallery_dir=folder)
    with pytest.raises(RuntimeError, match="indexed by the retrieval model 'tiny-opt'.*reindex"):
        with running_app(other):
            pass
    argv = [
        "gallery",
        "reindex",
        "--gallery-dir",
        folder,
        "--retrieval-model",
        str(packaged),
    ]
    assert serve_main([*argv, "--no-progress", "--batch-size", "1"]) == 0
    with running_app(other) as client:
        assert (
            client.get("/gallery").json()["model"] == "default_model"
            and client.get("/gallery").json()["count"] == 2
        )
        assert client.get(f"/gallery/images/{ids[1]}").json()["metadata"] == {"k": "v"}
        assert (
            client.post("/gallery/search", json={"text": "a"}).json()["results"][0]["itm_score"] is not None
        )


def test_kill_9_keeps_acknowledged_adds_and_a_second_server_is_refused(checkpoints, tmp_path, distinct):
    args = [
        "--retrieval-model",
        str(checkpoints["tiny-opt"] / "stage1"),
        "--gallery-dir",
        str(tmp_path / "g"),
    ]
    process, url = start_process(args)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            acknowledged = []
            for pair in (distinct[0:2], distinct[2:4], distinct[4:6]):
                response = client.post("/gallery/images", json={"images": [{"image": b64(p)} for p in pair]})
                assert response.status_code == 200
                acknowledged += [a["id"] for a in response.json()["images"]]
            with pytest.raises(
                RuntimeError, match=r"open in pid \d+: an embedded gallery serves one process"
            ):
                start_process(args)
    finally:
        process.send_signal(signal.SIGKILL)  # right after the last answer: no shutdown, no flush
        process.wait()
    process, url = start_process(args)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/gallery").json()["count"] == 6
            assert all(client.get(f"/gallery/images/{i}").status_code == 200 for i in acknowledged)
            assert len(client.post("/gallery/search", json={"text": "a", "top_k": 6}).json()["results"]) == 6
    finally:
        process.kill()
        process.wait()


def test_bulk_indexing_resumes_after_kill_9_without_duplicates(checkpoints, tmp_path, photos):
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    for n, photo in enumerate(photos):  # 8 files, 7 distinct contents
        photo.save(images / ("nested" if n % 2 else "") / f"{n}.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    command = [
        str(SERVE),
        "gallery",
        "add",
        str(images),
        "--gallery-dir",
        str(tmp_path / "g"),
        "--batch-size",
        "1",
    ]
    command += ["--retrieval-model", str(checkpoints["tiny-opt"] / "stage1"), "--no-progress"]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = first.stdout.readline()
    first.kill()  # after its first committed batch
    first.wait()
    assert json.loads(line)["batch"] == 1
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])["summary"]
    assert summary["count"] == 7 and summary["unreadable"] == 1 and summary["exists"] >= 1, summary
    assert summary.get("added", 0) + summary["exists"] + summary.get("duplicate", 0) == 8
    settings = settings_for(None, None, gallery_dir=str(tmp_path / "g"))
    gallery = Gallery.open(settings, {"fingerprint": "", "name": "", "dim": 256, "queries": QUERIES}, True)
    counts = gallery.vector_counts()
    gallery.close()
    assert len(counts) == 7 and set(counts.values()) == {QUERIES}


def test_the_bulk_indexer_keeps_the_add_rules(tmp_path, distinct):
    """`blip2-serve gallery add` skips (and counts) a manifest row whose id or metadata key the API refuses."""
    distinct[0].save(tmp_path / "a.png")
    indexer = Indexer(None, None, settings_for(None, None))  # reading a row needs neither gallery nor model
    assert indexer.read({"path": tmp_path / "a.png", "id": "ok.1", "metadata": {"file-name": "a.png"}})
    for image_id, metadata in (("has space", {}), (None, {"a b": 1}), (None, {"k": "x" * 5000})):
        assert indexer.read({"path": tmp_path / "a.png", "id": image_id, "metadata": metadata}) is None
    assert indexer.counts["unreadable"] == 3


def test_replicas_share_a_milvus_server_by_uri(checkpoints, tmp_path, distinct):
    """BLIP2_GALLERY_URI: the same calls against a Milvus server (here Milvus Lite's own gRPC server in another
    process, which speaks Milvus's protocol); two servers share it and the image folder, with no folder lock."""
    with milvus_server(tmp_path / "milvus") as uri:
        settings = settings_for(
            None, checkpoints["tiny-opt"] / "stage1", gallery_dir=str(tmp_path / "shared"), gallery_uri=uri
        )
        with running_app(settings) as first, running_app(settings) as second:
            ids = [a["id"] for a in add(first, distinct[:3])]
            assert second.get("/gallery").json()["storage"]["engine"] == "milvus"
            assert second.get(f"/gallery/images/{ids[2]}").status_code == 200
            found = second.post("/gallery/search", json={"text": "a photo", "top_k": 3}).json()["results"]
            assert {r["id"] for r in found} == set(ids) and found[0]["itm_score"] is not None
            assert add(second, [distinct[0]]) == [{"index": 0, "id": ids[0], "status": "exists"}]


def test_gallery_routes_take_the_api_key_and_count_in_the_metrics(checkpoints, tmp_path):
    key = "gallery-test-key"
    settings = settings_for(None, checkpoints["tiny-opt"] / "stage1", gallery_dir=str(tmp_path), api_key=key)
    routes = [("GET", "/gallery", "/gallery"), ("POST", "/gallery/images", "/gallery/images"),
              ("POST", "/gallery/search", "/gallery/search"), ("GET", "/gallery/images/a", "/gallery/images/{image_id}"),
              ("GET", "/gallery/images/a/file", "/gallery/images/{image_id}/file"),
              ("DELETE", "/gallery/images/a", "/gallery/images/{image_id}")]  # fmt: skip
    with running_app(settings) as client:
        for method, path, _ in routes:
            refused = client.request(method, path, json={"text": "a"})
            assert refused.status_code == 401 and refused.json()["error"]["type"] == "unauthorized", path
        bearer = {"Authorization": f"Bearer {key}"}
        assert client.get("/gallery", headers=bearer).status_code == 200
        missing = client.get("/gallery/images/a", headers=bearer)
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
        text = client.get("/metrics").text
    assert metric(text, "blip2_requests_total", route="/gallery", status="200") == 1
    assert metric(text, "blip2_requests_total", route="/gallery/images/{image_id}", status="404") == 1
    for _, path, template in routes:  # refused before routing: a path with an id counts as "other"
        label = template if path == template else "other"
        assert metric(text, "blip2_requests_total", route=label, status="401") >= 1, template
    assert metric(text, "blip2_requests_total", route="other", status="401") == 3
