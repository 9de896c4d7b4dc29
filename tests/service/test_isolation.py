"""One request never fails another: a person's text is text on every route, and a batch whose model call
fails is split until only the request at fault gets the error. Requests are queued behind a gate so that
they share batches deterministically (servertools.post_together)."""

from __future__ import annotations

import json

import pytest
from servertools import b64, metric, post_together, running_app, settings_for

# Special-token spellings of every tokenizer family the server loads: OPT/GPT-2 BPE, T5 SentencePiece,
# BERT WordPiece (the Q-Former), and the image placeholder transformers' processors add.
POISON = "<image> </s> <s> <pad> <unk> [SEP] [CLS] [PAD] [MASK] [DEC] <image>"
SHORT = {"max_new_tokens": 4, "min_new_tokens": 1}


def chat(text: str, image: str, stream: bool = False) -> dict:
    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]  # fmt: skip
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "stream": stream}


def route_requests(photos, with_retrieval: bool, poison: str) -> list[tuple[str, dict]]:
    """Per route, ordinary requests and one carrying `poison` (always the last of its route)."""
    images = [b64(p) for p in photos[:4]]
    requests = []
    for prompt in ("a photo of", "a picture of", f"a photo of {poison}"):
        requests.append(("/caption", {"image": images[0], "prompt": prompt} | SHORT))
    for question in ("what is this?", "what colour is it?", "is there a cat?", f"what is {poison}?"):
        requests.append(("/vqa", {"image": images[1], "question": question, "max_new_tokens": 4}))
    for prompt in ("describe the image", "the sky is", f"{poison} says"):
        requests.append(("/generate", {"image": images[2], "prompt": prompt} | SHORT))
    for stream in (False, True):
        for text in ("what is in the picture?", "where is it?", f"and {poison}?"):
            requests.append(("/v1/chat/completions", chat(text, images[3], stream)))
    if with_retrieval:
        for texts in (["a cat"], ["a red car", "a dog"], [f"a {poison} cat"]):
            requests.append(("/embed", {"texts": texts, "images": images[:1]}))
        for text in ("a cat", "a rocket", poison):
            requests.append(("/retrieve", {"text": text, "images": images[:3], "top_k": 2}))
    return requests


def answer(path: str, body: dict, response) -> object:
    """What a request asked for, without ids or timestamps."""
    if body.get("stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: {")]
        return "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events)
    data = response.json()
    if path == "/v1/chat/completions":
        return data["choices"][0]["message"]["content"]
    if path == "/embed":
        return [x for vector in data["text_embeddings"] + data["image_embeddings"] for x in vector]
    if path == "/retrieve":
        return [x for r in data["results"] for x in (r["index"], r["score"]) if x is not None]
    return {key: value for key, value in data.items() if key != "usage"}


def check_poison_among_ordinary(client, photos, with_retrieval: bool) -> None:
    requests = route_requests(photos, with_retrieval, POISON)
    poisoned = {n for n, (path, body) in enumerate(requests) if POISON in json.dumps(body)}
    alone = [client.post(path, json=body) for path, body in requests]
    together = post_together(client, requests, b64(photos[7]))
    for n, ((path, body), single, batched) in enumerate(zip(requests, alone, together, strict=True)):
        if n in poisoned:  # its text is fine once treated as text; a refusal would be a 4xx JSON error
            assert batched.status_code == 200 or (
                400 <= batched.status_code < 500 and "error" in batched.json()
            ), (path, batched.text)
            continue
        assert single.status_code == batched.status_code == 200, (path, batched.text)
        expected = answer(path, body, single)
        if path in ("/embed", "/retrieve"):  # batched and alone matmuls differ in the last bits
            expected = pytest.approx(expected, abs=1e-5)
        assert answer(path, body, batched) == expected, path


def test_poisoned_text_never_fails_a_batch_blip2(opt8, photos):
    """tiny-opt (OPT-layout tokenizer, 8-bit LLM) with a retrieval model: every route, all at once."""
    check_poison_among_ordinary(opt8, photos, with_retrieval=True)


def test_poisoned_text_never_fails_a_batch_instructblip(checkpoints, photos):
    """InstructBLIP: the prompt also reaches the Q-Former through its BERT tokenizer."""
    with running_app(settings_for(checkpoints["instructblip"], warmup=False)) as client:
        check_poison_among_ordinary(client, photos, with_retrieval=False)
        # A question longer than the Q-Former's positions is this request's fault alone: 422, the rest 200.
        limit = 128  # the tiny Q-Former's max_position_embeddings
        long_question = " ".join(["shape"] * (limit + 10))
        requests = [("/vqa", {"image": b64(p), "question": q, "max_new_tokens": 3})
                    for p, q in zip(photos[:4], ["what is it?", long_question, "is it red?", "where?"], strict=True)]  # fmt: skip
        responses = post_together(client, requests, b64(photos[7]))
        assert [r.status_code for r in responses] == [200, 422, 200, 200], [r.text for r in responses]
        assert responses[1].json()["error"]["type"] == "invalid_request"
        assert "Q-Former" in responses[1].json()["error"]["message"]


def test_a_request_that_breaks_the_model_fails_alone(opt8, photos):
    """A fault that only one request's input triggers inside the model (injected here, as the `<image>`
    IndexError used to be): the batch is split, the others get their own answers, it alone gets a 500,
    and /metrics counts the isolation."""
    batcher = opt8.app.state.server.batcher
    real = batcher._run_batch

    runner = opt8.app.state.server.runner

    def breaks_on_marked_prompt(jobs):
        # a /vqa job's prompt holds the person's question apart from the template: the text the model reads
        if any(
            "BREAKS-THE-MODEL" in runner.prompt_text(job.prompt) for job in jobs if hasattr(job, "prompt")
        ):
            raise IndexError("index out of range in self")
        return real(jobs)

    questions = ["what is this?", "is it blue?", "BREAKS-THE-MODEL", "how many?", "is it round?", "why?"]
    requests = [("/vqa", {"image": b64(photos[i]), "question": q, "max_new_tokens": 3}) for i, q in enumerate(questions)]  # fmt: skip
    alone = [opt8.post(path, json=body) for path, body in requests[:2] + requests[3:]]
    before = opt8.get("/metrics").text
    batcher._run_batch = breaks_on_marked_prompt
    try:
        together = post_together(opt8, requests, b64(photos[7]))
    finally:
        batcher._run_batch = real
    after = opt8.get("/metrics").text
    assert [r.status_code for r in together] == [200, 200, 500, 200, 200, 200]
    assert together[2].json()["error"]["type"] == "internal_error"
    innocent = together[:2] + together[3:]
    assert [r.json()["answer"] for r in innocent] == [r.json()["answer"] for r in alone]
    for name in ("blip2_batch_isolations_total", "blip2_isolated_failed_requests_total"):
        assert metric(after, name) - metric(before, name) == 1, name
    # six requests, one at fault: the batch, then 2 calls per halving down to it (6 -> 3 -> 2 -> 1)
    assert (
        metric(after, "blip2_batch_isolation_calls_total")
        - metric(before, "blip2_batch_isolation_calls_total")
        <= 6
    )


@pytest.mark.parametrize("route", ["/caption", "/generate"])
def test_prompt_tokens_count_special_spellings_as_text(opt8, photos, route):
    """usage.prompt_tokens counts what the model reads: `</s>` typed by a person is several pieces."""
    plain = opt8.post(route, json={"image": b64(photos[0]), "prompt": "a photo"} | SHORT).json()
    typed = opt8.post(route, json={"image": b64(photos[0]), "prompt": "a photo </s>"} | SHORT).json()
    assert typed["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 1


def test_poisoned_text_never_fails_a_gallery_search(checkpoints, photos, tmp_path):
    """`POST /gallery/search` texts share the /embed and /retrieve batches: one spelling special tokens among
    ordinary searches, all at once, changes no other search's ranking or scores, and is answered itself."""
    folder = checkpoints["tiny-opt"]
    settings = settings_for(folder / "generation", folder / "stage1", gallery_dir=str(tmp_path / "gallery"))
    with running_app(settings) as client:
        images = [{"image": b64(photo), "id": f"photo-{n}"} for n, photo in enumerate(photos[:5])]
        assert client.post("/gallery/images", json={"images": images}).status_code == 200
        texts = ["a cat", "a rocket", "a cup of coffee", "a person", f"a {POISON} cat"]
        requests = [("/gallery/search", {"text": text, "top_k": 5, "itm_top_k": 3}) for text in texts]
        alone = [client.post(path, json=body) for path, body in requests]
        together = post_together(client, requests, b64(photos[7]))
    assert [r.status_code for r in together] == [200] * len(texts), [r.text for r in together]
    for single, batched in zip(alone[:-1], together[:-1], strict=True):
        expected, got = single.json()["results"], batched.json()["results"]
        assert [hit["id"] for hit in got] == [hit["id"] for hit in expected]
        for key in ("itc_score", "score"):  # batched and alone matmuls differ in the last bits
            assert [hit[key] for hit in got] == pytest.approx([hit[key] for hit in expected], abs=1e-5)
