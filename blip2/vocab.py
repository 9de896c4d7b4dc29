"""Vocabulary checks for a BLIP-2 folder's tokenizers, as training writes and loads folders and as the server
loads them: a person's text must tokenise to ids the model has embedding rows for, and never to the
tokenizer's control tokens."""

from __future__ import annotations

import json

from tokenizers import models
from torch import nn
from transformers import PreTrainedTokenizerBase


def vocabulary_problem(tokenizer: PreTrainedTokenizerBase, embeddings: nn.Embedding, placed=()) -> str | None:
    """What is wrong when a tokenizer can give an id its embedding table has no row for (None: nothing).

    Text is tokenised as text (`split_special_tokens`), so the ids it can give are its base vocabulary, its
    non-special added tokens and its own special tokens; `placed` are ids a template puts in itself (the
    LLM's image placeholder). A special token nothing places (the `<image>` Blip2Processor adds to a
    Q-Former's BERT tokenizer) needs no row.
    """
    added = [i for i, token in tokenizer.added_tokens_decoder.items() if not token.special]
    highest = max(tokenizer.vocab_size - 1, *tokenizer.all_special_ids, *added, *placed)
    if highest < embeddings.num_embeddings:
        return None
    return f"tokenizer gives ids up to {highest} but the embedding table has {embeddings.num_embeddings} rows"


def check_vocabulary(
    what: str, tokenizer: PreTrainedTokenizerBase, embeddings: nn.Embedding, placed=()
) -> None:
    """Refuse (ValueError) a tokenizer that can give an id its embedding table has no row for."""
    problem = vocabulary_problem(tokenizer, embeddings, placed)
    if problem is not None:
        raise ValueError(f"{what}: the {problem}")


def unreachable_special_pieces(tokenizer: PreTrainedTokenizerBase) -> None:
    """SentencePiece Unigram vocabularies (T5, Flan-T5) hold their control tokens as pieces with the best
    score there is (0.0), so even with `split_special_tokens` a typed `</s>` tokenises to eos. SentencePiece
    itself never makes control pieces from text; here each is renamed to a spelling with spaces, which the
    Metaspace pre-tokenizer never lets through. Ids, added tokens and decoding stay as they are."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "Unigram":
        return  # BPE merges and BERT's punctuation split already keep `</s>` and `[SEP]` apart
    special = set(tokenizer.all_special_tokens)
    vocab = [(f" {piece} " if piece in special else piece, score) for piece, score in model["vocab"]]
    backend.model = models.Unigram(vocab, model["unk_id"], model.get("byte_fallback", False))
