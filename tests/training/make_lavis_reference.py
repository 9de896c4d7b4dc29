"""Generate tests/training/data/lavis_stage1_reference.safetensors from the real LAVIS code.

NOT run by the test suite: `test_lavis_parity.py` only reads the file this script writes. It runs
Salesforce LAVIS's `Blip2Qformer.forward` (lavis/models/blip2_models/blip2_qformer.py with its
Qformer.py, from the PyPI wheel salesforce-lavis 1.0.2, imported as it is, never copied here) on a
tiny random Q-Former, and records the weights (LAVIS names), the inputs, the three losses and the
gradients of each loss for a representative set of parameters.

Set-up (a throwaway venv: LAVIS needs transformers 4.x, the project uses 5.x):

    python3.11 -m venv /work/lavis-venv
    /work/lavis-venv/bin/pip install torch==2.13.0 "transformers==4.33.3" "numpy<2" safetensors
    pip download --no-deps salesforce-lavis==1.0.2 -d /tmp/lavis_dl
    cd /tmp/lavis_dl && unzip -q -o salesforce_lavis-1.0.2-py3-none-any.whl -d lavis_src

Run (from the repository root):

    /work/lavis-venv/bin/python tests/training/make_lavis_reference.py --lavis /tmp/lavis_dl/lavis_src

How LAVIS is made to run offline and deterministically, without changing what `forward` computes:
- The `lavis` package's __init__ files (which import every model, dataset and processor) are
  skipped: the packages are registered empty and only the modules the two files need are loaded
  from the wheel. Unrelated imports are stubbed: the EVA/CLIP ViT builders, omegaconf, timm's hub,
  lavis.common.utils (URL helpers).
- `Blip2Qformer.__init__` downloads bert-base-uncased and EVA ViT-g, so the object is built by hand
  with the same submodules: `BertLMHeadModel` from LAVIS's Qformer.py for a tiny `BertConfig`
  (cross-attention every 2nd layer, `query_length` = number of queries), LAVIS's fp32 `LayerNorm` as
  `ln_vision`, `nn.Identity` as the visual encoder (so `samples["image"]` IS the ViT output before
  ln_vision), `vision_proj`, `text_proj`, `itm_head`, `temp`. Every parameter is then randomised
  (query and text feed-forwards differ), so a wrong key mapping cannot pass.
- The tokenizer is replaced by an object that returns the fixed, already padded ids and mask, with
  `bos_token_id` = [DEC] and `pad_token_id` = 0 as LAVIS's BERT tokenizer has them.
- Dropout: every dropout probability is 0 and the model stays in train mode (LAVIS's training path).
- Single process: no process group. `dist.get_rank()` (called directly by forward) and
  `torch.distributed.get_world_size()` (called by `all_gather_with_grad`) are patched to 0 and 1;
  `concat_all_gather` takes its own non-distributed branch and returns its input unchanged.
  A second ITC gradient is recorded under a real one-process gloo group (nothing patched):
  there `concat_all_gather` copies the features WITHOUT gradient, so LAVIS's ITC gradient is not
  the same; see `grad_pg1/itc/*` and the test's documentation.
- No `image_ids` case: `Blip2Qformer.forward` in LAVIS 1.0.2 (and on its main branch) has no
  image-id branch; ITC targets are always the diagonal, which is what unique ids give here.
- Float32 on the CPU. The generated file is tensor-identical from run to run (its header order may
  differ). A one-off float64 run of both sides agreed to ~1e-14 relative (see the test docstring).
- Hard negatives: `torch.multinomial` is patched to return chosen indices in the order forward
  calls it (first one image per text, then one text per image); each choice is checked to have a
  nonzero sampling weight in LAVIS's own distribution.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

OUT = Path(__file__).parent / "data" / "lavis_stage1_reference.safetensors"

# The tiny configuration; the test builds the matching transformers config from these values.
CONFIG = {
    "vocab_size": 121,  # 120 "BERT" tokens + [DEC]
    "dec_token_id": 120,
    "pad_token_id": 0,
    "hidden_size": 32,
    "num_hidden_layers": 3,  # cross-attention in layers 0 and 2
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 32,
    "layer_norm_eps": 1e-12,
    "cross_attention_freq": 2,
    "num_query_tokens": 8,
    "encoder_width": 24,  # ViT width, different from the Q-Former width on purpose
    "num_image_tokens": 10,
    "embed_dim": 16,
    "ln_vision_eps": 1e-5,  # LAVIS's ln_vision is a plain nn.LayerNorm (eps 1e-5)
}

# Parameters whose gradients are recorded (LAVIS names).
GRAD_PARAMS = [
    "temp",
    "query_tokens",
    "ln_vision.weight",
    "ln_vision.bias",
    "Qformer.bert.embeddings.word_embeddings.weight",  # tied with the ITG decoder
    "Qformer.bert.embeddings.LayerNorm.weight",
    "Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
    "Qformer.bert.encoder.layer.2.crossattention.self.query.weight",
    "Qformer.bert.encoder.layer.1.attention.self.value.weight",
    "Qformer.bert.encoder.layer.2.attention.output.dense.weight",
    "Qformer.bert.encoder.layer.1.intermediate.dense.weight",  # text feed-forward
    "Qformer.bert.encoder.layer.1.output_query.dense.weight",  # query feed-forward
    "Qformer.bert.encoder.layer.2.output.LayerNorm.weight",
    "Qformer.cls.predictions.transform.dense.weight",
    "Qformer.cls.predictions.bias",
    "vision_proj.weight",
    "text_proj.weight",
    "itm_head.weight",
]


def load_lavis(root: Path):
    """Import blip2_qformer.py (and what it needs) from an unpacked LAVIS wheel, skipping lavis/__init__."""
    root = Path(root).resolve()
    # transformers probes optional packages (timm among them) at import: import it before the stubs.
    importlib.import_module("transformers.modeling_utils")
    for name, sub in [
        ("lavis", ""),
        ("lavis.common", "common"),
        ("lavis.models", "models"),
        ("lavis.models.blip_models", "models/blip_models"),
        ("lavis.models.blip2_models", "models/blip2_models"),
    ]:
        package = types.ModuleType(name)
        package.__path__ = [str(root / "lavis" / sub)]
        sys.modules[name] = package

    def stub(name: str, **attrs) -> None:
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module

    def unavailable(*args, **kwargs):
        raise RuntimeError("not available offline")

    stub("omegaconf", OmegaConf=None)
    stub("timm")
    stub("timm.models")
    stub("timm.models.hub", download_cached_file=unavailable, get_cache_dir=unavailable)
    stub("lavis.common.utils", is_url=lambda s: False, get_abs_path=lambda p: p)
    stub("lavis.models.eva_vit", create_eva_vit_g=unavailable)
    stub("lavis.models.clip_vit", create_clip_vit_L=unavailable)
    # The registry checks `issubclass(cls, lavis.models.BaseModel)`: the one name lavis/models/__init__ gives.
    sys.modules["lavis.models"].BaseModel = importlib.import_module("lavis.models.base_model").BaseModel
    qformer_module = importlib.import_module("lavis.models.blip2_models.blip2_qformer")
    return (
        qformer_module,
        importlib.import_module("lavis.models.blip2_models.blip2"),
        importlib.import_module("lavis.models.blip2_models.Qformer"),
    )


class FixedTokens:
    """Stands in for LAVIS's BERT tokenizer: returns the given (already padded) ids and mask."""

    def __init__(self, dec_token_id: int, pad_token_id: int) -> None:
        self.bos_token_id = dec_token_id
        self.pad_token_id = pad_token_id
        self.batch = None

    def __call__(self, text, **kwargs):
        assert len(text) == self.batch.input_ids.shape[0]
        return self.batch


class _Batch(dict):
    def __init__(self, input_ids, attention_mask):
        super().__init__(input_ids=input_ids, attention_mask=attention_mask)
        self.input_ids = input_ids
        self.attention_mask = attention_mask

    def to(self, device):
        return self


def build_model(qformer_module, blip2_module, bert_module) -> nn.Module:
    c = CONFIG
    config = bert_module.BertConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        intermediate_size=c["intermediate_size"],
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=c["max_position_embeddings"],
        layer_norm_eps=c["layer_norm_eps"],
        pad_token_id=c["pad_token_id"],
    )
    # As Blip2Base.init_Qformer sets them.
    config.encoder_width = c["encoder_width"]
    config.add_cross_attention = True
    config.cross_attention_freq = c["cross_attention_freq"]
    config.query_length = c["num_query_tokens"]

    model = qformer_module.Blip2Qformer.__new__(qformer_module.Blip2Qformer)
    nn.Module.__init__(model)
    model.tokenizer = FixedTokens(c["dec_token_id"], c["pad_token_id"])
    model.visual_encoder = nn.Identity()
    model.ln_vision = blip2_module.LayerNorm(c["encoder_width"], eps=c["ln_vision_eps"])
    model.Qformer = bert_module.BertLMHeadModel(config)
    model.query_tokens = nn.Parameter(torch.zeros(1, c["num_query_tokens"], c["hidden_size"]))
    model.vision_proj = nn.Linear(c["hidden_size"], c["embed_dim"])
    model.text_proj = nn.Linear(c["hidden_size"], c["embed_dim"])
    model.itm_head = nn.Linear(c["hidden_size"], 2)
    model.temp = nn.Parameter(0.07 * torch.ones([]))
    model.max_txt_len = c["max_position_embeddings"]

    decoder = model.Qformer.cls.predictions.decoder
    assert decoder.weight is model.Qformer.bert.embeddings.word_embeddings.weight, "ITG decoder not tied"
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "temp":
                param.fill_(0.07)
            elif name.endswith("LayerNorm.weight") or name == "ln_vision.weight":
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith("bias") and "LayerNorm" not in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    model.train()  # dropout probabilities are all 0: train mode is LAVIS's training code path
    return model


@contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextmanager
def fixed_multinomial(indices: list[int], check: list[bool], weights_seen: list[torch.Tensor]):
    """torch.multinomial that returns `indices` in call order (and checks each has nonzero weight)."""
    queue = list(indices)

    def multinomial(weights, num_samples, *args, **kwargs):
        assert num_samples == 1 and weights.dim() == 1
        index = queue.pop(0)
        check.append(bool(weights[index] > 0))
        weights_seen.append(weights.detach().clone())
        return torch.tensor([index])

    with patched(torch, "multinomial", multinomial):
        yield
    assert not queue, "forward drew fewer negatives than expected"


def run_case(model, vision_hidden, input_ids, attention_mask, image_for_text, text_for_image):
    """LAVIS's forward once; returns the three losses and the graph (for per-loss gradients)."""
    model.tokenizer.batch = _Batch(input_ids, attention_mask)
    samples = {"image": vision_hidden, "text_input": ["caption"] * input_ids.shape[0]}
    checks: list[bool] = []
    weights: list[torch.Tensor] = []
    with fixed_multinomial(image_for_text.tolist() + text_for_image.tolist(), checks, weights):
        output = model(samples)
    assert all(checks), "a fixed hard negative has zero weight in LAVIS's sampling distribution"
    losses = {"itc": output.loss_itc, "itm": output.loss_itm, "itg": output.loss_lm, "total": output.loss}
    # The (unnormalised) sampling weights LAVIS handed to torch.multinomial, one row per call.
    batch = input_ids.shape[0]
    sampling = {"weights_t2i": torch.stack(weights[:batch]), "weights_i2t": torch.stack(weights[batch:])}
    return losses, sampling


def gradients(model, loss) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, [params[n] for n in GRAD_PARAMS], retain_graph=True, allow_unused=True)
    return {
        n: (torch.zeros_like(params[n]) if g is None else g).detach().clone()
        for n, g in zip(GRAD_PARAMS, grads, strict=True)
    }


def make_inputs():
    c = CONFIG
    generator = torch.Generator().manual_seed(99)
    batch, length = 4, 9
    lengths = [9, 6, 4, 7]  # padded texts of different lengths (one unpadded)
    vision_hidden = torch.randn(batch, c["num_image_tokens"], c["encoder_width"], generator=generator)
    vision_hidden = 1.5 * vision_hidden + 0.3  # not already normalised
    input_ids = torch.zeros(batch, length, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    for row, n in enumerate(lengths):
        words = torch.randint(3, c["dec_token_id"], (n - 2,), generator=generator)
        input_ids[row, :n] = torch.cat([torch.tensor([1]), words, torch.tensor([2])])  # [CLS] ... [SEP]
        attention_mask[row, :n] = 1
    return vision_hidden, input_ids, attention_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lavis", type=Path, required=True, help="unpacked salesforce-lavis 1.0.2 wheel")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.manual_seed(0)
    qformer_module, blip2_module, bert_module = load_lavis(args.lavis)
    model = build_model(qformer_module, blip2_module, bert_module)

    vision_hidden, input_ids, attention_mask = make_inputs()
    # Negatives differ from the positive; the text negatives include the longest and shortest texts.
    image_for_text = torch.tensor([2, 3, 0, 1])
    text_for_image = torch.tensor([3, 2, 0, 0])
    tensors: dict[str, torch.Tensor] = {}
    tensors.update(
        {
            f"weights/{k}": v.detach().clone().contiguous()
            for k, v in model.state_dict().items()
            # tied to the word embeddings / predictions.bias, and a constant buffer
            if not k.startswith("Qformer.cls.predictions.decoder.") and not k.endswith("position_ids")
        }
    )
    tensors.update(
        {
            "inputs/vision_hidden": vision_hidden,
            "inputs/input_ids": input_ids,
            "inputs/attention_mask": attention_mask,
            "inputs/image_for_text": image_for_text,
            "inputs/text_for_image": text_for_image,
        }
    )

    # 1. No process group: LAVIS's own non-distributed branch (rank 0, world size 1).
    with (
        patched(dist, "get_rank", lambda *a, **k: 0),
        patched(dist, "get_world_size", lambda *a, **k: 1),
    ):
        losses, sampling = run_case(
            model, vision_hidden, input_ids, attention_mask, image_for_text, text_for_image
        )
    tensors.update({f"sampling/{k}": v for k, v in sampling.items()})
    for name, loss in losses.items():
        tensors[f"loss/{name}"] = loss.detach().reshape(())
        if name != "total":
            for param, grad in gradients(model, loss).items():
                tensors[f"grad/{name}/{param}"] = grad
    summary = {name: loss.item() for name, loss in losses.items()}

    # 2. A real one-process gloo group: same losses, but concat_all_gather detaches the ITC features.
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    try:
        losses_pg, _ = run_case(
            model, vision_hidden, input_ids, attention_mask, image_for_text, text_for_image
        )
    finally:
        dist.destroy_process_group()
    for name, loss in losses_pg.items():
        torch.testing.assert_close(loss, losses[name], rtol=0, atol=0)
    for param, grad in gradients(model, losses_pg["itc"]).items():
        tensors[f"grad_pg1/itc/{param}"] = grad

    metadata = {
        "config": json.dumps(CONFIG),
        "grad_params": json.dumps(GRAD_PARAMS),
        "lavis": "salesforce-lavis 1.0.2 (PyPI), Blip2Qformer.forward",
        "torch": torch.__version__,
        "transformers": importlib.import_module("transformers").__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(args.out), metadata=metadata)
    print(json.dumps(summary), f"{args.out} {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
