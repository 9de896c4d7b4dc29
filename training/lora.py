"""A parameter-efficient Q-Former: LoRA adapters (peft) on its linear layers, merged back before saving.

With `add_qformer_lora` the Q-Former's own weights (and its text embeddings) are frozen and rank-r
adapters train in every attention, cross-attention and feed-forward linear layer. The small parts around
the Q-Former (query tokens, projections, heads, the vision LayerNorm) keep training as before. At the end
the adapters are merged into the weights, so the saved folder is a plain transformers checkpoint.
"""

from __future__ import annotations

from torch import nn

QFORMER_LINEAR_LAYERS = ["query", "key", "value", "dense"]


def add_qformer_lora(qformer: nn.Module, rank: int, alpha: float = 0.0, dropout: float = 0.0, frozen=()):
    """Freeze `qformer` (and the modules in `frozen`) and inject LoRA adapters; returns the peft tuner."""
    from peft import LoraConfig, LoraModel

    for module in (qformer, *frozen):
        module.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules=QFORMER_LINEAR_LAYERS
    )
    return LoraModel(qformer, config, adapter_name="default")


def merge_lora(tuner) -> nn.Module:
    """Fold the adapters into the Q-Former's weights in place; the module tree is the original one again."""
    return tuner.merge_and_unload()


def count_parameters(module: nn.Module) -> dict[str, int]:
    params = list(module.parameters())
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
    }
