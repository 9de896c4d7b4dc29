"""BLIP-2 stage-1 objectives: image-text contrastive (ITC), matching (ITM) and grounded generation (ITG).

`stage1_losses` is the public entry point: from the frozen vision tower's output, token ids and the
attention mask it returns the three losses of LAVIS's `Blip2Qformer.forward`, on one process or
across ranks. It runs three Q-Former passes, each with its own mask (see `training.masks`; the passes,
ITC features and the ITM head are the core's, `blip2.scores`, which evaluation, CapFilt and the server
score with too):

1. ITC, unimodal mask: queries over the image and the text on its own, in one pass. Similarity is
   the max over queries of cosine(query, [CLS]) divided by a learned temperature; cross-entropy both
   ways with label smoothing 0.1; captions sharing an image id all count as positives.
2. ITM, bidirectional mask, on 3B pairs [positives; (text, hard-negative image); (hard-negative text,
   image)]; negatives drawn from softmax(similarity) + 1e-4 with positives excluded; the 2-way head is
   averaged over the query outputs.
3. ITG, multimodal causal mask: [CLS] becomes [DEC] and the text is predicted token by token from
   the queries. LAVIS reuses the queries' key/value cache from pass 1 without detaching it; running
   the queries again under this mask computes the same keys and values with the same parameters, so
   values and gradients are identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blip2.scores import itc_query_features, itc_text_feature
from training import distributed
from training.masks import multimodal_causal_mask, unimodal_mask
from training.model import Stage1Model
from training.scoring import itm_logits, qformer_pass

LABEL_SMOOTHING = 0.1
# LAVIS adds this floor to the softmax weights, so every negative keeps a chance of being drawn.
NEGATIVE_WEIGHT_FLOOR = 1e-4


@dataclass
class Stage1Losses:
    itc: torch.Tensor
    itm: torch.Tensor
    itg: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.itc + self.itm + self.itg  # equal weights, as in the paper


@dataclass
class HardNegatives:
    """Fixed ITM negatives, as indices into the global (all-rank) batch; sampled when not given."""

    image_for_text: torch.Tensor  # (B,) for each local text, the index of its negative image
    text_for_image: torch.Tensor  # (B,) for each local image, the index of its negative text


def stage1_losses(
    model: Stage1Model,
    vision_hidden: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    hard_negatives: HardNegatives | None = None,
    caption_ids: torch.Tensor | None = None,
) -> Stage1Losses:
    """ITC, ITM and ITG for one (local) batch.

    vision_hidden: the frozen ViT blocks' output (B, N, D), before `post_layernorm`, which trains with
        the Q-Former as LAVIS's `ln_vision` does.
    input_ids, attention_mask: Q-Former (BERT) tokens starting with [CLS].
    image_ids: (B,) ids; captions of the same image count as positives. Default: every row unique.
    caption_ids: (B,) ids of the caption texts; when given, rows with the same caption count as positives
        too (see `positive_pairs`).
    hard_negatives: fixed ITM negatives; default: sampled as LAVIS does.
    """
    retrieval = model.retrieval
    batch, num_queries = input_ids.shape[0], model.num_query_tokens
    image_embeds = retrieval.vision_model.post_layernorm(vision_hidden)
    input_ids, attention_mask = distributed.pad_to_global_length(
        (input_ids, model.pad_token_id), (attention_mask, 0)
    )
    offset = distributed.rank() * batch
    if image_ids is None:
        image_ids = torch.arange(offset, offset + batch, device=input_ids.device)

    # ITC
    hidden = qformer_pass(model, image_embeds, input_ids, attention_mask, unimodal_mask)
    image_feats = itc_query_features(retrieval, hidden[:, :num_queries])
    text_feat = itc_text_feature(retrieval, hidden[:, num_queries])
    image_feats_all = distributed.gather(image_feats, with_grad=True)
    text_feat_all = distributed.gather(text_feat, with_grad=True)
    sim_i2t = torch.einsum("bqd,nd->bnq", image_feats, text_feat_all).amax(-1) / model.temp
    sim_t2i = torch.einsum("bd,nqd->bnq", text_feat, image_feats_all).amax(-1) / model.temp
    positives = positive_pairs(image_ids, caption_ids)
    targets = positives.float() / positives.sum(1, keepdim=True)
    # The same smoothing as cross_entropy(label_smoothing=0.1), spread over every positive.
    targets = (1 - LABEL_SMOOTHING) * targets + LABEL_SMOOTHING / targets.shape[1]
    itc = (soft_cross_entropy(sim_i2t, targets) + soft_cross_entropy(sim_t2i, targets)) / 2

    # ITM
    input_ids_all = distributed.gather(input_ids, with_grad=False)
    attention_mask_all = distributed.gather(attention_mask, with_grad=False)
    image_embeds_all = distributed.gather(image_embeds, with_grad=True)
    if hard_negatives is None:
        hard_negatives = sample_hard_negatives(sim_i2t.detach(), sim_t2i.detach(), positives)
    itm_ids = torch.cat([input_ids, input_ids, input_ids_all[hard_negatives.text_for_image]])
    itm_mask = torch.cat([attention_mask, attention_mask, attention_mask_all[hard_negatives.text_for_image]])
    itm_images = torch.cat([image_embeds, image_embeds_all[hard_negatives.image_for_text], image_embeds])
    match_logits = itm_logits(model, itm_images, itm_ids, itm_mask)
    itm_labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(match_logits.device)
    itm = F.cross_entropy(match_logits, itm_labels)

    # ITG
    decoder_ids = input_ids.clone()
    decoder_ids[:, 0] = model.dec_token_id
    labels = decoder_ids.masked_fill(decoder_ids == model.pad_token_id, -100)
    itg_hidden = qformer_pass(model, image_embeds, decoder_ids, attention_mask, multimodal_causal_mask)
    logits = model.itg_logits(itg_hidden[:, num_queries:])
    itg = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        label_smoothing=LABEL_SMOOTHING,
    )
    return Stage1Losses(itc=itc, itm=itm, itg=itg)


def positive_pairs(image_ids: torch.Tensor, caption_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, global B): which pairs of a local row and a row of the global batch match: the same image, or,
    with caption ids, the same caption. ITC spreads its target over them and ITM never draws them as
    negatives. (For ITC alone identical captions make no difference, their logits being equal; as ITM
    negatives they would teach that an image does not match its own caption.)"""
    positives = image_ids[:, None] == distributed.gather(image_ids, with_grad=False)[None, :]
    if caption_ids is not None:
        positives |= caption_ids[:, None] == distributed.gather(caption_ids, with_grad=False)[None, :]
    return positives


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, positives: torch.Tensor
) -> HardNegatives:
    """For each text an image, and for each image a text, drawn with probability softmax(similarity) + 1e-4,
    positives excluded (weight 0), as LAVIS does."""
    weights_t2i = (F.softmax(sim_t2i, dim=1) + NEGATIVE_WEIGHT_FLOOR).masked_fill(positives, 0)
    weights_i2t = (F.softmax(sim_i2t, dim=1) + NEGATIVE_WEIGHT_FLOOR).masked_fill(positives, 0)
    return HardNegatives(
        image_for_text=torch.multinomial(weights_t2i, 1).squeeze(1),
        text_for_image=torch.multinomial(weights_i2t, 1).squeeze(1),
    )
