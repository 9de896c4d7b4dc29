"""Assembling a fresh BLIP-2 from parts (or from a preset) and writing it as transformers folders.

A BLIP-2 is a frozen vision tower, a Q-Former initialised from BERT, and a frozen LLM. `init` writes:
- `<out>/stage1/`: `Blip2ForImageTextRetrieval` + processor (BERT tokenizer with [DEC]) + ITG head;
- `<out>/generation/`: `Blip2ForConditionalGeneration` + processor (LLM tokenizer), when an LLM is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    Blip2VisionModel,
    OPTConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from blip2.vocab import check_vocabulary
from training.model import Stage1Model
from training.vocab import check_generation_vocabulary, preset_llm_tokenizer, qformer_tokenizer

PRESETS = ("tiny-opt", "tiny-t5")
INIT_STD = 0.02


@dataclass
class Blip2Parts:
    """What `init` produces: the stage-1 model and, with an LLM, the generation model, each with its processor."""

    stage1: Stage1Model
    stage1_processor: Blip2Processor
    generation: Blip2ForConditionalGeneration | None = None
    generation_processor: Blip2Processor | None = None

    def save(self, out_dir: str | Path) -> dict[str, str]:
        out_dir = Path(out_dir)
        written = {"stage1": str(out_dir / "stage1")}
        self.stage1.save_pretrained(out_dir / "stage1")
        self.stage1_processor.save_pretrained(out_dir / "stage1")
        if self.generation is not None:
            written["generation"] = str(out_dir / "generation")
            self.generation.save_pretrained(out_dir / "generation")
            self.generation_processor.save_pretrained(out_dir / "generation")
        return written


def image_processor(image_size: int):
    """BLIP-2's preprocessing: resize to a square, bicubic, CLIP mean/std. PIL backend without torchvision."""
    try:
        import torchvision  # noqa: F401
        from transformers import BlipImageProcessor as processor_class
    except ImportError:
        from transformers import BlipImageProcessorPil as processor_class
    return processor_class(
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )


def load_vision_tower(path: str) -> Blip2VisionModel:
    """A vision tower from a BLIP-2 checkpoint folder (its `vision_model.*`) or a Blip2VisionModel folder."""
    config = AutoConfig.from_pretrained(path)
    if config.model_type == "blip_2_vision_model":
        return Blip2VisionModel.from_pretrained(path)
    if config.model_type not in ("blip-2", "instructblip"):
        raise ValueError(f"{path} holds a {config.model_type!r} model, not a BLIP-2 vision tower")
    vision = Blip2VisionModel(Blip2VisionConfig(**config.vision_config.to_dict()))
    vision.load_state_dict(safetensors_state(path, "vision_model."))
    return vision


def safetensors_state(path: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The folder's tensors whose names start with `prefix`, prefix removed; only those are read, so taking
    one part of a large checkpoint does not load the rest."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors weights (pickle-based weights are not loaded)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                if name.startswith(prefix):
                    state[name.removeprefix(prefix)] = handle.get_tensor(name)
    return state


def qformer_config_from_bert(
    bert_path: str, vocab_size: int, encoder_hidden_size: int, **overrides
) -> Blip2QFormerConfig:
    bert = AutoConfig.from_pretrained(bert_path)
    return Blip2QFormerConfig(
        vocab_size=vocab_size,
        hidden_size=bert.hidden_size,
        num_hidden_layers=bert.num_hidden_layers,
        num_attention_heads=bert.num_attention_heads,
        intermediate_size=bert.intermediate_size,
        hidden_act=bert.hidden_act,
        max_position_embeddings=bert.max_position_embeddings,
        layer_norm_eps=bert.layer_norm_eps,
        pad_token_id=bert.pad_token_id,
        encoder_hidden_size=encoder_hidden_size,
        use_qformer_text_input=True,
        **overrides,
    )


def copy_bert_into_qformer(stage1: Stage1Model, bert_path: str) -> list[str]:
    """Copy BERT weights into the Q-Former as BLIP-2 does; returns the Q-Former keys left at random init.

    Embeddings and self-attention go to the shared layers; each BERT feed-forward goes to both the text
    feed-forward and the query feed-forward (`*_query`). Cross-attention stays random. A BERT MLM head,
    when the checkpoint has one, initialises the ITG head.
    """
    bert = {k.removeprefix("bert."): v for k, v in safetensors_state(bert_path).items()}
    targets: dict[str, torch.Tensor] = {}
    for key, value in bert.items():
        if key.startswith("embeddings.LayerNorm."):
            targets["retrieval.qformer.layernorm." + key.removeprefix("embeddings.LayerNorm.")] = value
        elif key.startswith(("embeddings.word_embeddings.", "embeddings.position_embeddings.")):
            targets["retrieval." + key] = value
        elif key.startswith("encoder.layer."):
            name = key.replace(".attention.self.", ".attention.attention.")
            targets["retrieval.qformer." + name] = value
            if ".intermediate." in name or (".output." in name and ".attention." not in name):
                query_name = name.replace(".intermediate.", ".intermediate_query.").replace(
                    ".output.", ".output_query."
                )
                targets["retrieval.qformer." + query_name] = value
        elif key.startswith("cls.predictions.transform.") or key == "cls.predictions.bias":
            targets[key] = value

    own = stage1.state_dict()
    with torch.no_grad():
        for key, value in targets.items():
            if key not in own:
                raise KeyError(f"BERT weight {key} has no place in the Q-Former: do the configs match?")
            if key.endswith("word_embeddings.weight") or key == "cls.predictions.bias":
                own[key][: value.shape[0]].copy_(value)  # the [DEC] row beyond BERT's vocab stays random
            else:
                own[key].copy_(value)
    return sorted(k for k in own if k.startswith("retrieval.qformer.") and k not in targets)


def _fresh_stage1(
    vision: Blip2VisionModel, qformer_config: Blip2QFormerConfig, num_query_tokens: int, tokenizer
) -> Stage1Model:
    config = Blip2Config(
        vision_config=vision.config.to_dict(),
        qformer_config=qformer_config.to_dict(),
        num_query_tokens=num_query_tokens,
    )
    torch.manual_seed(0)
    retrieval = Blip2ForImageTextRetrieval(config)
    with torch.no_grad():
        nn.init.normal_(retrieval.query_tokens, std=INIT_STD)  # transformers starts them at zero
    retrieval.vision_model.load_state_dict(vision.state_dict())
    return Stage1Model(retrieval, tokenizer.bos_token_id, tokenizer.pad_token_id)


def attach_llm(
    stage1: Stage1Model, llm: PreTrainedModel, llm_tokenizer: PreTrainedTokenizerBase, image_size: int
) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """A generation model: the stage-1 ViT and Q-Former, a fresh projection, and the given LLM."""
    processor = Blip2Processor(
        image_processor(image_size), llm_tokenizer, num_query_tokens=stage1.num_query_tokens
    )
    tokenizer = processor.tokenizer
    image_token_index = tokenizer.convert_tokens_to_ids(processor.image_token.content)
    if llm.get_input_embeddings().num_embeddings < len(tokenizer):
        llm.resize_token_embeddings(len(tokenizer))
    if not llm.config.is_encoder_decoder:
        # Batched generation with a decoder LLM needs the prompt flush right; init_kwargs makes it persist.
        tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    text_config = llm.config
    if getattr(text_config, "bos_token_id", None) is None:
        # generate() with no prompt starts from bos; for T5 that is the lone </s> an empty prompt encodes to.
        text_config.bos_token_id = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )
    qformer_config = Blip2QFormerConfig(
        **{**stage1.retrieval.config.qformer_config.to_dict(), "use_qformer_text_input": False}
    )
    config = Blip2Config(
        vision_config=stage1.retrieval.config.vision_config.to_dict(),
        qformer_config=qformer_config.to_dict(),
        text_config=text_config.to_dict(),
        num_query_tokens=stage1.num_query_tokens,
        image_token_index=image_token_index,
    )
    torch.manual_seed(0)
    generation = Blip2ForConditionalGeneration(config)
    generation.language_model.load_state_dict(llm.state_dict())
    copy_stage1_into_generation(stage1, generation)
    return generation, processor


def copy_stage1_into_generation(stage1: Stage1Model, generation: nn.Module) -> None:
    """ViT, query tokens and Q-Former weights from a stage-1 model into a generation (or InstructBLIP) model."""
    source = stage1.retrieval.state_dict()
    own = generation.state_dict()
    with torch.no_grad():
        for key, value in source.items():
            if key.startswith(("vision_model.", "qformer.")) or key == "query_tokens":
                if key in own:
                    own[key].copy_(value)


def load_llm(path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal or seq2seq LM folder, or a BLIP-2 / InstructBLIP checkpoint folder (its `language_model.*`)."""
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if config.model_type not in ("blip-2", "instructblip"):
        model_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        return model_class.from_pretrained(path, dtype=torch.float32), tokenizer
    text_config = config.text_config
    model_class = AutoModelForSeq2SeqLM if text_config.is_encoder_decoder else AutoModelForCausalLM
    llm = model_class.from_config(text_config, dtype=torch.float32)
    state = safetensors_state(path, "language_model.")
    missing, unexpected = llm.load_state_dict(state, strict=False)
    # A tied output layer is not stored; anything else missing means the folder is not what it claims.
    own = llm.state_dict()
    loaded = {p.data_ptr() for name, p in own.items() if name in state}
    untied = [name for name in missing if own[name].data_ptr() not in loaded]
    if untied or unexpected:
        raise ValueError(f"{path}: language_model weights do not fit its text_config: {untied or unexpected}")
    return llm, tokenizer


def from_parts(
    qformer_bert: str,
    vision: str | None = None,
    vision_config: dict | None = None,
    llm: str | None = None,
    num_query_tokens: int = 32,
    cross_attention_frequency: int = 2,
) -> Blip2Parts:
    """Assemble from a vision tower (checkpoint folder or Blip2VisionConfig fields), a BERT and an optional LLM."""
    if (vision is None) == (vision_config is None):
        raise ValueError(
            "give exactly one of vision (a checkpoint folder) or vision_config (Blip2VisionConfig fields)"
        )
    if vision is not None:
        tower = load_vision_tower(vision)
    else:
        torch.manual_seed(0)
        tower = Blip2VisionModel(Blip2VisionConfig(**{"initializer_range": INIT_STD, **vision_config}))
    tokenizer = qformer_tokenizer(qformer_bert)
    qformer_config = qformer_config_from_bert(
        qformer_bert,
        len(tokenizer),
        tower.config.hidden_size,
        cross_attention_frequency=cross_attention_frequency,
    )
    stage1 = _fresh_stage1(tower, qformer_config, num_query_tokens, tokenizer)
    copy_bert_into_qformer(stage1, qformer_bert)
    return _with_llm(stage1, tokenizer, load_llm(llm) if llm else None)


def _with_llm(stage1: Stage1Model, qformer_tok, llm_and_tokenizer) -> Blip2Parts:
    image_size = stage1.retrieval.config.vision_config.image_size
    # The retrieval model reads plain text: its processor must not prepend image placeholder tokens.
    parts = Blip2Parts(
        stage1, Blip2Processor(image_processor(image_size), qformer_tok, num_query_tokens=None)
    )
    check_vocabulary("Q-Former", qformer_tok, stage1.retrieval.embeddings.word_embeddings)
    if llm_and_tokenizer is not None:
        parts.generation, parts.generation_processor = attach_llm(stage1, *llm_and_tokenizer, image_size)
        check_generation_vocabulary(parts.generation, parts.generation_processor)
    return parts


def tiny_llm(family: str, tokenizer: PreTrainedTokenizerBase, width: int = 64) -> PreTrainedModel:
    """A small random OPT or Flan-T5-shaped model for tests and smoke runs."""
    torch.manual_seed(0)
    if family == "opt":
        config = OPTConfig(
            vocab_size=len(tokenizer), hidden_size=width, word_embed_proj_dim=width, num_hidden_layers=2,
            num_attention_heads=4, ffn_dim=width * 2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, dropout=0.0,
        )  # fmt: skip
        return AutoModelForCausalLM.from_config(config)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=width // 4, d_ff=width * 2, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id, dropout_rate=0.0,
    )  # fmt: skip
    return AutoModelForSeq2SeqLM.from_config(config)


def preset(name: str) -> Blip2Parts:
    """`tiny-opt` / `tiny-t5`: 64-px ViT, 2-layer Q-Former with 8 queries, 2-layer LLM; random weights.

    The Q-Former has no dropout: at 64 wide with random embeddings, BERT's 0.1 dropout drowns the
    small differences between captions and ITC does not move in a short run (measured: flat at
    ln(batch) over 80 steps with dropout, 2.77 -> 1.51 without).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    width = 64
    torch.manual_seed(0)
    tower = Blip2VisionModel(
        Blip2VisionConfig(
            hidden_size=width, intermediate_size=width * 2, num_hidden_layers=2, num_attention_heads=4,
            image_size=64, patch_size=8, initializer_range=INIT_STD,
        )
    )  # fmt: skip
    tokenizer = qformer_tokenizer()
    qformer_config = Blip2QFormerConfig(
        vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=width * 2, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        encoder_hidden_size=width, cross_attention_frequency=2, use_qformer_text_input=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    stage1 = _fresh_stage1(tower, qformer_config, 8, tokenizer)
    family = name.removeprefix("tiny-")
    llm_tokenizer = preset_llm_tokenizer(family)
    return _with_llm(stage1, tokenizer, (tiny_llm(family, llm_tokenizer, width), llm_tokenizer))
