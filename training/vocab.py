"""Tokenizers for BLIP-2 parts: the Q-Former's BERT tokenizer with [DEC], and offline tokenizers for presets.

Presets must build without a network, so their tokenizers are trained on the fly with the `tokenizers`
library from a small built-in corpus. Real runs take the tokenizer that ships with the BERT / LLM checkpoint.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase, PreTrainedTokenizerFast

DEC_TOKEN = "[DEC]"

# Enough English for a tokenizer to split captions, questions and answers into sensible pieces.
_CORPUS = """
a an the this that these those is are was were be been being has have had do does did not no yes
what which who whom whose where when why how there here it its of in on at by for with from to into onto
photo picture image of a man woman person people child boy girl dog cat bird horse cow sheep elephant bear
zebra giraffe car bus truck train bicycle motorcycle airplane boat street road city building house room
kitchen table chair bed couch sofa window door wall floor grass tree field sky water beach sea river snow
mountain park food pizza cake sandwich plate cup bowl bottle glass phone computer laptop book clock ball
sitting standing walking running riding holding playing eating looking lying flying parked near next
top front behind under over small large big little young old white black red green blue yellow orange
purple brown gray grey pink colour color shape circle rectangle triangle square round two three four
one five many some several group couple pair question answer short caption describe does contain present
image shows picture contains there is no any other same different left right up down side middle
"""


def _corpus_lines() -> list[str]:
    words = _CORPUS.split()
    # Whole sentences as well as words, so merges across common pairs are learned.
    return [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)] + words


def qformer_tokenizer(bert_path: str | None = None) -> PreTrainedTokenizerBase:
    """The Q-Former's tokenizer: a BERT WordPiece vocabulary plus [DEC] as bos_token (as LAVIS does).

    With `bert_path` the BERT checkpoint's own tokenizer is used; without, a lowercase WordPiece
    is trained on the built-in corpus (presets).
    """
    if bert_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(bert_path)
    else:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        backend.normalizer = normalizers.BertNormalizer(lowercase=True)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece()
        backend.train_from_iterator(
            _corpus_lines(), trainers.WordPieceTrainer(vocab_size=1000, special_tokens=specials)
        )
        cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        tokenizer = BertTokenizerFast(
            tokenizer_object=backend,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    if tokenizer.bos_token != DEC_TOKEN:
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer


def preset_llm_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer for a preset LLM, with the special tokens laid out as the family expects.

    OPT: <s>=0, <pad>=1, </s>=2 (bos and eos are both </s>), <unk>=3; prepends </s> like OPT's tokenizer.
    T5: <pad>=0, </s>=1, <unk>=2; appends </s> like T5's tokenizer.
    """
    if family == "opt":
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
    elif family == "t5":
        specials = ["<pad>", "</s>", "<unk>"]
    else:
        raise ValueError(f"unknown LLM family {family!r}: expected 'opt' or 't5'")
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        _corpus_lines(),
        trainers.BpeTrainer(
            vocab_size=1000,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    eos_id = backend.token_to_id("</s>")
    if family == "opt":
        backend.post_processor = processors.TemplateProcessing(
            single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", eos_id)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
        )
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
