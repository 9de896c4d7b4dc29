"""Every route of the real app (lifespan included) on tiny checkpoints, the LLM in 8-bit on the CPU."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch
from servertools import b64, encode, metric, running_app, settings_for
from transformers import (
    AutoConfig,
    AutoProcessor,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    InstructBlipForConditionalGeneration,
)

TOLERANCE = 1e-3 if torch.cuda.is_available() else 1e-5


def test_health_ready_docs_models(opt8):
    assert opt8.get("/health").json() == {"status": "ok"}
    assert opt8.get("/ready").json() == {"status": "ready"}
    assert opt8.get("/docs").status_code == 200
    paths = opt8.get("/openapi.json").json()["paths"]
    for path in (
        "/caption",
        "/vqa",
        "/generate",
        "/embed",
        "/retrieve",
        "/v1/chat/completions",
        "/v1/models",
    ):
        assert path in paths
    assert "multipart/form-data" in paths["/caption"]["post"]["requestBody"]["content"]
    models = opt8.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-opt"


def test_caption_json_and_multipart_agree(opt8, photos):
    by_json = opt8.post("/caption", json={"image": b64(photos[0])})
    assert by_json.status_code == 200, by_json.text
    body = by_json.json()
    assert body["model"] == "tiny-opt" and isinstance(body["caption"], str)
    assert body["usage"]["completion_tokens"] >= 1
    by_upload = opt8.post("/caption", files={"image": ("a.png", encode(photos[0]), "image/png")})
    assert by_upload.json()["caption"] == body["caption"]
    by_data_uri = opt8.post("/caption", json={"image": b64(photos[0], data_uri=True)})
    assert by_data_uri.json()["caption"] == body["caption"]


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-t5", "instructblip"])
def test_answers_equal_plain_transformers(checkpoints, photos, name):
    """The server's answer is exactly what transformers' own generate gives for the same folder."""
    folder = checkpoints[name] if name == "instructblip" else checkpoints[name] / "generation"
    with running_app(settings_for(folder, warmup=False)) as client:
        served = client.post(
            "/generate", json={"image": b64(photos[1]), "prompt": "a photo of", "max_new_tokens": 6}
        )
    config = AutoConfig.from_pretrained(folder)
    model_class = (
        InstructBlipForConditionalGeneration if name == "instructblip" else Blip2ForConditionalGeneration
    )
    model = model_class.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(images=photos[1], text="a photo of", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=6)[0]
    if not config.text_config.is_encoder_decoder:
        out = out[inputs["input_ids"].shape[1] :]
    expected = processor.tokenizer.decode(out, skip_special_tokens=True).strip()
    assert served.status_code == 200
    assert served.json()["text"] == expected


def test_one_vit_pass_feeds_generation_and_retrieval(checkpoints, photos):
    """Shared tower: an image captioned, embedded and used in retrieval goes through the ViT once."""
    folder = checkpoints["tiny-opt"]
    with running_app(settings_for(folder / "generation", folder / "stage1", warmup=False)) as client:
        assert client.app.state.server.runner.models.shared_vision
        image = b64(photos[2])
        assert client.post("/caption", json={"image": image, "max_new_tokens": 2}).status_code == 200
        assert client.post("/embed", json={"images": [image, image]}).status_code == 200
        assert client.post("/retrieve", json={"image": image, "texts": ["a cup", "a cat"]}).status_code == 200
        text = client.get("/metrics").text
        assert metric(text, "blip2_vision_images_total", source="computed") == 1
        assert metric(text, "blip2_vision_images_total", source="reused") == 3


def test_identical_images_in_a_batch_share_a_vit_pass(opt8, photos):
    before = opt8.get("/metrics").text
    response = opt8.post("/embed", json={"images": [b64(photos[3])] * 3 + [b64(photos[4])]})
    assert response.status_code == 200
    vectors = response.json()["image_embeddings"]
    assert vectors[0] == vectors[1] == vectors[2] != vectors[3]
    after = opt8.get("/metrics").text
    computed = metric(after, "blip2_vision_images_total", source="computed")
    assert computed - metric(before, "blip2_vision_images_total", source="computed") == 2


def test_vqa_and_generate_options(opt8, photos):
    vqa = opt8.post("/vqa", json={"image": b64(photos[1]), "question": "what animal is this?"})
    assert vqa.status_code == 200, vqa.text
    assert vqa.json()["usage"]["completion_tokens"] <= 10  # the paper's default: at most 10 new tokens
    custom = opt8.post(
        "/vqa",
        json={"image": b64(photos[1]), "question": "what?", "prompt_template": "Q: {} A:", "num_beams": 1},
    )
    assert custom.status_code == 200
    generated = opt8.post(
        "/generate",
        json={"image": b64(photos[2]), "prompt": "a photo of", "max_new_tokens": 4, "min_new_tokens": 4},
    )
    assert generated.status_code == 200, generated.text
    assert generated.json()["usage"]["completion_tokens"] == 4
    assert generated.json()["finish_reason"] == "length"
    sampled = opt8.post(
        "/generate",
        data={
            "prompt": "a",
            "do_sample": "true",
            "temperature": "0.7",
            "top_p": "0.9",
            "max_new_tokens": "3",
        },
        files={"image": ("x.jpg", encode(photos[3], "JPEG"), "image/jpeg")},
    )
    assert sampled.status_code == 200, sampled.text


def test_a_folders_generation_config_sets_the_route_defaults(checkpoints, photos, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(checkpoints["tiny-opt"] / "generation", folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(
        json.dumps(config | {"min_new_tokens": 3, "max_new_tokens": 3})
    )
    with running_app(settings_for(folder)) as client:
        image = b64(photos[0])
        # /caption's paper default is 8-30 tokens; this folder says 3, and a request still overrides it
        assert client.post("/caption", json={"image": image}).json()["usage"]["completion_tokens"] == 3
        body = {"image": image, "min_new_tokens": 5, "max_new_tokens": 5}
        assert client.post("/caption", json=body).json()["usage"]["completion_tokens"] == 5
        vqa = client.post("/vqa", json={"image": image, "question": "what?", "num_beams": 1})
        assert vqa.json()["usage"]["completion_tokens"] == 3


def test_embed_normalised(opt8, photos):
    response = opt8.post(
        "/embed", json={"images": [b64(photos[0]), b64(photos[1])], "texts": ["a cat", "a rocket", "coffee"]}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dim"] == 256
    assert len(body["image_embeddings"]) == 2 and len(body["text_embeddings"]) == 3
    for vector in body["image_embeddings"] + body["text_embeddings"]:
        assert len(vector) == 256 and math.isclose(sum(v * v for v in vector), 1.0, rel_tol=1e-4)
    queries = opt8.post("/embed", json={"images": [b64(photos[0])], "return_query_embeddings": True}).json()
    assert len(queries["image_query_embeddings"][0]) == 8  # the tiny model's 8 query tokens
    # Alone vs in a batch of two: equal on the CPU, within rounding on a GPU (kernels vary with batch size).
    assert queries["image_embeddings"][0] == pytest.approx(body["image_embeddings"][0], abs=TOLERANCE)
    upload = opt8.post(
        "/embed",
        files=[("images", ("a.png", encode(photos[0]), "image/png"))],
        data={"texts": ["a cat", "a rocket"]},
    )
    assert upload.status_code == 200, upload.text
    assert len(upload.json()["text_embeddings"]) == 2
    assert upload.json()["text_embeddings"][0] == pytest.approx(body["text_embeddings"][0], abs=TOLERANCE)


def test_retrieve_text_query_and_image_query(opt8, photos):
    by_text = opt8.post(
        "/retrieve", json={"text": "a cat", "images": [b64(p) for p in photos[:5]], "top_k": 3}
    )
    assert by_text.status_code == 200, by_text.text
    results = by_text.json()["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3, 4]
    reranked = [r for r in results if r["itm_score"] is not None]
    assert len(reranked) == 3 and results[:3] == reranked  # ITM-scored ones first
    assert all(0 <= r["itm_score"] <= 1 and -1 <= r["itc_score"] <= 1 for r in reranked)
    assert [r["score"] for r in reranked] == sorted((r["score"] for r in reranked), reverse=True)
    rest = results[3:]
    assert [r["itc_score"] for r in rest] == sorted((r["itc_score"] for r in rest), reverse=True)
    # ITC for a pair is the same whichever side is the query.
    by_image = opt8.post("/retrieve", json={"image": b64(photos[1]), "texts": ["a dog", "a cat", "a cup"]})
    assert by_image.status_code == 200
    itc = {r["index"]: r["itc_score"] for r in by_image.json()["results"]}
    same_pair = next(r for r in results if r["index"] == 1)["itc_score"]
    assert math.isclose(itc[1], same_pair, rel_tol=1e-4, abs_tol=1e-5)
    upload = opt8.post(
        "/retrieve",
        files={"image": ("q.png", encode(photos[1]), "image/png")},
        data={"texts": ["a dog", "a cat"]},
    )
    assert upload.status_code == 200, upload.text


def test_retrieval_scores_equal_plain_transformers(opt8, checkpoints, photos):
    """ITC and ITM from /retrieve are what Blip2ForImageTextRetrieval itself computes for each pair."""
    stage1 = checkpoints["tiny-opt"] / "stage1"
    texts = ["a cat", "a cup of coffee", "an astronaut"]
    served = opt8.post("/retrieve", json={"image": b64(photos[1]), "texts": texts, "top_k": 3}).json()[
        "results"
    ]
    model = Blip2ForImageTextRetrieval.from_pretrained(stage1).eval()
    processor = AutoProcessor.from_pretrained(stage1)
    with torch.inference_mode():
        inputs = processor(images=photos[1], text=texts, return_tensors="pt", padding=True)
        itc = model(**inputs, use_image_text_matching_head=False).logits_per_image[0]
        for result in served:
            pair = processor(images=photos[1], text=texts[result["index"]], return_tensors="pt")
            itm = model(**pair, use_image_text_matching_head=True).logits_per_image.softmax(dim=-1)[0, 1]
            # The server may run fp16 on a GPU; this reference runs fp32 on the CPU.
            assert math.isclose(result["itc_score"], itc[result["index"]].item(), abs_tol=TOLERANCE)
            assert math.isclose(result["itm_score"], itm.item(), abs_tol=TOLERANCE)


def test_chat_completions_shape(opt8, photos):
    body = {
        "model": "tiny-opt",
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": b64(photos[0], data_uri=True)}},
                                         {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "a person"},
            {"role": "user", "content": "What colour?"},
        ],
        "max_tokens": 5,
    }  # fmt: skip
    response = opt8.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["completion_tokens"] <= 5
    streamed = opt8.post("/v1/chat/completions", json=body | {"stream": True})
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert content == answer["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == answer["choices"][0]["finish_reason"]
    # a stop marker cuts the stream where it cuts the whole answer
    marker = content.split()[1] if len(content.split()) > 1 else "zz"
    stopped = opt8.post("/v1/chat/completions", json=body | {"stream": True, "stop": [marker]})
    whole = opt8.post("/v1/chat/completions", json=body | {"stop": [marker]}).json()["choices"][0]
    events = [json.loads(line[6:]) for line in stopped.text.splitlines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == whole["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    # errors found before the first token keep their status code
    assert (
        opt8.post("/v1/chat/completions", json=body | {"stream": True, "max_tokens": 10**6}).status_code
        == 422
    )


def test_conversation_folded_into_the_vqa_format():
    from blip2.text import TextProcessing
    from service.api.chat import fold_conversation
    from service.api.schemas import ChatMessage

    messages = [
        ChatMessage(role="system", content="Answer briefly."),
        ChatMessage(role="user", content=[{"type": "image_url", "image_url": {"url": "data:,"}},
                                          {"type": "text", "text": "What is this?"}]),
        ChatMessage(role="assistant", content="a person"),
        ChatMessage(role="user", content="What colour?"),
    ]  # fmt: skip
    folded = fold_conversation(messages, "Question: {} Answer:")
    assert (
        folded.text()
        == "Answer briefly. Question: What is this? Answer: a person Question: What colour? Answer:"
    )
    # the conversation's texts are the client's (processed as the model was trained), the template the server's
    processed = "answer briefly Question: what is this? Answer: a person Question: what colour? Answer:"
    assert folded.text(TextProcessing()) == processed


def test_one_log_line_per_request_without_prompts_or_images(checkpoints, photos, caplog):
    folder = checkpoints["tiny-opt"] / "generation"
    secret_prompt = "a photo of my secret"
    for log_prompts in (False, True):
        with running_app(settings_for(folder, warmup=False, log_prompts=log_prompts)) as client:
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="service.access"):
                body = {"image": b64(photos[0]), "prompt": secret_prompt, "max_new_tokens": 2}
                assert client.post("/generate", json=body).status_code == 200
            lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "service.access"]
        assert len(lines) == 1
        line = lines[0]
        assert line["route"] == "/generate" and line["status"] == 200 and line["batch_size"] == 1
        assert "latency_s" in line and b64(photos[0])[:40] not in json.dumps(line)
        assert ("prompt" in line) == log_prompts


def test_metrics_exposition(opt8, photos):
    opt8.post("/caption", json={"image": b64(photos[0]), "max_new_tokens": 2, "min_new_tokens": 1})
    text = opt8.get("/metrics").text
    assert "blip2_queue_depth" in text
    assert metric(text, "blip2_requests_total", route="/caption", status="200") >= 1
    assert metric(text, "blip2_generated_tokens_total") >= 1
    assert metric(text, "blip2_model_load_seconds", model="generation") > 0
    assert metric(text, "blip2_ready") == 1
    for name in ("blip2_request_duration_seconds_count", "blip2_queue_wait_seconds_count"):
        assert name in text
    assert 'blip2_inference_duration_seconds_count{task="generate"}' in text
