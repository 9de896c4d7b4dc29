"""The batching engine through the real app: batched answers equal one-by-one answers, batches form under
load and split by generation settings, a full queue answers 429 at once, a client that hangs up is
dropped before compute. A gate holds the model thread busy so that queues build up deterministically."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
from servertools import (
    PRIMER,
    Gate,
    LiveServer,
    b64,
    metric,
    post_together,
    running_app,
    settings_for,
    wait_for,
)

QUESTIONS = ["what is this?", "what colour is it?", "is there a cat?", "how many people are there?",
             "where is it?", "what is on the table in the picture?"]  # fmt: skip


def batch_stats(client, task: str = "generate") -> tuple[float, float]:
    text = client.get("/metrics").text
    return metric(text, "blip2_batch_size_count", task=task), metric(text, "blip2_batch_size_sum", task=task)


def send_together(client, requests: list[tuple[str, dict]], image: str) -> list:
    """`post_together`, every answer a 200."""
    responses = post_together(client, requests, image)
    for response in responses:
        assert response.status_code == 200, response.text
    return [r.json() for r in responses]


def vqa_requests(photos, **options) -> list[tuple[str, dict]]:
    return [("/vqa", {"image": b64(photos[i]), "question": q} | options) for i, q in enumerate(QUESTIONS)]


def test_batched_equals_alone_and_metrics_show_batches(opt8, photos):
    requests = vqa_requests(photos)  # six different images and questions, the paper's beam-5 settings
    alone = [opt8.post(path, json=body).json() for path, body in requests]
    count_before, sum_before = batch_stats(opt8)
    together = send_together(opt8, requests, b64(photos[7]))
    assert [r["answer"] for r in together] == [r["answer"] for r in alone]
    count_after, sum_after = batch_stats(opt8)
    assert (
        count_after - count_before == 2 and sum_after - sum_before == 7
    )  # the primer, then one batch of six
    text = opt8.get("/metrics").text
    assert metric(text, "blip2_batch_size_bucket", task="generate", le="1.0") < metric(
        text, "blip2_batch_size_count", task="generate"
    )  # /metrics shows batches above 1


def test_different_settings_never_share_a_batch(opt8, photos):
    greedy = vqa_requests(photos, num_beams=1)[:3]
    beams = [
        (p, b | {"num_beams": 3, "question": b["question"] + " really?"})
        for p, b in vqa_requests(photos)[3:6]
    ]
    captions = [("/caption", {"image": b64(photos[7]), "max_new_tokens": 5})]
    requests = greedy + beams + captions
    alone = [opt8.post(path, json=body).json() for path, body in requests]
    count_before, sum_before = batch_stats(opt8)
    together = send_together(opt8, requests, b64(photos[7]))
    assert together == alone
    count_after, sum_after = batch_stats(opt8)
    assert (count_after - count_before, sum_after - sum_before) == (4, 8)  # primer + 3 + 3 + 1


@pytest.mark.parametrize("name", ["tiny-t5", "instructblip"])
def test_batched_equals_alone_t5_and_instructblip(checkpoints, photos, name):
    folder = checkpoints[name] / "generation" if name == "tiny-t5" else checkpoints[name]
    with running_app(settings_for(folder, warmup=False)) as client:
        requests = vqa_requests(photos)[:5]
        alone = [client.post(path, json=body).json() for path, body in requests]
        together = send_together(client, requests, b64(photos[7]))
        assert together == alone
        caption = client.post("/caption", json={"image": b64(photos[0])})
        assert caption.status_code == 200, caption.text


def test_full_queue_answers_429_at_once_and_never_500(checkpoints, photos):
    settings = settings_for(
        checkpoints["tiny-opt"] / "generation", max_queue_size=3, max_batch_size=1, warmup=False
    )
    body = {"image": b64(photos[0]), "max_new_tokens": 3}
    with running_app(settings) as client, ThreadPoolExecutor(10) as pool:
        with Gate(client.app) as gate:
            primer = pool.submit(client.post, "/caption", json=body)
            gate.wait_taken()
            queued = [pool.submit(client.post, "/caption", json=body) for _ in range(3)]
            gate.wait_queued(3)
            refused = [pool.submit(client.post, "/caption", json=body) for _ in range(5)]
            # Refusals come back while the model thread is still held: nothing waited for capacity.
            for future in refused:
                response = future.result()
                assert response.status_code == 429, response.text
                assert response.json()["error"]["type"] == "overloaded"
                assert int(response.headers["Retry-After"]) >= 1
        assert [f.result().status_code for f in [primer, *queued]] == [200] * 4
        assert (
            metric(client.get("/metrics").text, "blip2_requests_total", route="/caption", status="500") == 0
        )


def test_client_that_hangs_up_is_dropped_before_compute(checkpoints, photos):
    import httpx

    settings = settings_for(checkpoints["tiny-opt"] / "generation", warmup=False)
    with LiveServer(settings) as live, ThreadPoolExecutor(1) as pool:
        app = live.app
        body = b'{"image": "' + b64(photos[0]).encode() + b'", "max_new_tokens": 3}'
        request = (
            b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        with Gate(app) as gate:
            primer = pool.submit(
                httpx.post, live.url + "/generate", json={"image": b64(photos[1]), "max_new_tokens": 2}
            )
            gate.wait_taken()
            with socket.create_connection(("127.0.0.1", app.state.server.settings.port)) as sock:
                sock.sendall(request)
                gate.wait_queued(1)
            wait_for(
                lambda: app.state.server.working == 1, "the server did not notice the hang-up"
            )  # the primer only
        assert primer.result().status_code == 200
        wait_for(lambda: app.state.server.batcher.depth == 0, "the dropped request stayed queued")
        text = httpx.get(live.url + "/metrics").text
        assert metric(text, "blip2_dropped_requests_total", reason="disconnected") == 1
        assert metric(text, "blip2_batch_size_count", task="generate") == 1  # only the primer was computed
        assert metric(text, "blip2_requests_total", route="/caption", status="499") == 1


def test_images_are_prepared_at_intake_while_the_model_thread_is_busy(opt8, photos):
    """Resizing and normalising happen on the request's way in, not on the model thread: a request queued
    behind a busy model already holds its pixels, the same tensors the processor makes for a whole batch."""
    import torch

    state = opt8.app.state.server
    requests = [
        ("/caption", {"image": b64(photos[2]), "max_new_tokens": 4}),
        ("/embed", {"images": [b64(photos[3]), b64(photos[4])]}),
        ("/retrieve", {"text": "a cat", "images": [b64(photos[5]), b64(photos[6])]}),
    ]
    with ThreadPoolExecutor(len(requests) + 1) as pool:
        with Gate(opt8.app) as gate:
            primer = pool.submit(opt8.post, "/caption", json={"image": b64(photos[0])} | PRIMER)
            gate.wait_taken()
            futures = [pool.submit(opt8.post, path, json=body) for path, body in requests]
            gate.wait_queued(len(requests))
            queued = {type(item.job).__name__: item.job for item in state.batcher._queue}
            expected = {
                "GenerateJob": [queued["GenerateJob"].image],
                "EmbedJob": queued["EmbedJob"].images,
                "RetrieveJob": queued["RetrieveJob"].candidate_images,
            }
            for name, images in expected.items():
                processor = (
                    state.runner.models.generation if name == "GenerateJob" else state.runner.models.retrieval
                ).processor
                batch = processor.image_processor(images, return_tensors="pt")["pixel_values"]
                assert queued[name].pixels is not None, name
                assert torch.equal(queued[name].pixels, batch), name
        assert primer.result().status_code == 200
        assert all(future.result().status_code == 200 for future in futures)


def test_loaded_models_are_left_out_of_the_cyclic_gc(checkpoints):
    """Once loaded, the models' objects are frozen out of the cyclic GC (a full collection walked them all,
    stalling every thread ~280 ms under load with the built-in model); a stopped app lets them go again."""
    import gc

    with running_app(settings_for(checkpoints["tiny-opt"] / "generation")):
        assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0
