"""Fault campaign scripts that do not fit the test suite (they run for minutes or kill processes).

    python bench/faults.py soak --minutes 3        # steady mixed load: RSS and open fds sampled over time
    python bench/faults.py sigterm                 # SIGTERM under load: every accepted request answered
    python bench/faults.py kill9 --kills 6         # kill -9 at random points of stage 1, then --resume
    python bench/faults.py schema --examples 100   # schemathesis, every check, gallery on, key off and on
    python bench/faults.py poison --rounds 3       # one request with special-token text among 15 ordinary

Each prints its findings and exits non-zero when an expectation fails. The model is the default model when
it exists, else the random tiny-opt preset (printed first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CACHE,
    REPO,
    Server,
    child_env,
    easy_vqa_set,
    machine,
    model_folder,
    now,
    png_b64,
    rss_bytes,
)


def server_env(folder: Path, **extra: str) -> dict[str, str]:
    return {
        "BLIP2_MODEL": str(folder / "generation"),
        "BLIP2_RETRIEVAL_MODEL": str(folder / "stage1"),
        "BLIP2_LOAD_IN_8BIT": "false",
        "BLIP2_MAX_BATCH_SIZE": "16",
        "OMP_NUM_THREADS": "1",
    } | extra


def mixed_bodies(count: int = 128) -> list[tuple[str, dict]]:
    corpus = easy_vqa_set(count)
    bodies = []
    for n, (png, question, _) in enumerate(corpus):
        image = png_b64(png)
        bodies.append(
            [
                ("/caption", {"image": image}),
                ("/vqa", {"image": image, "question": question}),
                ("/embed", {"images": [image], "texts": [question]}),
                ("/retrieve", {"image": image, "texts": ["a red circle", "a blue square", question]}),
            ][n % 4]
        )
    return bodies


def proc_sample(pid: int) -> tuple[int, int]:
    """(resident bytes, open file descriptors) of a process."""
    return rss_bytes(pid), len(os.listdir(f"/proc/{pid}/fd"))


# -- soak ------------------------------------------------------------------------------------------
async def soak_load(url: str, bodies, concurrency: int, seconds: float, pid: int, every_s: float) -> dict:
    codes: dict[str, int] = {}
    samples: list[tuple[float, int, int]] = []
    stop = time.monotonic() + seconds
    started = time.monotonic()

    async def worker(index: int) -> None:
        # A fresh connection now and then, as real clients do: fds must come back.
        n = index
        while time.monotonic() < stop:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                for _ in range(20):
                    if time.monotonic() >= stop:
                        break
                    path, body = bodies[n % len(bodies)]
                    n += concurrency
                    try:
                        status = str((await client.post(path, json=body)).status_code)
                    except httpx.HTTPError as exc:
                        status = type(exc).__name__
                    codes[status] = codes.get(status, 0) + 1

    async def sampler() -> None:
        while time.monotonic() < stop:
            rss, fds = proc_sample(pid)
            samples.append((time.monotonic() - started, rss, fds))
            await asyncio.sleep(every_s)

    await asyncio.gather(sampler(), *(worker(i) for i in range(concurrency)))
    return {"codes": codes, "samples": samples}


def soak(args, folder: Path) -> int:
    with Server(server_env(folder)) as server:
        pid = server.process.pid
        idle = proc_sample(pid)
        result = asyncio.run(
            soak_load(server.url, mixed_bodies(), args.concurrency, args.minutes * 60, pid, args.every_s)
        )
        after = proc_sample(pid)
    samples = result["samples"]
    warm = samples[len(samples) // 4]  # after the first quarter: allocator and caches warmed up
    last = samples[-1]
    peak_rss = max(s[1] for s in samples)
    total = sum(result["codes"].values())
    print(
        f"soak: {args.minutes} min, {args.concurrency} clients, mixed /caption /vqa /embed /retrieve, {total} requests"
    )
    print(f"status codes: {result['codes']}")
    print("| t (s) | RSS (MiB) | open fds |\n|---|---|---|")
    step = max(1, len(samples) // 12)
    for t, rss, fds in samples[::step] + [last]:
        print(f"| {t:.0f} | {rss / 2**20:.1f} | {fds} |")
    growth = (last[1] - warm[1]) / 2**20
    print(
        f"idle before load: {idle[0] / 2**20:.1f} MiB, {idle[1]} fds; after load: {after[0] / 2**20:.1f} MiB, "
        f"{after[1]} fds; peak {peak_rss / 2**20:.1f} MiB; RSS growth from t={warm[0]:.0f}s to the end: {growth:+.1f} MiB"
    )
    ok = set(result["codes"]) == {"200"} and after[1] <= idle[1] + 2 and growth < 0.1 * warm[1] / 2**20
    print("PASS" if ok else "FAIL: errors, leaked fds or RSS growth over 10% after warm-up")
    return 0 if ok else 1


# -- SIGTERM under load ----------------------------------------------------------------------------
async def sigterm_load(server: Server, bodies, concurrency: int, after_requests: int) -> dict:
    outcomes: dict[str, int] = {}
    done = 0
    signalled_at: float | None = None
    in_flight_at_signal = 0
    in_flight = 0

    async def worker(index: int) -> None:
        nonlocal done, in_flight
        n = index
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            while server.process.poll() is None:
                path, body = bodies[n % len(bodies)]
                n += concurrency
                sent_after = signalled_at is not None
                in_flight += 1
                try:
                    response = await client.post(path, json=body)
                    kind = str(response.status_code)
                    if response.status_code == 503:
                        kind = f"503 {response.json()['error']['message']!r}"
                        if "Retry-After" not in response.headers:
                            kind = "503 without Retry-After"
                except httpx.ConnectError:
                    kind = "refused (listener closed)"
                except (httpx.ReadError, httpx.RemoteProtocolError) as exc:
                    # After the drain, uvicorn closes every connection with no request in progress: a request
                    # still on its way in is reset, never processed. Before SIGTERM this would be a cut-off.
                    name = type(exc).__name__
                    kind = f"reset at the final close: {name}" if sent_after else f"CUT OFF: {name}"
                except httpx.HTTPError as exc:
                    kind = f"CUT OFF: {type(exc).__name__}"
                finally:
                    in_flight -= 1
                key = f"{kind} ({'sent after' if sent_after else 'sent before'} SIGTERM)"
                outcomes[key] = outcomes.get(key, 0) + 1
                done += 1
                if kind.startswith("refused"):
                    return

    async def trigger() -> None:
        nonlocal signalled_at, in_flight_at_signal
        while done < after_requests:
            await asyncio.sleep(0.01)
        in_flight_at_signal = in_flight
        signalled_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)

    await asyncio.gather(trigger(), *(worker(i) for i in range(concurrency)))
    return {"outcomes": outcomes, "in_flight_at_signal": in_flight_at_signal}


def sigterm(args, folder: Path) -> int:
    server = Server(server_env(folder)).wait_ready()
    try:
        result = asyncio.run(sigterm_load(server, mixed_bodies(), args.concurrency, args.after))
        code = server.process.wait(120)
    finally:
        server.stop()
    print(
        f"sigterm: {args.concurrency} clients looping over mixed routes; SIGTERM after {args.after} answers"
    )
    print(
        f"requests in flight when SIGTERM was sent: {result['in_flight_at_signal']}; server exit code {code}"
    )
    for key, count in sorted(result["outcomes"].items()):
        print(f"  {count:5d}  {key}")
    outcomes = result["outcomes"]
    bad = [k for k in outcomes if "CUT OFF" in k or "without Retry-After" in k]
    bad += [k for k in outcomes if k[0] == "5" and not k.startswith("503")]
    bad += [k for k in outcomes if "sent before" in k and not k.startswith(("200", "503"))]
    ok = not bad and code == 0
    print("PASS" if ok else f"FAIL: {bad or 'exit code'}")
    return 0 if ok else 1


# -- kill -9 during stage 1 ------------------------------------------------------------------------
def stage1_cmd(stage1: Path, manifest: Path, output: Path, steps: int, resume: bool) -> list[str]:
    return [sys.executable, "-m", "training.cli", "stage1", "--init", str(stage1), "--train-manifest", str(manifest),
            "--output", str(output), "--steps", str(steps), "--batch-size", "8", "--save-every", "3",
            "--log-every", "3", "--warmup-steps", "5", "--no-progress", "--lr", "3e-4",
            "--resume" if resume else "--no-resume"]  # fmt: skip


def check_checkpoints(folder: Path) -> list[str]:
    """Every checkpoint folder must load completely; returns the problems."""
    from training import checkpoint

    problems = []
    if not folder.exists():
        return problems  # killed before its first checkpoint: a resume starts from step 0
    for step_dir in sorted(folder.glob("step-*")):
        try:
            _, state = checkpoint.load(step_dir)  # as --resume reads it
            if f"step-{state['step']:08d}" != step_dir.name:
                problems.append(f"{step_dir.name}: holds step {state['step']}")
        except Exception as exc:
            problems.append(f"{step_dir.name}: {type(exc).__name__}: {exc}")
    pointer = folder / checkpoint.LATEST
    if pointer.exists():
        target = folder / pointer.read_text().strip()
        if not (target / "trainable.safetensors").exists():
            problems.append(f"latest points to {target.name}, which is incomplete")
    # Temporary (dot) entries of a write the kill interrupted are never read; anything else would be.
    stray = [
        p.name
        for p in folder.iterdir()
        if not p.name.startswith(("step-", ".")) and p.name != checkpoint.LATEST
    ]
    if stray:
        problems.append(f"unexpected entries: {stray}")
    return problems


def compare_weights(a: Path, b: Path) -> float:
    """Largest absolute difference between the tensors of two saved models (inf if they differ in names)."""
    from safetensors.torch import load_file

    worst = 0.0
    for file in sorted(a.glob("*.safetensors")):
        left, right = load_file(file), load_file(b / file.name)
        if left.keys() != right.keys():
            return float("inf")
        for name, tensor in left.items():
            worst = max(worst, (tensor.float() - right[name].float()).abs().max().item())
    return worst


def latest_step(folder: Path) -> int:
    return max((int(p.name.split("-")[1]) for p in folder.glob("step-*")), default=0)


def wait_for_kill_point(process: subprocess.Popen, folder: Path, target: int | None, moment: float) -> bool:
    """Wait until checkpoint `target` exists (if given), then `moment` seconds; False if the run ended first."""
    while target is not None and latest_step(folder) < target:
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    try:
        process.wait(moment)
        return False
    except subprocess.TimeoutExpired:
        return True


def kill9(args, folder: Path) -> int:
    work = CACHE / "kill9"
    shutil.rmtree(work, ignore_errors=True)
    env = child_env(OMP_NUM_THREADS="1")
    data = work / "easy-vqa"
    subprocess.run([sys.executable, "-m", "training.cli", "data", "easy-vqa", "--output", str(data), "--splits",
                    "train", "--limit-images", "200"], env=env, check=True, capture_output=True)  # fmt: skip
    manifest, stage1 = data / "captions_train.jsonl", folder / "stage1"
    started = time.monotonic()
    subprocess.run(stage1_cmd(stage1, manifest, work / "reference", args.steps, False), env=env, check=True,
                   capture_output=True)  # fmt: skip
    reference_s = time.monotonic() - started
    rng = random.Random(args.seed)
    run_dir, kills, problems = work / "killed", 0, []
    log = []
    while True:
        process = subprocess.Popen(stage1_cmd(stage1, manifest, run_dir, args.steps, True), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        if kills < args.kills:
            done = latest_step(run_dir / "checkpoints")
            if kills == 0 or done + 3 >= args.steps:
                # A random moment of the run, start-up included.
                target, moment = None, rng.uniform(0.1, 0.6) * reference_s
            else:
                # A random moment just after a random later checkpoint: inside training or inside the next
                # checkpoint's write.
                target, moment = rng.randrange(done + 3, args.steps, 3), rng.uniform(0.0, 0.8)
            if wait_for_kill_point(process, run_dir / "checkpoints", target, moment):
                process.send_signal(signal.SIGKILL)
                process.wait()
                kills += 1
                found = check_checkpoints(run_dir / "checkpoints")
                problems += found
                steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
                where = f"{moment:.2f} s after step {target}" if target else f"{moment:.1f} s after start"
                log.append(f"kill {kills} {where}: checkpoints {steps[-2:]} {'OK' if not found else found}")
                continue
        if process.wait() != 0:
            problems.append(f"resumed run exited {process.returncode}")
        break
    summary = json.loads((run_dir / "summary.json").read_text())
    reference = json.loads((work / "reference" / "summary.json").read_text())
    final = summary["last_losses"]
    if final is None:
        # The last run resumed from the final checkpoint and ran no step, so its summary has no losses
        # (the checkpoint does not carry them): take the killed run's last logged step instead.
        rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
        last = [row for row in rows if row.get("step") == args.steps][-1]
        final = {k: last[k] for k in reference["last_losses"]}
        problems_note = (
            "summary.json of the last resume holds no losses (it ran no step); losses from log.jsonl"
        )
    else:
        problems_note = ""
    weights = compare_weights(work / "reference" / "model", run_dir / "model")
    print(
        f"kill9: stage 1, {args.steps} steps, checkpoint every 3 steps; uninterrupted run {reference_s:.1f} s"
    )
    for line in log:
        print("  " + line)
    print(f"final steps: killed+resumed {summary['steps']} vs uninterrupted {reference['steps']}")
    print(f"final losses: killed+resumed {final}")
    print(f"              uninterrupted  {reference['last_losses']}")
    if problems_note:
        print(f"note: {problems_note}")
    print(f"final weights vs uninterrupted: largest difference {weights:.3g}")
    difference = abs(final["loss"] - reference["last_losses"]["loss"])
    ok = (
        not problems
        and summary["steps"] == reference["steps"] == args.steps
        and difference < 0.05 * reference["last_losses"]["loss"]
    )
    print(f"|loss difference| = {difference:.5f}; problems: {problems or 'none'}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


# -- schemathesis ----------------------------------------------------------------------------------
HOOKS = REPO / "tests" / "service"  # schemathesis_hooks.py: real images where the document asks for one
SCHEMA_KEY = "faults-schema-key"
# As tests/service/test_openapi.py: text bounds that keep every allowed prompt within the model's positions.
SCHEMA_ENV = {
    "BLIP2_MAX_PROMPT_CHARS": "4",
    "BLIP2_MAX_NEW_TOKENS_LIMIT": "32",
    "BLIP2_MAX_QUEUE_SIZE": "256",
}


def schema(args, folder: Path) -> int:
    """schemathesis with every check against a server with a gallery, API key off then on: 0 failures wanted."""
    exe = Path(sys.executable).parent / "schemathesis"
    if not exe.exists():
        print("schemathesis is not installed: pip install -e '.[test]'")
        return 2
    worst = 0
    for key in (None, SCHEMA_KEY):
        gallery = CACHE / f"schema-gallery-{os.getpid()}"
        shutil.rmtree(gallery, ignore_errors=True)
        env = server_env(folder, **SCHEMA_ENV, BLIP2_GALLERY_DIR=str(gallery)) | (
            {"BLIP2_API_KEY": key} if key else {}
        )
        auth = ["-H", f"Authorization: Bearer {key}"] if key else []
        with Server(env) as server:
            done = subprocess.run(
                [str(exe), "run", f"{server.url}/openapi.json", "--checks", "all", "--seed", str(args.seed),
                 "--max-examples", str(args.examples), "--workers", "1", "--request-timeout", "120",
                 "--no-color", "--generation-database", "none", *auth],
                capture_output=True, text=True, timeout=args.limit_s, cwd=CACHE,
                env=os.environ | {"SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": str(HOOKS)},
            )  # fmt: skip
        shutil.rmtree(gallery, ignore_errors=True)
        summary = [
            line for line in done.stdout.splitlines() if " generated, " in line or line.startswith("=")
        ]
        failures = done.stdout[done.stdout.find("=== FAILURES") :] if done.returncode else ""
        # lines cut short: a case's base64 image would fill the screen
        print("\n".join(line[:300] for line in failures.splitlines()) or "\n".join(summary[-2:]))
        print(f"api key {'on' if key else 'off'}: schemathesis exit code {done.returncode}")
        worst = max(worst, done.returncode)
    return worst


# -- one poisoned request among ordinary ones ------------------------------------------------------
POISON = "<image> </s> <s> <pad> <unk> [SEP] [CLS] [DEC] [MASK] <image>"
POISONED_AT = 7  # its place among the 16 requests of a round


def route_body(route: str, image: str, text: str, other: str) -> dict:
    """A request of `route` about one image, `text` as its prompt, question, chat turn or search text."""
    url = f"data:image/png;base64,{image}"
    return {
        "/caption": {"image": image, "prompt": text},
        "/vqa": {"image": image, "question": text},
        "/generate": {"image": image, "prompt": text, "max_new_tokens": 8},
        "/v1/chat/completions": {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": text},
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                }
            ],  # fmt: skip
            "max_tokens": 8,
        },
        "/embed": {"images": [image], "texts": [text]},
        "/retrieve": {"text": text, "images": [image, other]},
    }[route]


def same_answer(a, b) -> bool:
    """Equal JSON answers, floats within 1e-5 (batched and alone matmuls differ in the last bits), ids and
    timestamps aside."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, abs_tol=1e-5)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_answer(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        keys = a.keys() - {"id", "created"}
        return keys == b.keys() - {"id", "created"} and all(same_answer(a[k], b[k]) for k in keys)
    return a == b


def poison(args, folder: Path) -> int:
    """Per route and round: 15 ordinary requests and one whose text spells special tokens, sent at once
    (they share batches). Before issue 11, `<image>` in one /vqa question failed 5-9 of the 15 others."""
    corpus = easy_vqa_set(16)
    other = png_b64(corpus.pop()[0])  # the second candidate image of /retrieve
    routes = ["/caption", "/vqa", "/generate", "/v1/chat/completions", "/embed", "/retrieve"]
    failed = changed = 0
    with Server(server_env(folder)) as server, httpx.Client(base_url=server.url, timeout=300) as client:
        alone = {}
        for route in routes:
            for n, (png, question, _) in enumerate(corpus):
                response = client.post(route, json=route_body(route, png_b64(png), question, other))
                alone[route, n] = response.json() if response.status_code == 200 else None

        async def one_round(route: str) -> list[httpx.Response]:
            bodies = [route_body(route, png_b64(png), question, other) for png, question, _ in corpus]
            poisoned = route_body(route, png_b64(corpus[0][0]), f"what is {POISON}?", other)
            bodies.insert(POISONED_AT, poisoned)
            async with httpx.AsyncClient(base_url=server.url, timeout=300) as batch_client:
                return await asyncio.gather(*(batch_client.post(route, json=body) for body in bodies))

        print(
            "| route | round | innocent 200 | innocent failed | innocent answer changed | poisoned request |"
        )
        print("|---|---|---|---|---|---|")
        for route in routes:
            for round_ in range(args.rounds):
                responses = asyncio.run(one_round(route))
                poisoned = responses.pop(POISONED_AT)
                bad = sum(r.status_code != 200 for r in responses)
                moved = sum(
                    r.status_code == 200 and not same_answer(r.json(), alone[route, n])
                    for n, r in enumerate(responses)
                )
                failed, changed = failed + bad, changed + moved
                print(
                    f"| {route} | {round_ + 1} | {len(responses) - bad} | {bad} | {moved} | {poisoned.status_code} |"
                )
        metrics = client.get("/metrics").text
    isolations = [line for line in metrics.splitlines() if line.startswith("blip2_batch_isolations_total")]
    print(f"innocent requests failed: {failed}; innocent answers that differ from alone: {changed}")
    print(f"server: {isolations[0] if isolations else 'no isolation counter'}")
    ok = failed == 0 and changed == 0
    print("PASS" if ok else "FAIL: an ordinary request failed or changed because of another")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="auto")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("soak")
    p.add_argument("--minutes", type=float, default=3)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--every-s", type=float, default=5)
    p = sub.add_parser("sigterm")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--after", type=int, default=40, help="answers before the SIGTERM")
    p = sub.add_parser("kill9")
    p.add_argument("--kills", type=int, default=6)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=7)
    p = sub.add_parser("schema")
    p.add_argument("--examples", type=int, default=100, help="examples per operation")
    p.add_argument("--seed", type=int, default=24)
    p.add_argument("--limit-s", type=float, default=900)
    p = sub.add_parser("poison")
    p.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    folder, label = model_folder(args.model)
    print(f"# faults {args.command} {now()} | model: {label} ({folder}) | machine: {machine()}")
    commands = {"soak": soak, "sigterm": sigterm, "kill9": kill9, "schema": schema, "poison": poison}
    return commands[args.command](args, folder)


if __name__ == "__main__":
    sys.exit(main())
