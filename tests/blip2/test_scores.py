"""The core's ITC/ITM arithmetic (blip2.scores), which training's losses and evaluation and the server's
/embed and /retrieve share, on a tiny Blip2ForImageTextRetrieval built from a config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Blip2Config, Blip2ForImageTextRetrieval

from blip2.scores import (
    itc_query_features,
    itc_similarity,
    itm_head_logits,
    query_features,
    reranked_score,
    text_features,
)

QUERIES, WIDTH = 4, 16


@pytest.fixture(scope="module")
def retrieval() -> Blip2ForImageTextRetrieval:
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8, "initializer_range": 0.02},
        qformer_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "encoder_hidden_size": 32, "vocab_size": 50, "max_position_embeddings": 16,
                        "use_qformer_text_input": True},  # the text side retrieval needs
        num_query_tokens=QUERIES,
        image_text_hidden_size=WIDTH,
    )  # fmt: skip
    return Blip2ForImageTextRetrieval(config).eval()


def test_itc_is_the_best_cosine_over_the_queries(retrieval):
    with torch.no_grad():
        images = query_features(retrieval, torch.randn(3, 17, 32))
        texts = text_features(retrieval, torch.randint(1, 50, (2, 6)), torch.ones(2, 6, dtype=torch.long))
    assert images.shape == (3, QUERIES, WIDTH) and texts.shape == (2, WIDTH)
    assert torch.allclose(images.norm(dim=-1), torch.ones(3, QUERIES)) and torch.allclose(
        texts.norm(dim=-1), torch.ones(2)
    )
    expected = torch.stack([torch.stack([(image @ text).max() for text in texts]) for image in images])
    assert torch.allclose(itc_similarity(images, texts), expected)


def test_a_half_precision_model_normalises_in_fp32(retrieval):
    """The server's fp16/bf16 models: features come back fp32, from the half-precision projection."""
    hidden = torch.randn(2, QUERIES, 32)
    half = Blip2ForImageTextRetrieval(retrieval.config).eval().to(torch.bfloat16)
    with torch.no_grad():
        features = itc_query_features(half, hidden)
        expected = F.normalize(half.vision_projection(hidden.to(torch.bfloat16)).float(), dim=-1)
    assert features.dtype == torch.float32 and torch.equal(features, expected)


def test_under_autocast_autocast_decides(retrieval):
    """Training's mixed precision: the arithmetic the stage-1 losses were verified with, bit for bit."""
    hidden = torch.randn(2, QUERIES, 32)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        features = itc_query_features(retrieval, hidden)
        expected = F.normalize(retrieval.vision_projection(hidden), dim=-1)
    assert features.dtype == expected.dtype == torch.bfloat16 and torch.equal(features, expected)


def test_itm_averages_the_head_over_the_queries_and_the_final_score_adds_itc(retrieval):
    query_output = torch.randn(3, QUERIES, 32)
    with torch.no_grad():
        logits = itm_head_logits(retrieval, query_output)
        expected = torch.stack([retrieval.itm_head(rows).mean(dim=0) for rows in query_output])
    assert logits.shape == (3, 2) and torch.allclose(logits, expected)
    itc = torch.tensor([0.5, 0.25, -0.125])
    assert torch.equal(reranked_score(logits, itc), logits[:, 1] + itc)
