"""The core's vocabulary rule, which training (writing and loading folders) and the server (loading them)
both apply: every id a person's text can tokenise to needs an embedding row."""

from __future__ import annotations

import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from blip2.vocab import check_vocabulary, vocabulary_problem


def word_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "<unk>", "a", "red", "circle"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


def test_a_table_with_a_row_per_id_passes():
    tokenizer = word_tokenizer()
    assert vocabulary_problem(tokenizer, nn.Embedding(5, 4)) is None
    check_vocabulary("tiny", tokenizer, nn.Embedding(5, 4))


def test_an_added_word_and_a_placed_id_need_rows():
    tokenizer = word_tokenizer()
    tokenizer.add_tokens(["zebraquagga"])  # an ordinary word: text can give its id, 5
    with pytest.raises(
        ValueError, match="tiny: the tokenizer gives ids up to 5 but the embedding table has 5 rows"
    ):
        check_vocabulary("tiny", tokenizer, nn.Embedding(5, 4))
    assert vocabulary_problem(word_tokenizer(), nn.Embedding(5, 4), placed=[7]) == (
        "tokenizer gives ids up to 7 but the embedding table has 5 rows"
    )


def test_a_special_token_nothing_places_needs_no_row():
    """Blip2Processor adds `<image>` to a Q-Former's BERT tokenizer; text never tokenises to it."""
    tokenizer = word_tokenizer()
    tokenizer.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    assert tokenizer.convert_tokens_to_ids("<image>") == 5
    assert vocabulary_problem(tokenizer, nn.Embedding(5, 4)) is None
