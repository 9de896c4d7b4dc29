"""Tokenizers for BLIP-2 parts: the Q-Former's BERT tokenizer with [DEC], and offline tokenizers for presets.

Presets must build without a network, so their tokenizers are built with the `tokenizers` library
from a small built-in corpus. Real runs take the tokenizer that ships with the BERT / LLM checkpoint.
The vocabulary checks are the core's (`blip2.vocab`), which the server runs too when it loads a folder.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from blip2.vocab import check_vocabulary

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


def _wordpiece(specials: list[str], lowercase: bool) -> Tokenizer:
    """A WordPiece whose vocabulary is built, not trained: specials, every printable ASCII character
    (alone and as a ##continuation) and every corpus word. Trainers break ties in hash order, which
    differs between processes; a built vocabulary is the same in every process (DDP ranks agree)."""
    words = sorted(set(_CORPUS.split()) | {w.capitalize() for w in ("question", "answer", "short")})
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    vocab = specials + chars + ["##" + c for c in chars] + [w for w in words if len(w) > 1]
    backend = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token=specials[-1]))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    return backend


def check_generation_vocabulary(model, processor, where: str = "generation model") -> None:
    """A generation model's LLM tokenizer (with its image placeholder) and, for InstructBLIP, the Q-Former's."""
    if hasattr(processor, "qformer_tokenizer"):
        embeddings = model.qformer.embeddings.word_embeddings
        check_vocabulary(f"{where} (Q-Former)", processor.qformer_tokenizer, embeddings)
    placeholder = [model.config.image_token_id]
    check_vocabulary(f"{where} (LLM)", processor.tokenizer, model.get_input_embeddings(), placeholder)


def qformer_tokenizer(bert_path: str | None = None) -> PreTrainedTokenizerBase:
    """The Q-Former's tokenizer: a BERT WordPiece vocabulary plus [DEC] as bos_token (as LAVIS does).

    With `bert_path` the BERT checkpoint's own tokenizer is used; without, a lowercase WordPiece
    is trained on the built-in corpus (presets).
    """
    if bert_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(bert_path)
    else:
        backend = _wordpiece(["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"], lowercase=True)
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
    """A cased WordPiece tokenizer for a preset LLM, with the special tokens laid out as the family expects.

    OPT: <s>=0, <pad>=1, </s>=2 (bos and eos are both </s>), <unk>=3; prepends </s> like OPT's tokenizer.
    T5: <pad>=0, </s>=1, <unk>=2; appends </s> like T5's tokenizer.
    """
    if family == "opt":
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
    elif family == "t5":
        specials = ["<pad>", "</s>", "<unk>"]
    else:
        raise ValueError(f"unknown LLM family {family!r}: expected 'opt' or 't5'")
    backend = _wordpiece(specials, lowercase=False)
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
