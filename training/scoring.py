"""Q-Former scoring of image-text pairs, for the stage-1 losses, retrieval evaluation and CapFilt.

The ITC features, the ITM head and the scores are the core's (`blip2.scores`), which the server computes
with too; here are the Q-Former passes under training's explicit stage-1 masks (`training.masks`) and the
batched evaluation. ITM runs the queries and the text together (bidirectional mask). Retrieval follows
LAVIS: ITC similarity for every pair, then each query's top k candidates re-ranked by ITM, final score
ITM logit + ITC similarity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from blip2.scores import itc_similarity, itm_head_logits, query_features, reranked_score, text_features
from training.data import text_tokens
from training.inference import images_or_blanks, progress_bar
from training.masks import additive, bidirectional_mask
from training.model import Stage1Model


def qformer_pass(
    model: Stage1Model,
    image_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_fn: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Run [queries; text] through the Q-Former under one of the stage-1 masks; returns all hidden states."""
    retrieval = model.retrieval
    queries = retrieval.query_tokens.expand(input_ids.shape[0], -1, -1)
    embeddings = retrieval.embeddings(input_ids=input_ids, query_embeds=queries)
    bias = additive(mask_fn(queries.shape[1], attention_mask), embeddings.dtype)
    return retrieval.qformer(
        query_embeds=embeddings,
        query_length=queries.shape[1],
        attention_mask=bias,
        encoder_hidden_states=image_embeds,
    ).last_hidden_state


def itm_logits(
    model: Stage1Model, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B, 2): the ITM head's (no match, match) logits, averaged over the query outputs."""
    hidden = qformer_pass(model, image_embeds, input_ids, attention_mask, bidirectional_mask)
    return itm_head_logits(model.retrieval, hidden[:, : model.num_query_tokens])


@torch.no_grad()
def itc_image_features(
    model: Stage1Model,
    processor,
    image_paths: list[str],
    batch_size: int,
    progress: bool,
    keep_vit_output: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per image: the ViT output (for ITM; None unless `keep_vit_output`, as it is images x tokens x width)
    and the ITC features of its queries."""
    retrieval = model.retrieval
    device = next(model.parameters()).device
    image_embeds, image_feats = [], []
    for start in progress_bar(
        range(0, len(image_paths), batch_size), progress, f"images ({len(image_paths)})"
    ):
        images, _ = images_or_blanks(image_paths[start : start + batch_size])
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device)
        embeds = retrieval.vision_model(pixel_values=pixels).last_hidden_state
        if keep_vit_output:
            image_embeds.append(embeds)
        image_feats.append(query_features(retrieval, embeds))
    return (torch.cat(image_embeds) if keep_vit_output else None), torch.cat(image_feats)


@torch.no_grad()
def itc_text_features(model: Stage1Model, tokens: dict, batch_size: int) -> torch.Tensor:
    """Per text: the ITC feature of the Q-Former's text-only pass."""
    feats = []
    for start in range(0, tokens["input_ids"].shape[0], batch_size):
        ids = tokens["input_ids"][start : start + batch_size]
        mask = tokens["attention_mask"][start : start + batch_size]
        feats.append(text_features(model.retrieval, ids, mask))
    return torch.cat(feats)


@torch.no_grad()
def retrieval_scores(
    model: Stage1Model,
    processor,
    image_paths: list[str],
    texts: list[str],
    *,
    batch_size: int,
    max_text_length: int,
    k_test: int,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """ITC similarity of every pair, then each query's top k re-ranked by ITM: final = ITM logit + ITC."""
    device = next(model.parameters()).device
    image_embeds, image_feats = itc_image_features(model, processor, image_paths, batch_size, progress)
    tokens = text_tokens(processor.tokenizer, texts, max_text_length).to(device)
    itc = itc_similarity(image_feats, itc_text_features(model, tokens, batch_size))

    def itm(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        scores = []
        for start in range(0, len(image_index), batch_size):
            i, t = image_index[start : start + batch_size], text_index[start : start + batch_size]
            scores.append(
                itm_logits(model, image_embeds[i], tokens["input_ids"][t], tokens["attention_mask"][t])
            )
        return torch.cat(scores)

    final = {}
    for name, sims in (("i2t", itc), ("t2i", itc.T)):
        k = min(k_test, sims.shape[1])
        top = sims.topk(k, dim=1).indices
        rows = torch.arange(sims.shape[0], device=device)[:, None].expand(-1, k)
        scores = torch.full_like(sims, -100.0)
        pairs = (rows.reshape(-1), top.reshape(-1))
        image_index, text_index = pairs if name == "i2t" else pairs[::-1]
        matched = []
        chunks = range(0, len(image_index), batch_size * 8)
        for start in progress_bar(chunks, progress, f"ITM re-rank {name} (k={k})"):
            end = start + batch_size * 8
            matched.append(itm(image_index[start:end], text_index[start:end]))
        scores[pairs] = reranked_score(torch.cat(matched), sims[pairs])
        final[name] = scores
    return {"itc_i2t": itc, "itc_t2i": itc.T, "i2t": final["i2t"], "t2i": final["t2i"]}
