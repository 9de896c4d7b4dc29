"""The training loop shared by every stage: optimizer, schedule, precision, DDP, logging, checkpoints.

A stage supplies a `Task`: an nn.Module whose `forward(batch)` (a `training.batch.Batch`) returns named losses (the first, "loss",
is optimised), whose trainable parameters are the only ones with `requires_grad`, and which can
`save_model(folder)` in the transformers format. The same loop runs in one plain process or under
torchrun (DDP), with no code change.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from tqdm import tqdm

from training import checkpoint, distributed
from training.batch import Batch
from training.settings import TrainSettings

log = logging.getLogger(__name__)
EMPTY_STEPS_LIMIT = 20  # optimizer steps in a row with no readable sample before the run stops


class ResumableSampler(Sampler[int]):
    """Shuffles each epoch from (seed, epoch), gives each rank its slice, and can start mid-epoch."""

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.start = 0, 0

    def _indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        world, rank = distributed.world_size(), distributed.rank()
        per_rank = self.size // world  # equal counts per rank keep DDP steps in lock-step
        return order[rank * per_rank : (rank + 1) * per_rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return self.size // distributed.world_size() - self.start


def cosine_lr(step: int, s: TrainSettings) -> float:
    if step < s.warmup_steps:
        return s.warmup_lr + (s.lr - s.warmup_lr) * step / max(1, s.warmup_steps)
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def trainable_state(task: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in task.named_parameters() if p.requires_grad}


def _param_groups(task: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in task.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class JsonLog:
    """JSON lines, each printed and appended to a file (a resumed run continues its log)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        with open(self.path, "a") as handle:
            handle.write(line + "\n")


class BatchStream:
    """Endless batches: each epoch reshuffles, and a resumed run continues mid-epoch where it stopped.

    An IterableDataset (WebDataset shards) cannot seek: a resumed run restarts its stream.
    """

    def __init__(self, loader: DataLoader, sampler: ResumableSampler | None, batch_size: int) -> None:
        self.loader, self.sampler = loader, sampler
        self.batches_into_epoch = sampler.start // batch_size if sampler else 0
        self._iterator = iter(loader)

    def __next__(self) -> Batch:
        for _ in range(2):
            try:
                batch = next(self._iterator)
            except StopIteration:
                if self.sampler is not None:
                    self.sampler.epoch, self.sampler.start = self.sampler.epoch + 1, 0
                self.batches_into_epoch = 0
                self._iterator = iter(self.loader)
                continue
            self.batches_into_epoch += 1
            return batch
        raise ValueError("the dataset yields no full batch: fewer samples per process than batch_size")

    def state(self) -> dict:
        return {
            "epoch": self.sampler.epoch if self.sampler else 0,
            "batches_into_epoch": self.batches_into_epoch,
        }


@dataclass
class TrainState:
    """How far a run has come: with the weights, the optimizer, the RNG and the data position, what a
    checkpoint holds so that a resumed run goes on exactly as the killed one would have."""

    step: int = 0
    samples_seen: int = 0
    skipped: int = 0


def _resume(
    path: Path, task: nn.Module, optimizer, scaler, sampler: ResumableSampler | None, batch_size: int
) -> tuple[TrainState, dict]:
    """Load a checkpoint into the task, optimizer and scaler, and put the sampler where the run stopped.
    Returns the run's state and its RNG state, which the caller restores only once set-up is done (making
    the DataLoader's iterator draws random numbers)."""
    weights, saved = checkpoint.load(path)
    missing = set(trainable_state(task)) - set(weights)
    if missing:
        raise ValueError(f"{path} lacks trainable weights {sorted(missing)[:3]}...: a different task?")
    task.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    scaler.load_state_dict(saved["scaler"])
    if sampler is not None:
        sampler.epoch, sampler.start = saved["epoch"], saved["batches_into_epoch"] * batch_size
    log.info("resumed from %s at step %d", path, saved["step"])
    return TrainState(saved["step"], saved["samples_seen"], saved["skipped"]), saved["rng"]


def _save_checkpoint(
    folder: Path, task: nn.Module, state: TrainState, optimizer, scaler, batches: BatchStream, keep: int
) -> None:
    saved = {**asdict(state), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}
    saved |= {"rng": checkpoint.rng_state(), **batches.state()}
    checkpoint.save(folder, state.step, trainable_state(task), saved, keep)


def _accumulate(
    model: nn.Module,
    batches: BatchStream,
    scaler,
    state: TrainState,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    grad_accum: int,
) -> tuple[dict[str, float], int]:
    """Forward and (scaled) backward over one optimizer step's micro-batches. Returns each loss averaged
    over them, and how many samples they held in this process (0: none could be read)."""
    accumulated: dict[str, float] = {}
    step_samples = 0
    for micro in range(grad_accum):
        batch = next(batches)
        state.skipped += batch.skipped
        step_samples += batch.size
        if batch.size == 0:
            continue
        batch = batch.to(device)
        # DDP all-reduces gradients only on the last micro-batch of an accumulation.
        last = micro == grad_accum - 1
        no_sync = (
            model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext()
        )
        autocast = torch.autocast(device.type, autocast_dtype, enabled=autocast_dtype is not None)
        with no_sync, autocast:
            losses = model(batch)
            scaler.scale(losses["loss"] / grad_accum).backward()
        for name, value in losses.items():
            accumulated[name] = accumulated.get(name, 0.0) + value.item() / grad_accum
        state.samples_seen += batch.size * distributed.world_size()
    return accumulated, step_samples


def _optimizer_step(task: nn.Module, optimizer, scaler, max_grad_norm: float) -> None:
    if max_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable_state(task).values(), max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


class _Report:
    """The progress bar and the JSON log: at every `log_every`-th step and the last, the losses averaged over
    ranks and the throughput since the line before; the first and the last losses, for the summary."""

    def __init__(self, settings: TrainSettings, state: TrainState, name: str, device: torch.device) -> None:
        main = distributed.is_main_process()
        self.settings, self.device = settings, device
        self.json_log = JsonLog(Path(settings.output) / "log.jsonl") if main else None
        self.bar = tqdm(
            total=settings.steps,
            initial=state.step,
            disable=not (settings.progress and main),
            file=sys.stderr,
            desc=name,
        )
        self.first_losses: dict[str, float] | None = None
        self.last_losses: dict[str, float] | None = None
        self.window_start, self.window_samples = time.perf_counter(), state.samples_seen

    def step(self, state: TrainState, losses: dict[str, float], lr: float) -> None:
        self.bar.update(1)
        logged = state.step % self.settings.log_every == 0 or state.step == self.settings.steps
        # The global mean only where it is reported (and for the summary's first figure): one collective less.
        if logged or self.first_losses is None:
            losses = distributed.all_reduce_mean(losses, self.device)
        self.first_losses = self.first_losses or losses
        self.last_losses = losses  # the last step is always logged, so the summary's figure is global
        if not logged:
            return
        elapsed = time.perf_counter() - self.window_start
        throughput = (state.samples_seen - self.window_samples) / elapsed
        record = {"step": state.step, **{k: round(v, 5) for k, v in losses.items()}, "lr": lr}
        record |= {"samples_per_s": round(throughput, 2), "skipped": state.skipped}
        if self.json_log:
            self.json_log.write(record)
            self.bar.set_postfix(loss=f"{losses.get('loss', float('nan')):.4f}")
        self.window_start, self.window_samples = time.perf_counter(), state.samples_seen


def _seed(seed: int) -> None:
    """Seeds every RNG a step draws from: torch's, Python's (image augmentation) and numpy's."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _summary(state: TrainState, report: _Report, output: Path, settings: TrainSettings) -> dict:
    """The run's summary.json: how far it went, its first and last losses, where the model is."""
    return {
        "steps": state.step,
        "samples_seen": state.samples_seen,
        "skipped_samples": state.skipped,
        "first_losses": report.first_losses,
        "last_losses": report.last_losses,
        "model": str(output / "model"),
        "settings": asdict(settings),
    }


def train(task: nn.Module, dataset: Dataset, collate, settings: TrainSettings) -> dict:
    """Run `settings.steps` optimizer steps of `task` on `dataset`; returns the run summary."""
    device = distributed.setup(settings.device)
    _seed(settings.seed + distributed.rank())
    output = Path(settings.output)
    ckpt_dir = output / "checkpoints"
    if distributed.is_main_process():
        output.mkdir(parents=True, exist_ok=True)
    task.to(device)
    task.prepare_for_device(device, settings)
    optimizer = torch.optim.AdamW(
        _param_groups(task, settings.weight_decay), lr=settings.lr, betas=(settings.beta1, settings.beta2)
    )
    autocast_dtype = _autocast_dtype(settings.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    sampler = None if isinstance(dataset, IterableDataset) else ResumableSampler(len(dataset), settings.seed)
    state, resumed_rng = TrainState(), None
    resume_from = checkpoint.latest(ckpt_dir) if settings.resume else None
    if settings.resume and resume_from is None:
        log.info("--resume: no checkpoint in %s yet, starting at step 0", ckpt_dir)
    if resume_from is not None:
        state, resumed_rng = _resume(resume_from, task, optimizer, scaler, sampler, settings.batch_size)

    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=settings.num_workers,
        drop_last=True,
    )
    model = DistributedDataParallel(task) if distributed.is_distributed() else task
    batches = BatchStream(loader, sampler, settings.batch_size)
    if resumed_rng is not None:
        checkpoint.set_rng_state(resumed_rng)  # after set-up, so the next batch draws as the killed run would
    report = _Report(settings, state, type(task).__name__, device)
    empty_steps = 0
    model.train()
    while state.step < settings.steps:
        lr = cosine_lr(state.step, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses, step_samples = _accumulate(
            model, batches, scaler, state, device, autocast_dtype, settings.grad_accum
        )
        empty_steps = 0 if step_samples else empty_steps + 1
        if empty_steps == EMPTY_STEPS_LIMIT:
            # A few unreadable files are skipped; this many in a row means the data source itself is wrong.
            raise RuntimeError(
                f"{EMPTY_STEPS_LIMIT} steps in a row without one readable sample ({state.skipped} skipped in "
                "all): check the manifest's image paths or that --features was cached from this manifest; "
                "the warnings above name the files"
            )
        _optimizer_step(task, optimizer, scaler, settings.max_grad_norm)
        state.step += 1
        report.step(state, losses, lr)
        saving = state.step % settings.save_every == 0 or state.step == settings.steps
        if saving and distributed.is_main_process():
            _save_checkpoint(ckpt_dir, task, state, optimizer, scaler, batches, settings.keep_checkpoints)
    report.bar.close()

    summary = _summary(state, report, output, settings)
    if distributed.is_main_process():
        task.save_model(output / "model")
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps({"summary": {k: v for k, v in summary.items() if k != "settings"}}), flush=True)
    del model, batches, loader  # the DDP wrapper goes before the process group (see distributed.teardown)
    distributed.teardown()
    return summary
