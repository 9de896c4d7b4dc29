"""Model loading: the checkpoint folder decides the class; weights load from safetensors only by default.

No code from a model folder ever runs (`trust_remote_code=False` everywhere). With 8-bit or 4-bit the
LLM is quantised by bitsandbytes while the ViT, Q-Former, query tokens, projection and LM head stay in
full precision: quantising them costs quality for little memory (they are ~1/15 of a 2.7B model) and a
tied LM head breaks bitsandbytes' 8-bit layer.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoProcessor,
    BitsAndBytesConfig,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    InstructBlipForConditionalGeneration,
    PretrainedConfig,
    TorchAoConfig,
)

from blip2.prompts import TASK_GENERATION_OPTIONS
from blip2.text import TextProcessing, load_text_processing, resolve_text_processing
from blip2.vocab import unreachable_special_pieces, vocabulary_problem
from service.settings import Settings

log = logging.getLogger("service.loading")

# Kept out of quantisation: everything but the LLM's transformer blocks.
SKIP_QUANTISATION = ["vision_model", "qformer", "query_tokens", "language_projection", "lm_head"]
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")


class _Once(logging.Filter):
    """bitsandbytes logs a warning on every 8-bit CPU matmul (fp32 inputs cast to fp16); once is enough."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_Once())
warnings.filterwarnings("once", message="MatMul8bitLt")


class ModelLoadError(RuntimeError):
    """A model folder that cannot be served; the message says why and what to do."""


@dataclass
class GenerationModel:
    model: torch.nn.Module
    processor: object
    kind: str  # "blip-2" or "instructblip"
    llm_type: str  # the LLM's model_type: "opt", "t5", ...
    is_encoder_decoder: bool
    max_positions: int | None  # the decoder LLM's position limit (prompt + queries + new tokens)
    eos_token_ids: set[int]  # where an answer ends
    # What the folder's generation_config.json sets of the routes' options: the model author's defaults
    generation_defaults: dict = field(default_factory=dict)
    # What a person's text goes through before it is tokenised (None: as it comes); see blip2.text
    text_processing: TextProcessing | None = None


@dataclass
class RetrievalModel:
    model: Blip2ForImageTextRetrieval
    processor: object
    text_processing: TextProcessing | None = None  # what search texts go through (None: as they come)


@dataclass
class LoadedModels:
    device: torch.device
    dtype: torch.dtype
    generation: GenerationModel | None = None
    retrieval: RetrievalModel | None = None
    quantization: str | None = None
    shared_vision: bool = False
    load_seconds: dict[str, float] = field(default_factory=dict)

    def text_processing_summary(self) -> str:
        """Which models process a person's text (`generation=on retrieval=off`), for the start-up log."""
        loaded = {"generation": self.generation, "retrieval": self.retrieval}
        return " ".join(
            f"{name}={'off' if model.text_processing is None else 'on'}"
            for name, model in loaded.items()
            if model is not None
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} asked for, but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device, llm_type: str | None) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if llm_type in ("t5", "mt5", "umt5") else torch.float16


def check_weights(source: str, allow_pickle: bool) -> None:
    """Refuse pickle-only folders up front (a hub id is checked by `use_safetensors=True` at download)."""
    path = Path(source)
    if not path.exists():
        if source.startswith((".", "/", "~")) or source.count("/") > 1:
            raise ModelLoadError(f"model folder {source!r} does not exist")
        return
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelLoadError(f"{source!r} is not a model folder (no config.json)")
    if any(path.glob("*.safetensors")):
        return
    if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
        if allow_pickle:
            log.warning("loading pickle-based weights from %s (allow_pickle is on)", source)
            return
        raise ModelLoadError(
            f"{source!r} holds only pickle-based weights; convert them to safetensors, or set "
            "BLIP2_ALLOW_PICKLE=true if you trust the folder (pickle can run code)"
        )
    raise ModelLoadError(f"{source!r} holds no weights (*.safetensors)")


def read_config(source: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the config of {source!r}: {exc}") from exc


def is_retrieval(config: PretrainedConfig) -> bool:
    return config.model_type == "blip-2" and "Blip2ForImageTextRetrieval" in (config.architectures or [])


def generation_class(config: PretrainedConfig) -> type:
    if config.model_type == "instructblip":
        return InstructBlipForConditionalGeneration
    if config.model_type == "blip-2" and not is_retrieval(config):
        return Blip2ForConditionalGeneration
    raise ModelLoadError(
        f"a {config.model_type!r} checkpoint ({config.architectures}) is not a BLIP-2 generation model"
    )


def quantization_choice(settings: Settings, device: torch.device) -> str:
    """The `quantization` setting with `auto` resolved through load_in_8bit / load_in_4bit."""
    if settings.quantization != "auto":
        return settings.quantization
    if settings.load_in_4bit:
        return "bnb-nf4"
    eight_bit = settings.load_in_8bit if settings.load_in_8bit is not None else device.type == "cuda"
    return "bnb-int8" if eight_bit else "none"


def quantization_config(settings: Settings, device: torch.device, dtype: torch.dtype):
    """transformers' quantisation config for the LLM, or None; everything in SKIP_QUANTISATION stays as is."""
    choice = quantization_choice(settings, device)
    if choice == "bnb-int8":
        return BitsAndBytesConfig(
            load_in_8bit=True,
            llm_int8_threshold=settings.llm_int8_threshold,
            llm_int8_skip_modules=SKIP_QUANTISATION,
        )
    if choice == "bnb-nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=SKIP_QUANTISATION,
        )
    if choice.startswith("torchao-"):
        return torchao_config(choice, device)
    return None


def torchao_config(choice: str, device: torch.device) -> TorchAoConfig:
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig
    except ImportError as exc:
        raise ModelLoadError(f"--quantization {choice} needs torchao: pip install torchao ({exc})") from exc
    if choice == "torchao-int8":
        return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=SKIP_QUANTISATION)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise ModelLoadError(
            "--quantization torchao-fp8 needs a GPU with FP8 (compute capability 8.9+, e.g. H100)"
        )
    return TorchAoConfig(
        Float8DynamicActivationFloat8WeightConfig(), modules_to_not_convert=SKIP_QUANTISATION
    )


def _pretrained_kwargs(settings: Settings) -> dict:
    return {"trust_remote_code": False, "use_safetensors": None if settings.allow_pickle else True}


def check_qformer_tokenizer(source: str, processor) -> None:
    """InstructBLIP's Q-Former reads the question with its own (BERT) tokenizer. Without a
    `qformer_tokenizer/` folder transformers falls back to the LLM's tokenizer, whose ids mean other words
    to the Q-Former: answers degrade quietly (measured on the default model: 99% -> 90%)."""
    if processor.qformer_tokenizer.get_vocab() == processor.tokenizer.get_vocab():
        raise ModelLoadError(
            f"{source!r} is an InstructBLIP checkpoint without its Q-Former tokenizer (a `qformer_tokenizer/` "
            "folder): the LLM's tokenizer would be used in its place and give wrong answers"
        )


def check_vocabulary(source: str, what: str, tokenizer, embeddings: torch.nn.Embedding, placed=()) -> None:
    """Refuse a folder whose tokenizer gives an id its embedding table has no row for (`blip2.vocab`, the
    rule training checks too): such a model fails on some input. `placed`: ids the server's template places."""
    problem = vocabulary_problem(tokenizer, embeddings, placed)
    if problem is not None:
        raise ModelLoadError(f"{source!r}: the {what} {problem}")


def eos_token_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def model_text_processing(source: str, settings: Settings) -> TextProcessing | None:
    """The processing of a person's text for the model in `source`: its folder's record, as
    `--text-processing` resolves it (a hub id has no local folder, so no record)."""
    try:
        recorded = load_text_processing(source) if Path(source).is_dir() else None
    except ValueError as error:
        raise ModelLoadError(f"{error}: fix or delete the file (it says how the model reads text)") from None
    return resolve_text_processing(settings.text_processing, recorded)


def load_generation(
    source: str, config: PretrainedConfig, settings: Settings, device: torch.device
) -> GenerationModel:
    text_config = config.text_config
    dtype = resolve_dtype(settings.dtype, device, text_config.model_type)
    quant = quantization_config(settings, device, dtype)
    kwargs = _pretrained_kwargs(settings) | {"dtype": dtype}
    if quant is not None:
        kwargs["quantization_config"] = quant
        if device.type == "cuda":
            kwargs["device_map"] = {"": device.index or 0}
    model = generation_class(config).from_pretrained(source, **kwargs).eval()
    if quant is None:
        model.to(device)
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=False)
    if config.model_type == "instructblip":
        check_qformer_tokenizer(source, processor)  # before the renaming below, which changes vocabularies
        unreachable_special_pieces(processor.qformer_tokenizer)
        embeddings = model.qformer.embeddings.word_embeddings
        check_vocabulary(source, "Q-Former", processor.qformer_tokenizer, embeddings)
    check_vocabulary(
        source, "LLM", processor.tokenizer, model.get_input_embeddings(), [config.image_token_id]
    )
    unreachable_special_pieces(processor.tokenizer)
    if getattr(processor, "num_query_tokens", None) is None:
        processor.num_query_tokens = config.num_query_tokens
    encoder_decoder = bool(text_config.is_encoder_decoder)
    if not encoder_decoder:
        # Batched generation with a decoder LLM needs the prompts flush right (left padding); released
        # checkpoints ship right padding, which silently changes batched answers.
        processor.tokenizer.padding_side = "left"
    return GenerationModel(
        model=model,
        processor=processor,
        kind=config.model_type,
        llm_type=text_config.model_type,
        is_encoder_decoder=encoder_decoder,
        max_positions=None if encoder_decoder else getattr(text_config, "max_position_embeddings", None),
        eos_token_ids=eos_token_ids(model, processor.tokenizer),
        generation_defaults={
            k: v for k, v in model.generation_config.to_diff_dict().items() if k in TASK_GENERATION_OPTIONS
        },
        text_processing=model_text_processing(source, settings),
    )


def load_retrieval(
    source: str, settings: Settings, device: torch.device, dtype: torch.dtype
) -> RetrievalModel:
    kwargs = _pretrained_kwargs(settings) | {"dtype": dtype}
    model = Blip2ForImageTextRetrieval.from_pretrained(source, **kwargs).eval().to(device)
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=False)
    unreachable_special_pieces(processor.tokenizer)
    check_vocabulary(source, "Q-Former", processor.tokenizer, model.embeddings.word_embeddings)
    return RetrievalModel(
        model=model, processor=processor, text_processing=model_text_processing(source, settings)
    )


def share_vision_tower(generation: torch.nn.Module, retrieval: torch.nn.Module) -> bool:
    """Point the retrieval model at the generation model's ViT when their weights are equal (not names)."""
    a, b = generation.vision_model.state_dict(), retrieval.vision_model.state_dict()
    if a.keys() != b.keys():
        return False
    for key, tensor in a.items():
        other = b[key]
        if (
            tensor.shape != other.shape
            or tensor.dtype != other.dtype
            or not torch.equal(tensor, other.to(tensor.device))
        ):
            return False
    retrieval.vision_model = generation.vision_model
    return True


def load_models(settings: Settings) -> LoadedModels:
    """Load what the settings name; raises ModelLoadError with a message an operator can act on."""
    if settings.model is None and settings.retrieval_model is None:
        raise ModelLoadError("no model given: pass --model PATH_OR_HUB_ID or set BLIP2_MODEL")
    device = resolve_device(settings.device)
    generation_source, retrieval_source = settings.model, settings.retrieval_model
    if generation_source is not None:
        check_weights(generation_source, settings.allow_pickle)
        config = read_config(generation_source)
        if is_retrieval(config):
            if retrieval_source is not None:
                raise ModelLoadError(
                    f"--model {generation_source!r} is a retrieval model; give a generation model"
                )
            generation_source, retrieval_source = None, generation_source
    loaded = LoadedModels(device=device, dtype=resolve_dtype(settings.dtype, device, None))
    if generation_source is not None:
        start = time.perf_counter()
        loaded.generation = load_generation(generation_source, config, settings, device)
        loaded.dtype = loaded.generation.model.vision_model.dtype
        loaded.load_seconds["generation"] = time.perf_counter() - start
        if getattr(loaded.generation.model.config, "quantization_config", None) is not None:
            loaded.quantization = quantization_choice(settings, device)
    if retrieval_source is not None:
        check_weights(retrieval_source, settings.allow_pickle)
        if not is_retrieval(read_config(retrieval_source)):
            raise ModelLoadError(
                f"--retrieval-model {retrieval_source!r} is not a Blip2ForImageTextRetrieval checkpoint"
            )
        start = time.perf_counter()
        loaded.retrieval = load_retrieval(retrieval_source, settings, device, loaded.dtype)
        loaded.load_seconds["retrieval"] = time.perf_counter() - start
    if loaded.generation is not None and loaded.retrieval is not None:
        loaded.shared_vision = share_vision_tower(loaded.generation.model, loaded.retrieval.model)
    log.info(
        "models loaded: generation=%s retrieval=%s device=%s dtype=%s quantization=%s shared_vision=%s "
        "text_processing=%s",
        generation_source, retrieval_source, device, loaded.dtype, loaded.quantization, loaded.shared_vision,
        loaded.text_processing_summary(),
    )  # fmt: skip
    return loaded
