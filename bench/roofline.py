"""What memory bandwidth allows a BLIP-2 generation model, from its config.json alone.

A decode step reads every LLM weight once and every cached key and value of every row; at serving batch
sizes that traffic, not arithmetic, sets the step time. The ViT is arithmetic: ~2 FLOPs per weight per
image token. The bound of a batch is then the ViT's FLOPs at the chip's peak plus `steps` decode steps at
its bandwidth (the Q-Former and the prefill are small next to both).

    python bench/roofline.py MODEL_FOLDER --batch 32 --beams 5 --tokens 30 --bandwidth-tbs 4.8 --tflops 990
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

# Memory bandwidth (TB/s) and dense bf16/fp16 peak (TFLOP/s) of the chips the GPU benchmark runs on.
CHIPS = {"H200": (4.8, 989.0), "H100": (3.35, 989.0), "A100": (2.0, 312.0)}


@dataclass
class Roofline:
    llm_parameters: int  # transformer weights read per decode step (embeddings and LM head included)
    kv_bytes_per_token: int  # keys + values of one row and one position, all layers, at 2 bytes
    vit_flops_per_image: float

    @classmethod
    def from_config(cls, config: dict) -> Roofline:
        text, vision = config["text_config"], config["vision_config"]
        width, layers, vocab = text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]
        ffn = text.get("ffn_dim") or text.get("intermediate_size") or 4 * width
        llm = layers * (4 * width * width + 2 * width * ffn) + vocab * width
        kv = 2 * layers * width * 2
        v_width, v_ffn, v_layers = (
            vision["hidden_size"],
            vision["intermediate_size"],
            vision["num_hidden_layers"],
        )
        tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
        vit = 2 * tokens * v_layers * (4 * v_width * v_width + 2 * v_width * v_ffn)
        return cls(llm, kv, float(vit))

    def step_bytes(self, rows: int, context: int, weight_bytes: float = 2.0) -> float:
        """Bytes one decode step reads: the weights once (`weight_bytes` each: 2 fp16, 1 int8) + the cache."""
        return self.llm_parameters * weight_bytes + rows * context * self.kv_bytes_per_token

    def captions_per_s(
        self, batch: int, beams: int, tokens: int, prompt: int, bandwidth_tbs: float, tflops: float,
        weight_bytes: float = 2.0,
    ) -> float:  # fmt: skip
        """The most captions/s memory bandwidth and peak FLOPs allow for this batch shape."""
        rows = batch * beams
        decode_s = sum(self.step_bytes(rows, prompt + t, weight_bytes) for t in range(tokens)) / (
            bandwidth_tbs * 1e12
        )
        vit_s = batch * self.vit_flops_per_image / (tflops * 1e12)
        return batch / (decode_s + vit_s)


def chip_of(device_name: str) -> tuple[float, float] | None:
    return next((figures for name, figures in CHIPS.items() if name in device_name), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="a generation model folder (its config.json)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--prompt", type=int, default=33, help="prompt length with the query tokens")
    parser.add_argument("--bandwidth-tbs", type=float, default=CHIPS["H200"][0])
    parser.add_argument("--tflops", type=float, default=CHIPS["H200"][1])
    args = parser.parse_args(argv)
    roof = Roofline.from_config(json.loads((args.model / "config.json").read_text()))
    for name, weight_bytes in (("fp16", 2.0), ("int8", 1.0)):
        bound = roof.captions_per_s(
            args.batch, args.beams, args.tokens, args.prompt, args.bandwidth_tbs, args.tflops, weight_bytes
        )
        step = roof.step_bytes(args.batch * args.beams, args.prompt + args.tokens // 2, weight_bytes)
        print(f"{name}: {step / 1e9:.2f} GB per decode step (mid-answer), bound {bound:.0f} captions/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
