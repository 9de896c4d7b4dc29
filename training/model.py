"""The stage-1 model: transformers' retrieval BLIP-2 plus the two pieces transformers has no place for.

`Blip2ForImageTextRetrieval` holds the ViT, the Q-Former with text input, the query tokens, the ITC
projections and the ITM head. Stage 1 also needs an ITG language-model head over the Q-Former's text
positions (BERT's `cls.predictions.*`, decoder tied to the word embeddings) and the learned ITC
temperature. Both are saved beside the transformers folder in `itg_head.safetensors`, so the folder
still loads unchanged in plain transformers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoProcessor, BertConfig, Blip2ForImageTextRetrieval
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

ITG_HEAD_FILE = "itg_head.safetensors"
INITIAL_TEMPERATURE = 0.07
log = logging.getLogger(__name__)


def frozen_vision_features(vision_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The frozen ViT blocks' output, before `post_layernorm` (which trains, as LAVIS's ln_vision does).

    This is also what `cache-features` stores. Images come at the tower's own size: a larger training
    size resizes the tower once (`resize_vision_tower`), as the saved model will be.
    """
    with torch.no_grad():
        return vision_block_features(vision_model, pixel_values)


def vision_block_features(vision_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """`frozen_vision_features` with gradients, for fine-tuning with the ViT unfrozen (`--train-vit`)."""
    embeddings = vision_model.embeddings(
        pixel_values.to(vision_model.embeddings.patch_embedding.weight.dtype)
    )
    hidden = vision_model.encoder(inputs_embeds=embeddings).last_hidden_state
    return hidden.float()  # the LayerNorm after the ViT runs in fp32


def resize_vision_tower(vision_model: nn.Module, image_processor, image_size: int) -> None:
    """Make the ViT native at `image_size`: bicubic-interpolate its patch position embeddings once."""
    embeddings = vision_model.embeddings
    if image_size in (0, embeddings.image_size):
        return
    patch = embeddings.patch_size
    if image_size % patch:
        raise SystemExit(f"--image-size {image_size} is not a multiple of the patch size {patch}")
    old, new = embeddings.image_size // patch, image_size // patch
    position = embeddings.position_embedding.data
    grid = position[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(position.dtype)
    embeddings.position_embedding = nn.Parameter(
        torch.cat([position[:, :1], grid], dim=1), requires_grad=embeddings.position_embedding.requires_grad
    )
    embeddings.image_size, embeddings.num_patches, embeddings.num_positions = (
        image_size,
        new * new,
        new * new + 1,
    )
    vision_model.config.image_size = image_size
    image_processor.size = {"height": image_size, "width": image_size}
    log.info(
        "vision tower resized to %d px (%dx%d patches, position embeddings interpolated)",
        image_size,
        new,
        new,
    )


def freeze_vision_blocks(vision_model: nn.Module) -> None:
    """Freeze the ViT's embeddings and blocks; `post_layernorm` stays trainable."""
    for module in (vision_model.embeddings, vision_model.encoder):
        module.requires_grad_(False)
        module.eval()


class _LMPrediction(nn.Module):
    def __init__(self, hidden_size: int, vocab_size: int, layer_norm_eps: float) -> None:
        super().__init__()
        config = BertConfig(hidden_size=hidden_size, hidden_act="gelu", layer_norm_eps=layer_norm_eps)
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(vocab_size))


class ItgHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder tied to the Q-Former word embeddings, plus its own bias."""

    def __init__(self, hidden_size: int, vocab_size: int, layer_norm_eps: float) -> None:
        super().__init__()
        self.predictions = _LMPrediction(hidden_size, vocab_size, layer_norm_eps)

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        transformed = self.predictions.transform(hidden)
        return nn.functional.linear(transformed, word_embeddings, self.predictions.bias)


class Stage1Model(nn.Module):
    """ViT + Q-Former + ITC/ITM/ITG heads + temperature, as trained in BLIP-2 stage 1."""

    def __init__(self, retrieval: Blip2ForImageTextRetrieval, dec_token_id: int, pad_token_id: int) -> None:
        super().__init__()
        qcfg = retrieval.config.qformer_config
        if not qcfg.use_qformer_text_input:
            raise ValueError("a stage-1 Q-Former needs use_qformer_text_input=True (it reads text)")
        self.retrieval = retrieval
        self.cls = ItgHead(qcfg.hidden_size, qcfg.vocab_size, qcfg.layer_norm_eps)
        self.temp = nn.Parameter(torch.tensor(INITIAL_TEMPERATURE))
        self.dec_token_id = dec_token_id
        self.pad_token_id = pad_token_id

    @property
    def num_query_tokens(self) -> int:
        return self.retrieval.query_tokens.shape[1]

    def itg_logits(self, text_hidden: torch.Tensor) -> torch.Tensor:
        return self.cls(text_hidden, self.retrieval.embeddings.word_embeddings.weight)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        heads = {f"cls.{k}": v.detach().contiguous() for k, v in self.cls.state_dict().items()}
        heads["temp"] = self.temp.detach().reshape(())
        return heads

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self.retrieval.save_pretrained(path)
        save_file(
            {k: v.cpu() for k, v in self.head_state_dict().items()},
            str(path / ITG_HEAD_FILE),
            metadata={"dec_token_id": str(self.dec_token_id), "pad_token_id": str(self.pad_token_id)},
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> Stage1Model:
        """Load a stage-1 folder; a plain retrieval checkpoint (e.g. blip2-itm-vit-g) gets a fresh ITG head."""
        retrieval = Blip2ForImageTextRetrieval.from_pretrained(path, **kwargs)
        tokenizer = AutoProcessor.from_pretrained(path).tokenizer
        model = cls(retrieval, tokenizer.bos_token_id, tokenizer.pad_token_id)
        head_file = Path(path) / ITG_HEAD_FILE
        if head_file.exists():
            heads = load_file(str(head_file))
            model.temp.data.copy_(heads.pop("temp"))
            model.cls.load_state_dict({k.removeprefix("cls."): v for k, v in heads.items()})
        return model
