"""The gallery's and /retrieve's scores and input rules, with the built-in model and the real embedded engine
(Milvus Lite in a temporary folder): one `relevance` per result that orders every result, search by image by
mean query vectors (which tell the built-in model's images apart; its best pair of query vectors does not),
and one rule for image ids and metadata keys, stated in every error and in docs/API.md."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from servertools import REPO, b64, easy_vqa_facts, encode, running_app, settings_for

from service.engine.gallery import NAME_RULE
from service.settings import DEFAULT_MODEL_DIR

easy_vqa = pytest.importorskip("easy_vqa")
pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "stage1").is_dir(), reason="no packaged default model"
)
IMAGES = 30  # easy-VQA test images whose colour and shape their own questions state


@pytest.fixture(scope="module")
def shapes() -> list[tuple[bytes, tuple[str, str]]]:
    """(PNG bytes, (colour, shape)) of the first easy-VQA test images with known facts."""
    _, answers, image_ids = easy_vqa.get_test_questions()
    facts = easy_vqa_facts(answers, image_ids)
    paths = easy_vqa.get_test_image_paths()
    return [(Path(paths[i]).read_bytes(), facts[i]) for i in list(facts)[:IMAGES]]


@pytest.fixture(scope="module")
def client(tmp_path_factory, shapes):
    """The built-in retrieval model with a gallery of the `shapes` images (metadata: their colour and shape)."""
    folder = tmp_path_factory.mktemp("gallery")
    settings = settings_for(None, DEFAULT_MODEL_DIR / "stage1", gallery_dir=str(folder), itm_top_k=3)
    with running_app(settings) as client:
        for start in range(0, len(shapes), 16):
            items = [
                {"image": b64(data), "metadata": {"color": color, "shape": shape}}
                for data, (color, shape) in shapes[start : start + 16]
            ]
            response = client.post("/gallery/images", json={"images": items})
            assert [i["status"] for i in response.json()["images"]] == ["added"] * len(items)
        yield client


def ids_of(client, shapes) -> list[str]:
    """The gallery's ids of the `shapes` images, in order (adding them again answers `exists`)."""
    ids = []
    for start in range(0, len(shapes), 16):
        items = [{"image": b64(data)} for data, _ in shapes[start : start + 16]]
        ids += [i["id"] for i in client.post("/gallery/images", json={"images": items}).json()["images"]]
    return ids


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_search_by_image_ranks_by_mean_query_vectors(client, shapes):
    ids = ids_of(client, shapes)
    queries = np.concatenate(  # (images, queries, dim), each vector of unit length
        [
            client.post(
                "/embed",
                json={
                    "images": [b64(d) for d, _ in shapes[start : start + 16]],
                    "return_query_embeddings": True,
                },
            ).json()["image_query_embeddings"]
            for start in range(0, len(shapes), 16)
        ]
    )
    means = queries.mean(axis=1)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    right, asked = 0, 0
    for n, (data, facts) in enumerate(shapes):
        upload = [("image", ("q.png", io.BytesIO(data), "image/png"))]
        found = client.post("/gallery/search", files=upload, data={"top_k": "5"}).json()["results"]
        assert found[0]["id"] == ids[n] and found[0]["relevance"] == pytest.approx(1.0, abs=1e-4)
        relevance = [r["relevance"] for r in found]
        assert relevance == sorted(relevance, reverse=True)
        for result in found:  # relevance: the cosine of the mean vectors; itc_score: the best pair's cosine
            other = ids.index(result["id"])
            assert result["relevance"] == pytest.approx(float(means[n] @ means[other]), abs=1e-4)
            assert result["itc_score"] == pytest.approx(
                float((queries[n] @ queries[other].T).max()), abs=1e-4
            )
            assert result["score"] is None and result["itm_score"] is None
        alike = min(2, sum(f == facts for _, f in shapes) - 1)  # other images of its colour and shape
        right += sum(r["metadata"] == {"color": facts[0], "shape": facts[1]} for r in found[1 : 1 + alike])
        asked += alike
    # Ranked by the mean vectors, 25 of these 26 places hold an image of the same colour and shape; ranked by
    # the best pair of query vectors (cosines 0.97-1.00 for any two images), 13 of 26.
    assert asked == 26 and right >= 24, (right, asked)


def test_text_search_has_one_relevance_that_orders_every_result(client):
    found = client.post("/gallery/search", json={"text": "a red circle", "top_k": 8}).json()["results"]
    assert len(found) == 8 and found[0]["metadata"] == {"color": "red", "shape": "circle"}
    assert [r["relevance"] for r in found] == sorted((r["relevance"] for r in found), reverse=True)
    reranked, rest = found[:3], found[3:]  # itm_top_k 3
    assert all(r["score"] is not None for r in reranked) and all(r["score"] is None for r in rest)
    assert [r["score"] for r in reranked] == sorted((r["score"] for r in reranked), reverse=True)
    for result in reranked:  # above every ITC-only result, in LAVIS's order
        assert (
            result["relevance"] == pytest.approx(1 + sigmoid(result["score"]), abs=1e-6)
            and result["relevance"] > 1
        )
    for result in rest:
        assert result["relevance"] == result["itc_score"]
    assert min(r["itc_score"] for r in reranked) >= max(r["itc_score"] for r in rest)


def test_retrieve_has_the_same_relevance(client, shapes):
    images = [b64(data) for data, _ in shapes[:6]]
    results = client.post("/retrieve", json={"text": "a red circle", "images": images, "top_k": 2}).json()[
        "results"
    ]
    assert sorted(r["index"] for r in results) == list(range(6))
    assert [r["relevance"] for r in results] == sorted((r["relevance"] for r in results), reverse=True)
    for result in results:
        if result["score"] is None:
            assert result["relevance"] == result["itc_score"]
        else:
            assert result["relevance"] == pytest.approx(1 + sigmoid(result["score"]), abs=1e-6)
    assert sum(r["score"] is not None for r in results) == 2


def test_one_rule_for_ids_and_metadata_keys(client, shapes):
    """A key that can be stored can be filtered on; every id or key error states the rule, as API.md does."""
    data = shapes[0][0]
    stored = client.post(
        "/gallery/images",
        json={"images": [{"image": b64(data), "id": "first.shape:1", "metadata": {"file-name": "a.png"}}]},
    )
    assert stored.json()["images"][0]["status"] in ("added", "duplicate")
    holder = stored.json()["images"][0]["id"]
    filtered = client.post("/gallery/search", json={"text": "a shape", "filter": {"file-name": "a.png"}})
    assert filtered.status_code == 200, filtered.text
    assert (
        holder == "first.shape:1" or filtered.json()["results"] == []
    )  # a duplicate keeps its first metadata
    refused = [
        client.get("/gallery/images/has%20space"),
        client.delete("/gallery/images/-leading-dash"),
        client.post("/gallery/images", json={"images": [{"image": b64(data), "id": "has space"}]}),
        client.post("/gallery/images", json={"images": [{"image": b64(data), "metadata": {"a b": 1}}]}),
        client.post("/gallery/search", json={"text": "a", "filter": {"a b": 1}}),
        client.post(
            "/gallery/images",
            files=[("images", ("a.png", io.BytesIO(data), "image/png"))],
            data={"ids": "a/b"},
        ),
    ]
    for response in refused:
        assert response.status_code == 422, response.text
        assert NAME_RULE in response.json()["error"]["message"], response.text
    assert NAME_RULE in (REPO / "docs" / "API.md").read_text()


def test_a_multi_image_add_answers_per_image(client, shapes):
    good = [data for data, _ in shapes[-2:]]
    files = [
        ("images", ("first.png", io.BytesIO(good[0]), "image/png")),
        ("images", ("notes.txt", io.BytesIO(b"not an image"), "text/plain")),
        ("images", ("second.png", io.BytesIO(good[1]), "image/png")),
    ]
    response = client.post("/gallery/images", files=files, data={"ids": ["p-1", "p-2", "p-3"]})
    assert response.status_code == 200, response.text
    first, bad, second = response.json()["images"]
    assert (first["index"], first["file"], first["status"]) == (0, "first.png", "duplicate")  # in the gallery
    assert (second["index"], second["file"], second["status"]) == (2, "second.png", "duplicate")
    assert bad["index"] == 1 and bad["status"] == "rejected" and "id" not in bad  # not stored: no id
    assert bad["error"]["type"] == "invalid_image" and bad["error"]["message"].startswith(
        "images.1 (notes.txt): "
    )
    stored_id = ids_of(client, shapes[2:3])[0]
    colours = ((10, 200, 30), (200, 10, 30), (30, 10, 200), (90, 90, 10))
    solid = [encode(Image.new("RGB", (64, 64), colour)) for colour in colours]
    mixed = [
        {"image": b64(solid[0]), "id": "fresh-1"},
        {"image": b64(b"still not an image")},
        {"image": b64(solid[3]), "id": stored_id},  # an id that holds another image
        {
            "image": b64(solid[3]),
            "id": "fresh-3",
        },  # the same bytes: stored here, not a duplicate of the above
        {"image": b64(solid[1]), "id": "twice"},  # one id for two different images: both rejected
        {"image": b64(solid[2]), "id": "twice"},
    ]
    answers = client.post("/gallery/images", json={"images": mixed}).json()["images"]
    assert [(a["index"], a["status"], a.get("id")) for a in answers] == [
        (0, "added", "fresh-1"), (1, "rejected", None), (2, "rejected", None), (3, "added", "fresh-3"),
        (4, "rejected", None), (5, "rejected", None),
    ]  # fmt: skip
    errors = [a["error"] for a in answers if a["status"] == "rejected"]
    assert [e["type"] for e in errors] == ["invalid_image", "conflict", "invalid_request", "invalid_request"]
    assert errors[2]["message"] == "images.4: id 'twice' is given to two different images"
    assert all("error" not in a for a in answers if a["status"] == "added")
    assert client.get("/gallery/images/fresh-1").status_code == 200
    assert client.get("/gallery/images/twice").status_code == 404
    # Every image rejected: the request fails with the first one's error, naming the file (the page's one-file add).
    alone = client.post(
        "/gallery/images", files=[("images", ("notes.txt", io.BytesIO(b"no image"), "text/plain"))]
    )
    assert alone.status_code == 400 and alone.json()["error"]["message"].startswith("images.0 (notes.txt): ")
