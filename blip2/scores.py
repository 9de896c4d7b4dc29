"""The Q-Former's ITC features and its ITC/ITM scores: what training (the stage-1 losses, retrieval
evaluation, CapFilt) and the server (/embed, /retrieve) compute alike, on a `Blip2ForImageTextRetrieval`.

ITC compares an image's projected, normalised query outputs with a text's projected [CLS] output: the
best cosine over the queries (no temperature; the stage-1 loss divides by its own). ITM runs the queries
and the text together and averages its 2-way head over the query outputs. LAVIS's retrieval score for a
pair re-ranked by ITM is its ITM match logit plus its ITC similarity.

Projections run in the weights' dtype and normalise in fp32 (a half-precision server: in fp16 the norms
are off by ~1e-3). Under autocast (training's mixed precision) autocast decides, as in LAVIS's training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Blip2ForImageTextRetrieval


def _project(projection: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    projected = projection(hidden.to(projection.weight.dtype))
    if not torch.is_autocast_enabled(projected.device.type):
        projected = projected.float()
    return F.normalize(projected, dim=-1)


def itc_query_features(retrieval: Blip2ForImageTextRetrieval, query_output: torch.Tensor) -> torch.Tensor:
    """(B, queries, D): the query outputs projected and normalised, one ITC feature per query."""
    return _project(retrieval.vision_projection, query_output)


def itc_text_feature(retrieval: Blip2ForImageTextRetrieval, cls_output: torch.Tensor) -> torch.Tensor:
    """(B, D): a text's [CLS] output projected and normalised."""
    return _project(retrieval.text_projection, cls_output)


def query_features(retrieval: Blip2ForImageTextRetrieval, vision: torch.Tensor) -> torch.Tensor:
    """The queries over images (the ViT's output, `vision_model(...).last_hidden_state`) -> their ITC
    features, (images, queries, D)."""
    queries = retrieval.query_tokens.expand(vision.shape[0], -1, -1)
    image_mask = torch.ones(vision.shape[:-1], dtype=torch.long, device=vision.device)
    out = retrieval.qformer(
        query_embeds=queries, encoder_hidden_states=vision, encoder_attention_mask=image_mask
    )
    return itc_query_features(retrieval, out.last_hidden_state)


def text_features(
    retrieval: Blip2ForImageTextRetrieval, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Texts through the Q-Former's text side alone -> their ITC features, (texts, D)."""
    out = retrieval.qformer(
        query_embeds=retrieval.embeddings(input_ids=input_ids), query_length=0, attention_mask=attention_mask
    )
    return itc_text_feature(retrieval, out.last_hidden_state[:, 0, :])


def itc_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """(images, texts): the best cosine over each image's query features."""
    return torch.einsum("iqd,td->itq", image_feats, text_feats).amax(-1)


def itm_head_logits(retrieval: Blip2ForImageTextRetrieval, query_output: torch.Tensor) -> torch.Tensor:
    """(pairs, 2): the ITM head's (no match, match) logits, averaged over the query outputs of a joint
    pass of queries and text."""
    head = retrieval.itm_head
    return head(query_output.to(head.weight.dtype)).mean(dim=1).float()


def reranked_score(itm_logits: torch.Tensor, itc: torch.Tensor) -> torch.Tensor:
    """LAVIS's final score of pairs re-ranked by ITM: the match logit plus the ITC similarity."""
    return itm_logits[..., 1] + itc
