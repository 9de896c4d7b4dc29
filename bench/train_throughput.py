"""Stage-1 training speed: the frozen ViT run every step vs cached ViT features, same run, as a ratio.

Both runs use the same stage-1 model, the easy-VQA caption manifest (imported with `blip2-train data
easy-vqa`), batch size and step count, each in its own `blip2-train stage1` process; the features are
cached first with `blip2-train data cache-features` (that one-off pass is timed and reported separately).
samples/s is the mean of the trainer's own logged windows after the first (which holds start-up); peak
memory is each process's maximum resident set (ru_maxrss from wait4), since these runs are on the CPU.

    python bench/train_throughput.py                       # default model's stage1, else tiny-opt
    python bench/train_throughput.py --steps 60 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, child_env, machine, model_folder, now  # noqa: E402

TRAIN = [sys.executable, "-m", "training.cli"]


def run(args: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes, stdout) of one blip2-train process."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [*TRAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"blip2-train {' '.join(args[:1])} failed:\n{output[-3000:]}")
    return time.perf_counter() - started, usage.ru_maxrss * 1024, output


def windows(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return [row["samples_per_s"] for row in rows if "samples_per_s" in row]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="auto", help="`auto`, `tiny-opt` or a folder holding stage1/")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--images", type=int, default=1000, help="easy-VQA train images to use")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the runs (0: default)")
    parser.add_argument("--work", type=Path, default=CACHE / "train_throughput")
    args = parser.parse_args(argv)

    folder, label = model_folder(args.model)
    stage1 = folder / "stage1"
    env = child_env()
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    data = args.work / "easy-vqa"
    if not (data / "captions_train.jsonl").exists():
        run(
            [
                "data",
                "easy-vqa",
                "--output",
                str(data),
                "--splits",
                "train",
                "--limit-images",
                str(args.images),
            ],
            env,
        )
    manifest = data / "captions_train.jsonl"
    features = args.work / "features"
    cache_s, cache_rss, _ = run(
        [
            "data",
            "cache-features",
            "--manifest",
            str(manifest),
            "--model",
            str(stage1),
            "--output",
            str(features),
        ],
        env,
    )
    common = ["--init", str(stage1), "--train-manifest", str(manifest), "--steps", str(args.steps),
              "--batch-size", str(args.batch_size), "--log-every", str(args.log_every), "--save-every",
              str(args.steps), "--no-progress", "--warmup-steps", "5"]  # fmt: skip
    results = {}
    for name, extra in (("vit_every_step", []), ("cached_features", ["--features", str(features)])):
        out = args.work / name
        seconds, rss, _ = run(["stage1", *common, "--output", str(out), *extra, "--no-resume"], env)
        rates = windows(out)[1:] or windows(out)
        results[name] = {"samples_per_s": sum(rates) / len(rates), "wall_s": seconds, "peak_rss_bytes": rss}
    every, cached = results["vit_every_step"], results["cached_features"]
    print(f"# train_throughput {now()} | model: {label} ({stage1}) | machine: {machine()}")
    print(
        f"# stage 1, {args.steps} steps, batch {args.batch_size}, easy-VQA captions ({args.images} images)\n"
    )
    print("| run | samples/s | peak RSS (MiB) | wall (s) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['samples_per_s']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} | {r['wall_s']:.1f} |"
        )
    print(f"| caching pass (once) | - | {cache_rss / 2**20:.0f} | {cache_s:.1f} |")
    print(
        f"\ncached / every step: **{cached['samples_per_s'] / every['samples_per_s']:.2f}x** samples/s, "
        f"{cached['peak_rss_bytes'] / every['peak_rss_bytes']:.2f}x peak memory"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
