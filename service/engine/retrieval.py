"""The runner's retrieval: embeddings and ITC/ITM scores with the loaded retrieval model. The same ViT states
feed ITC and the ITM re-rank (through the vision cache, which generation may share)."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from blip2 import scores as qformer_scores
from service.engine.jobs import EmbedJob, RetrieveJob
from service.engine.loading import RetrievalModel
from service.engine.vision import ModelsOnDevice, to_device


class Retrieval(ModelsOnDevice):
    """Embeddings (`embed`) and ranked candidates (`retrieve`) with the loaded retrieval model."""

    def _retrieval(self) -> RetrievalModel:
        return self.models.retrieval

    @property
    def embedding_dim(self) -> int:
        """The size of the ITC space's vectors (/embed's, the gallery's): 256 for BLIP-2."""
        return self._retrieval().model.config.image_text_hidden_size

    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """ViT outputs, once per distinct image (the tower and its cache may be shared with generation)."""
        return self.vision_states(self._retrieval().model.vision_model, pixels)

    def query_features(self, vision: torch.Tensor) -> torch.Tensor:
        """Q-Former queries over the image -> projected, L2-normalised: (images, queries, 256)."""
        return qformer_scores.query_features(self._retrieval().model, vision)

    def _tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids of search texts (/embed, /retrieve, the gallery's search): the one place they enter the
        retrieval model, so the one place they go through its text processing (as its captions did)."""
        ret = self._retrieval()
        if ret.text_processing is not None:
            texts = [ret.text_processing.caption(text) for text in texts]
        limit = ret.model.config.qformer_config.max_position_embeddings
        # A person's text is text: `[SEP]` or `[DEC]` typed into a search stays words (see `_encode`).
        tokens = ret.processor.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=limit,
            split_special_tokens=True,
            return_tensors="pt",
        )
        return {k: to_device(tokens[k], self.models.device) for k in ("input_ids", "attention_mask")}

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """The [CLS] output of the Q-Former's text side -> projected, L2-normalised: (texts, 256)."""
        return qformer_scores.text_features(
            self._retrieval().model, tokens["input_ids"], tokens["attention_mask"]
        )

    def itm_logits(self, vision: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Image-text matching logits (pairs, 2), averaged over the query outputs, as transformers does."""
        model = self._retrieval().model
        queries = model.query_tokens.expand(vision.shape[0], -1, -1)
        query_mask = torch.ones(queries.shape[:-1], dtype=torch.long, device=vision.device)
        out = model.qformer(
            query_embeds=model.embeddings(input_ids=tokens["input_ids"], query_embeds=queries),
            query_length=queries.shape[1],
            attention_mask=torch.cat([query_mask, tokens["attention_mask"]], dim=1),
            encoder_hidden_states=vision,
            encoder_attention_mask=torch.ones(vision.shape[:-1], dtype=torch.long, device=vision.device),
        )
        return qformer_scores.itm_head_logits(model, out.last_hidden_state[:, : queries.shape[1], :])

    def embed(self, jobs: list[EmbedJob]) -> list[dict[str, Any]]:
        """All images of all jobs in one ViT + Q-Former pass, all texts in one text pass, then split."""
        pixels = [job.pixels for job in jobs if job.images]
        texts = [text for job in jobs for text in job.texts]
        queries = self.query_features(self.vision_features(torch.cat(pixels))).cpu() if pixels else None
        text_vectors = self.text_features(self._tokens(texts)).cpu() if texts else None
        results, i, t = [], 0, 0
        for job in jobs:
            result: dict[str, Any] = {}
            if job.images:
                mine = queries[i : i + len(job.images)]
                i += len(job.images)
                # One vector per image: the normalised mean of its query vectors (ITC itself takes the max).
                result["image"] = F.normalize(mine.mean(dim=1), dim=-1)
                if job.query_vectors:
                    result["image_queries"] = mine
            if job.texts:
                result["text"] = text_vectors[t : t + len(job.texts)]
                t += len(job.texts)
            results.append(result)
        return results

    def retrieve(self, job: RetrieveJob) -> list[dict[str, Any]]:
        """ITC similarity for every candidate, then ITM on the top k; LAVIS's final score is ITM + ITC."""
        # Texts are tokenised once, for ITC and for the ITM re-rank of the top k.
        if job.query_text is not None:
            vision = self.vision_features(job.pixels)
            tokens = self._tokens([job.query_text])
            itc = qformer_scores.itc_similarity(self.query_features(vision), self.text_features(tokens))[:, 0]
        else:
            vision = self.vision_features(job.pixels)
            tokens = self._tokens(job.candidate_texts)
            itc = qformer_scores.itc_similarity(self.query_features(vision), self.text_features(tokens))[0]
        k = min(job.top_k, itc.numel())
        top = torch.topk(itc, k).indices
        if job.query_text is not None:
            logits = self.itm_logits(vision[top], {name: t.expand(k, -1) for name, t in tokens.items()})
        else:
            logits = self.itm_logits(vision.expand(k, -1, -1), {name: t[top] for name, t in tokens.items()})
        # To the host once (one sync each), not an .item() per candidate.
        probabilities = logits.softmax(dim=-1)[:, 1].tolist()
        scores = qformer_scores.reranked_score(logits, itc[top]).tolist()
        itc_scores, top = itc.tolist(), top.tolist()
        ranked = [
            {"index": i, "itc_score": itc_scores[i], "itm_score": probabilities[n], "score": scores[n]}
            for n, i in enumerate(top)
        ]
        ranked.sort(key=lambda r: r["score"], reverse=True)
        chosen = set(top)
        rest = sorted((i for i in range(len(itc_scores)) if i not in chosen), key=lambda i: -itc_scores[i])
        ranked += [{"index": i, "itc_score": itc_scores[i], "itm_score": None, "score": None} for i in rest]
        return ranked
