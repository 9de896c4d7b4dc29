"""Helpers of the easy-VQA recipe (run.sh): the fine-tuning manifest, the frozen-weights check, the report,
and shipping the trained folders into `service/default_model/`.

`python -m recipes.easy_vqa.tools {manifest,identity,captions,curves,results,ship,rewrite} ...`
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from recipes.easy_vqa.unimodal import CAPTION_PROMPT, VQA_PROMPT
from training.assemble import safetensors_state
from training.data import read_jsonl, read_manifest, write_jsonl
from training.importers import SHAPES

COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")


def write_finetune_manifest(data: Path, output: Path) -> dict:
    """VQA fine-tuning rows: every train question (asked in the run's template, "Question: {q} Short
    answer:"), plus every train caption as the answer to the server's InstructBLIP caption prompt (the
    row's own `prompt`, with no question in it), so the one shipped model answers /vqa and /caption. The
    question is the text that goes through the run's text processing; the templates are the model's own."""
    rows = []
    for row in read_jsonl(data / "vqa_train.jsonl"):
        rows.append({**row, "prompt": VQA_PROMPT})
    for row in read_jsonl(data / "captions_train.jsonl"):
        rows.append(
            {
                "image": row["image"],
                "question": "",
                "prompt": CAPTION_PROMPT,
                "answer": row["text"],
                "question_type": "caption",
            }
        )
    write_jsonl(output, rows)
    return {"rows": len(rows), "output": str(output)}


# How a person might type a test question that the model saw typed one way (lower case, one final "?"):
# the rewrites of `tools.py rewrite`, to measure how an answer depends on the spelling of its question.
REWRITES = {
    "capital": lambda q: q[:1].upper() + q[1:],
    "no-mark": lambda q: q.rstrip("?"),
    "double-mark": lambda q: q.rstrip("?") + "??",
}


def rewrite_questions(manifest: Path, style: str, output: Path) -> dict:
    """The manifest with every question rewritten in `style` (image paths made absolute, so the new
    manifest may live anywhere); the answers and every other field unchanged."""
    rewrite = REWRITES[style]
    rows = read_manifest(manifest)
    changed = 0
    for row in rows:
        new = rewrite(row["question"])
        changed += new != row["question"]
        row["question"] = new
    write_jsonl(output, rows)
    return {"rows": len(rows), "changed": changed, "style": style, "output": str(output)}


def identity(vision: Path, llm: Path, models: dict[str, Path]) -> dict:
    """Are the frozen parts bit-identical to the unimodal checkpoints they came from?

    ViT: every weight but `post_layernorm` (BLIP-2's `ln_vision`, which trains with the Q-Former as in
    LAVIS). LLM: every weight but the embedding rows added for the `<image>` token at assembly."""
    vit = {k: v for k, v in safetensors_state(str(vision)).items() if not k.startswith("post_layernorm.")}
    lm = safetensors_state(str(llm))
    report: dict[str, dict] = {}
    for name, folder in models.items():
        own = safetensors_state(str(folder))
        vit_equal = all(torch.equal(own["vision_model." + k], v) for k, v in vit.items())
        entry = {"vit_tensors": len(vit), "vit_identical": vit_equal}
        if any(k.startswith("language_model.") for k in own):
            equal = True
            for key, value in lm.items():
                mine = _lm_tensor(own, key)
                if mine is None:
                    equal = False
                    break
                if mine.shape != value.shape:  # embeddings grew by the <image> row
                    mine = mine[: value.shape[0]]
                equal &= torch.equal(mine, value)
            entry |= {"llm_tensors": len(lm), "llm_identical": bool(equal)}
        report[name] = entry
    return report


def _lm_tensor(own: dict[str, torch.Tensor], key: str) -> torch.Tensor | None:
    for candidate in ("language_model." + key, "language_model." + key.removeprefix("model.")):
        if candidate in own:
            return own[candidate]
    if key == "lm_head.weight":  # tied to the input embeddings, saved once
        return _lm_tensor(own, "model.decoder.embed_tokens.weight")
    return None


def caption_accuracy(predictions: Path) -> dict:
    """Does each generated caption name the image's colour and shape? (references with both, only)."""
    rows = read_jsonl(predictions)
    both = colour_ok = shape_ok = total = 0
    for row in rows:
        refs = row.get("references") or [row.get("reference", "")]
        ref = refs[0]
        colour = next((c for c in COLOURS if re.search(rf"\b{c}\b", ref)), None)
        shape = next((s for s in SHAPES if re.search(rf"\b{s}\b", ref)), None)
        if colour is None or shape is None:
            continue
        text = row.get("caption") or row.get("prediction") or ""
        words = set(re.findall(r"[a-z]+", text.lower()))
        named_colours = words & set(COLOURS)
        named_shapes = words & set(SHAPES)
        c_ok, s_ok = named_colours == {colour}, named_shapes == {shape}
        total += 1
        colour_ok += c_ok
        shape_ok += s_ok
        both += c_ok and s_ok
    pct = lambda n: round(100.0 * n / max(1, total), 2)  # noqa: E731
    return {"images": total, "colour_and_shape": pct(both), "colour": pct(colour_ok), "shape": pct(shape_ok)}


def curves_png(runs: dict[str, Path], output: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    finals = {}
    for label, folder in runs.items():
        points = [r for r in read_jsonl(folder / "log.jsonl") if "loss" in r and "step" in r]
        ax.plot([r["step"] for r in points], [r["loss"] for r in points], label=label)
        finals[label] = points[-1]["loss"] if points else None
    ax.set_xlabel("stage-2 step")
    ax.set_ylabel("LM loss (train)")
    ax.set_title("easy-VQA stage 2: Q-Former from stage 1 vs fresh")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    return finals


def ship(generation: Path, stage1: Path, dest: Path, dtype: str) -> dict:
    """Copy the two folders into dest/{generation,stage1}, weights re-saved in `dtype` (safetensors)."""
    sizes = {}
    for name, source in (("generation", generation), ("stage1", stage1)):
        target = dest / name
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for file in source.iterdir():
            if file.suffix == ".safetensors":
                state = load_file(str(file))
                if dtype == "float16":
                    state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
                save_file(
                    {k: v.contiguous() for k, v in state.items()}, str(target / file.name), {"format": "pt"}
                )
                (target / file.name).chmod(0o644)  # safetensors writes 0600; package data must be readable
            elif file.is_file():
                shutil.copy2(file, target / file.name)
            elif file.is_dir():  # e.g. InstructBLIP's qformer_tokenizer/: without it the processor
                shutil.copytree(file, target / file.name)  # falls back to the LLM's tokenizer
        if name == "generation":
            # The server's /caption default is the paper's 8-token minimum; this model's captions are 3-6
            # tokens, and the folder's generation_config.json is where a model states its own defaults.
            generation_config = json.loads((target / "generation_config.json").read_text())
            generation_config["min_new_tokens"] = 1
            (target / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
        if dtype == "float16":
            config = json.loads((target / "config.json").read_text())
            config["dtype"] = "float16"
            (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        sizes[name] = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    sizes["total_mb"] = round(sum(sizes.values()) / 2**20, 2)
    return sizes


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _summary(log: Path) -> dict | None:
    if not log.exists():
        return None
    rows = [r for r in read_jsonl(log) if "summary" in r]
    return rows[-1]["summary"] if rows else None


def _retrieval_figures(metrics: dict | None) -> dict:
    return {k: v for k, v in (metrics or {}).items() if k not in ("model", "manifest", "task")}


def _vqa_figures(metrics: dict | None) -> dict | None:
    if metrics is None:
        return None
    per_type = {k: round(v["exact_match"], 2) for k, v in metrics["per_type"].items()}
    return {"exact_match": round(metrics["exact_match"], 2), "count": metrics["count"], "per_type": per_type}


def collect_results(out: Path, output: Path) -> dict:
    """Everything the recipe measured, in one JSON file (docs/easy_vqa_results.json)."""
    timings = read_jsonl(out / "timings.jsonl") if (out / "timings.jsonl").exists() else []
    stage2 = {}
    for run in ("stage2", "stage2_fresh"):
        log = [r for r in read_jsonl(out / run / "log.jsonl") if "loss" in r and "step" in r]
        stage2[run] = {
            "zero_shot_vqa": _vqa_figures(_json(out / "eval" / f"{run}_vqa" / "metrics.json")),
            "first_loss": log[0]["loss"] if log else None,
            "final_loss": log[-1]["loss"] if log else None,
        }
    unimodal = {part: _summary(out / "parts" / part / "log.jsonl") for part in ("vision", "llm", "bert")}
    measured = _json(out / "parts" / "llm" / "answer_accuracy.json")
    if unimodal["llm"] is not None and measured is not None:
        unimodal["llm"]["test_answer_acc_given_true_caption"] = measured
    results = {
        "recipe": "recipes/easy_vqa/run.sh",
        "test_split": {"images": 1000, "questions": 9673},
        "unimodal": unimodal,
        "vqa": _vqa_figures(_json(out / "eval" / "vqa" / "metrics.json")),
        # the same model one question at a time, and with the paper's beam 5 in batches of 8 (as the server)
        "vqa_unbatched": _vqa_figures(_json(out / "eval" / "vqa_bs1" / "metrics.json")),
        "vqa_beam5_batch8": _vqa_figures(_json(out / "eval" / "vqa_beam5_bs8" / "metrics.json")),
        "caption": _json(out / "eval" / "caption" / "named.json"),
        "caption_scores": {
            k: v
            for k, v in (_json(out / "eval" / "caption" / "metrics.json") or {}).items()
            # the tokenizer that produced them: "python" figures are not comparable with published ones
            if k.startswith(("bleu", "cider")) or k == "tokenizer"
        },
        "retrieval": _retrieval_figures(_json(out / "eval" / "retrieval" / "metrics.json")),
        "retrieval_same_caption": _retrieval_figures(
            _json(out / "eval" / "retrieval_same_caption" / "metrics.json")
        ),
        "stage2_from_stage1_vs_fresh": stage2,
        "frozen_weights_identical": _json(out / "identity.json"),
        "step_seconds": {r["step"]: r["seconds"] for r in timings},  # some steps run side by side
        "wall": _json(out / "wall.json"),
    }
    output.write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("manifest")
    p.add_argument("--data", required=True)
    p.add_argument("--output", required=True)
    p = sub.add_parser("identity")
    p.add_argument("--vision", required=True)
    p.add_argument("--llm", required=True)
    p.add_argument("--model", action="append", default=[], help="NAME=FOLDER, repeatable")
    p.add_argument("--output", required=True)
    p = sub.add_parser("captions")
    p.add_argument("--predictions", required=True)
    p.add_argument("--output", required=True)
    p = sub.add_parser("curves")
    p.add_argument("--run", action="append", default=[], help="LABEL=FOLDER with log.jsonl, repeatable")
    p.add_argument("--output", required=True)
    p = sub.add_parser("results")
    p.add_argument("--out", required=True, help="the recipe's run folder")
    p.add_argument("--output", required=True)
    p = sub.add_parser("ship")
    p.add_argument("--generation", required=True)
    p.add_argument("--stage1", required=True)
    p.add_argument("--dest", default="service/default_model", help="from the repository root")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p = sub.add_parser(
        "rewrite", help="a VQA manifest with every question re-typed (capital first letter, ...)"
    )
    p.add_argument("--manifest", required=True)
    p.add_argument("--style", required=True, choices=sorted(REWRITES))
    p.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    if args.command == "manifest":
        result = write_finetune_manifest(Path(args.data), Path(args.output))
    elif args.command == "identity":
        models = dict(item.split("=", 1) for item in args.model)
        result = identity(Path(args.vision), Path(args.llm), {k: Path(v) for k, v in models.items()})
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        if not all(v.get("vit_identical") and v.get("llm_identical", True) for v in result.values()):
            print(json.dumps(result))
            raise SystemExit("frozen weights changed")
    elif args.command == "captions":
        result = caption_accuracy(Path(args.predictions))
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    elif args.command == "curves":
        runs = dict(item.split("=", 1) for item in args.run)
        result = curves_png({k: Path(v) for k, v in runs.items()}, Path(args.output))
    elif args.command == "rewrite":
        result = rewrite_questions(Path(args.manifest), args.style, Path(args.output))
    elif args.command == "results":
        result = collect_results(Path(args.out), Path(args.output))
    else:
        result = ship(Path(args.generation), Path(args.stage1), Path(args.dest), args.dtype)
    print(json.dumps({"summary": result}))


if __name__ == "__main__":
    main()
