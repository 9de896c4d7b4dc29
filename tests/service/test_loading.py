"""Model loading from checkpoint folders: the folder decides the class, safetensors only, 8-bit/4-bit LLM
with the ViT and Q-Former kept out of quantisation, one ViT shared between generation and retrieval."""

from __future__ import annotations

import json
import shutil

import bitsandbytes as bnb
import pytest
import torch
from servertools import settings_for
from transformers import (
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    InstructBlipForConditionalGeneration,
)

from service.engine.loading import ModelLoadError, load_models


def quantised(module: torch.nn.Module, kind: type) -> list[str]:
    return [name for name, child in module.named_modules() if isinstance(child, kind)]


def test_8bit_llm_only(opt8):
    """The running app's generation model (on the CPU here; the same test passed on an H200 with CUDA):
    Linear8bitLt in the LLM, none in the ViT, Q-Former or projection."""
    models = opt8.app.state.server.runner.models
    model = models.generation.model
    assert models.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert models.quantization == "bnb-int8"
    assert quantised(model.language_model, bnb.nn.Linear8bitLt)
    for part in (model.vision_model, model.qformer):
        assert not quantised(part, bnb.nn.Linear8bitLt)
        assert all(p.dtype in (torch.float32, torch.float16) for p in part.parameters())
    assert all(p.dtype == torch.float32 for p in model.qformer.parameters())  # transformers keeps it in fp32
    assert isinstance(model.language_projection, torch.nn.Linear)
    assert not isinstance(model.language_projection, bnb.nn.Linear8bitLt)
    assert models.shared_vision and models.retrieval.model.vision_model is model.vision_model


def test_4bit_llm(checkpoints):
    models = load_models(settings_for(checkpoints["tiny-opt"] / "generation", load_in_4bit=True))
    model = models.generation.model
    assert models.quantization == "bnb-nf4"
    assert quantised(model.language_model, bnb.nn.Linear4bit)
    assert not quantised(model.vision_model, bnb.nn.Linear4bit) and not quantised(
        model.qformer, bnb.nn.Linear4bit
    )


def test_quantization_choices(checkpoints):
    """--quantization: torchao int8 weight-only runs on the CPU (LLM only); bnb-int8 takes the outlier
    threshold; FP8 asks for a GPU that has it; the older load_in_* flags still choose, and may not contradict."""
    folder = checkpoints["tiny-opt"] / "generation"
    models = load_models(settings_for(folder, quantization="torchao-int8"))
    model = models.generation.model
    assert models.quantization == "torchao-int8"
    assert type(model.language_model.model.decoder.layers[0].fc1.weight).__name__ == "Int8Tensor"
    for part in (model.vision_model, model.qformer, model.language_projection):
        assert all(type(p) is torch.nn.Parameter for p in part.parameters())
    threshold0 = load_models(settings_for(folder, quantization="bnb-int8", llm_int8_threshold=0.0))
    assert threshold0.generation.model.config.quantization_config.llm_int8_threshold == 0.0
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="FP8"):
            load_models(settings_for(folder, quantization="torchao-fp8"))
    with pytest.raises(ValueError, match="not both"):
        settings_for(folder, quantization="torchao-int8", load_in_4bit=True)


def test_the_folder_decides_the_class(checkpoints):
    opt, t5 = checkpoints["tiny-opt"], checkpoints["tiny-t5"]
    models = load_models(settings_for(t5 / "generation", t5 / "stage1"))
    assert isinstance(models.generation.model, Blip2ForConditionalGeneration)
    assert models.generation.is_encoder_decoder and models.generation.llm_type == "t5"
    assert isinstance(models.retrieval.model, Blip2ForImageTextRetrieval)
    instruct = load_models(settings_for(checkpoints["instructblip"]))
    assert isinstance(instruct.generation.model, InstructBlipForConditionalGeneration)
    assert instruct.generation.processor.tokenizer.padding_side == "left"  # batched decoder LLM
    retrieval_only = load_models(settings_for(opt / "stage1"))
    assert retrieval_only.generation is None and retrieval_only.retrieval is not None
    with pytest.raises(ModelLoadError, match="not a Blip2ForImageTextRetrieval"):
        load_models(settings_for(opt / "generation", opt / "generation"))


def test_vision_tower_shared_only_when_weights_are_equal(checkpoints, tmp_path):
    opt = checkpoints["tiny-opt"]
    assert load_models(settings_for(opt / "generation", opt / "stage1")).shared_vision
    # Same names, different weights: a fine-tuned ViT must not be shared.
    tuned = Blip2ForImageTextRetrieval.from_pretrained(opt / "stage1")
    with torch.no_grad():
        tuned.vision_model.post_layernorm.weight.add_(0.01)
    tuned.save_pretrained(tmp_path / "tuned")
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        (tmp_path / "tuned" / name).write_bytes((opt / "stage1" / name).read_bytes())
    models = load_models(settings_for(opt / "generation", tmp_path / "tuned"))
    assert not models.shared_vision
    assert models.retrieval.model.vision_model is not models.generation.model.vision_model


def test_released_checkpoints_right_padding_is_turned_left(checkpoints, tmp_path):
    """Salesforce's OPT checkpoints ship a right-padding tokenizer; batched generation needs left padding."""
    source = checkpoints["tiny-opt"] / "generation"
    shutil.copytree(source, tmp_path / "released")
    config_file = tmp_path / "released" / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) | {"padding_side": "right"}
    config_file.write_text(json.dumps(config))
    models = load_models(settings_for(tmp_path / "released"))
    assert models.generation.processor.tokenizer.padding_side == "left"
    t5 = load_models(settings_for(checkpoints["tiny-t5"] / "generation"))
    assert t5.generation.is_encoder_decoder  # encoder-decoder prompts keep their own padding


def test_pickle_weights_refused_unless_allowed(checkpoints, tmp_path):
    source = checkpoints["tiny-opt"] / "generation"
    model = Blip2ForConditionalGeneration.from_pretrained(source)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the legacy pickle format
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
    ):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    with pytest.raises(ModelLoadError, match="pickle"):
        load_models(settings_for(tmp_path))
    assert load_models(settings_for(tmp_path, allow_pickle=True)).generation is not None


def test_clear_errors_for_bad_folders(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_models(settings_for(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_models(settings_for(tmp_path))
    monkeypatch.setattr("service.settings.DEFAULT_MODEL_DIR", tmp_path / "no-packaged-model")
    with pytest.raises(ModelLoadError, match="no model given"):
        load_models(settings_for(None))


def test_instructblip_without_its_qformer_tokenizer_is_refused(checkpoints, tmp_path):
    folder = tmp_path / "instructblip"
    shutil.copytree(checkpoints["instructblip"], folder)
    shutil.rmtree(folder / "qformer_tokenizer")  # transformers would fall back to the LLM's tokenizer
    with pytest.raises(ModelLoadError, match="without its Q-Former tokenizer"):
        load_models(settings_for(folder))


@pytest.mark.parametrize("part", ["stage1", "generation"])
def test_a_tokenizer_with_ids_past_its_embeddings_is_refused_by_training_and_service(
    checkpoints, tmp_path, part
):
    """Every id a tokenizer can give (text as text, plus its own special tokens and the image placeholder)
    needs an embedding row. The presets agree; a word added past the table is refused with the numbers, by
    training's loader and by the server's (two copies of one rule: service never imports training)."""
    from transformers import AutoTokenizer

    from training.stages import load_generation, load_stage1

    load = load_stage1 if part == "stage1" else load_generation
    load(str(checkpoints["tiny-opt"] / part))  # the preset passes
    broken = tmp_path / part
    shutil.copytree(checkpoints["tiny-opt"] / part, broken)
    tokenizer = AutoTokenizer.from_pretrained(broken)
    rows = len(tokenizer) - (
        1 if part == "stage1" else 0
    )  # stage 1: the <image> Blip2Processor adds has none
    tokenizer.add_tokens(["zebraquagga"])  # an ordinary word: text can give its id
    tokenizer.save_pretrained(broken)
    numbers = f"ids up to {len(tokenizer) - 1} but the embedding table has {rows} rows"
    with pytest.raises(ValueError, match=numbers):
        load(str(broken))
    settings = settings_for(None, broken) if part == "stage1" else settings_for(broken)
    with pytest.raises(ModelLoadError, match=numbers):
        load_models(settings)
