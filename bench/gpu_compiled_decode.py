"""OPT-2.7B's decoding at its exact shapes (random weights), transformers' own two ways: `generate()` with its
dynamic cache (what `--decoder transformers` runs) and with a static cache whose forward torch.compile
captures (`mode="reduce-overhead"`: CUDA graphs on a GPU). Greedy, a fixed number of new tokens, at the row
counts of caption batches 1, 8 and 32 with beam 5 (5, 40, 160 rows), prompt of 33 tokens (32 queries + BOS).

Each cell: the time of a decode step (a run of N tokens minus a run of 1 token, over N-1 steps, so the prefill
is left out), "% of bound" (the step's bytes from bench/roofline.py at the chip's bandwidth), the compile
time, and how many rows' tokens agree with the dynamic-cache run. It answers how near graph-captured decoding
gets to the memory-bandwidth bound before the server's own loop (service/engine/decoding.py) gets a static-shape,
graph-captured step. Results go to `--out` as JSON after every cell; no new cell starts after `--budget-s`.

    python bench/gpu_compiled_decode.py                  # one H100 / H200; compiling takes ~1-2 min a row count
    python bench/gpu_compiled_decode.py --small --rows 5 # tiny widths on the CPU (compiled there too)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_blip2_opt27b_shapes import OPT, SMALL, VISION, log  # noqa: E402
from roofline import Roofline, chip_of  # noqa: E402

PROMPT = 33


def timed_generate(model, input_ids: torch.Tensor, tokens: int, static: bool) -> tuple[float, torch.Tensor]:
    from transformers import CompileConfig

    kwargs = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}
    if static:
        config = CompileConfig(fullgraph=True, mode="reduce-overhead")
        config._compile_all_devices = True  # also on the CPU (--small), where generate() would not compile
        kwargs |= {"cache_implementation": "static", "compile_config": config}
    if input_ids.is_cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    if input_ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started, output[:, input_ids.shape[1] :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="tiny widths and depths, for a CPU check")
    parser.add_argument("--rows", default="5,40,160", help="decoded rows (batch x beams)")
    parser.add_argument("--tokens", type=int, default=30, help="new tokens per row (min = max)")
    parser.add_argument("--budget-s", type=float, default=420, help="start no new cell after this")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", tempfile.gettempdir())))
    args = parser.parse_args(argv)

    from transformers import OPTConfig, OPTForCausalLM

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    text = OPT | (SMALL["opt"] if args.small else {})
    torch.manual_seed(0)
    with device:
        model = OPTForCausalLM(OPTConfig(**text)).to(torch.float16 if cuda else torch.float32).eval()
    roof = Roofline.from_config({"text_config": text, "vision_config": VISION})
    chip = chip_of(torch.cuda.get_device_name(0)) if cuda else None
    started = time.perf_counter()
    out: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "shapes": "small" if args.small else "facebook/opt-2.7b",
        "new_tokens": args.tokens,
        "cells": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / ("gpu_compiled_decode_small.json" if args.small else "gpu_compiled_decode.json")
    for rows in [int(r) for r in args.rows.split(",")]:
        if time.perf_counter() - started > args.budget_s:
            out.setdefault("skipped_rows", []).append(rows)
            continue
        input_ids = torch.randint(3, text["vocab_size"], (rows, PROMPT), device=device)
        cell, answers = {}, {}
        for name, static in (("dynamic", False), ("static_compiled", True)):
            first, _ = timed_generate(model, input_ids, args.tokens, static)  # compiles, captures
            timed_generate(model, input_ids, 1, static)
            whole, answers[name] = timed_generate(model, input_ids, args.tokens, static)
            prefill, _ = timed_generate(model, input_ids, 1, static)
            step_s = (whole - prefill) / (args.tokens - 1)
            cell[name] = {"ms_per_step": round(1000 * step_s, 3), "first_run_s": round(first, 1)}
            if chip is not None:
                bound_s = roof.step_bytes(rows, PROMPT + args.tokens // 2) / (chip[0] * 1e12)
                cell[name]["percent_of_bound"] = round(100 * bound_s / step_s, 1)
            log(f"rows {rows} {name}: {cell[name]}")
        same = (answers["dynamic"] == answers["static_compiled"]).all(dim=1).sum().item()
        cell["rows_with_equal_tokens"] = f"{same}/{rows}"
        out["cells"][f"rows_{rows}"] = cell
        target.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
