"""The training loop shared by every stage: optimizer, schedule, precision, DDP, logging, checkpoints.

A stage supplies a `Task`: an nn.Module whose `forward(batch)` returns named losses (the first, "loss",
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
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from tqdm import tqdm

from training import checkpoint, distributed
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


class _JsonLog:
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

    def __next__(self) -> dict:
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


def _to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def train(task: nn.Module, dataset: Dataset, collate, settings: TrainSettings) -> dict:
    """Run `settings.steps` optimizer steps of `task` on `dataset`; returns the run summary."""
    device = distributed.setup(settings.device)
    seed = settings.seed + distributed.rank()
    torch.manual_seed(seed)
    random.seed(seed)  # image augmentation draws from Python's RNG
    np.random.seed(seed)
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
    step, samples_seen, skipped = 0, 0, 0
    resume_from = checkpoint.latest(ckpt_dir) if settings.resume else None
    if settings.resume and resume_from is None:
        log.info("--resume: no checkpoint in %s yet, starting at step 0", ckpt_dir)
    if resume_from is not None:
        weights, state = checkpoint.load(resume_from)
        missing = set(trainable_state(task)) - set(weights)
        if missing:
            raise ValueError(
                f"{resume_from} lacks trainable weights {sorted(missing)[:3]}...: a different task?"
            )
        task.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, samples_seen, skipped = state["step"], state["samples_seen"], state["skipped"]
        if sampler is not None:
            sampler.epoch, sampler.start = state["epoch"], state["batches_into_epoch"] * settings.batch_size
        resumed_rng = state["rng"]
        log.info("resumed from %s at step %d", resume_from, step)

    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=settings.num_workers,
        drop_last=True,
    )
    model = DistributedDataParallel(task) if distributed.is_distributed() else task
    json_log = _JsonLog(output / "log.jsonl") if distributed.is_main_process() else None
    bar = tqdm(
        total=settings.steps,
        initial=step,
        disable=not (settings.progress and distributed.is_main_process()),
        file=sys.stderr,
        desc=type(task).__name__,
    )
    batches = BatchStream(loader, sampler, settings.batch_size)
    if resume_from is not None:
        checkpoint.set_rng_state(resumed_rng)  # after set-up, so the next batch draws as the killed run would
    first_losses, last_losses = None, None
    empty_steps = 0
    window_start, window_samples = time.perf_counter(), 0
    model.train()
    while step < settings.steps:
        lr = cosine_lr(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        accumulated: dict[str, float] = {}
        step_samples = 0
        for micro in range(settings.grad_accum):
            batch = next(batches)
            skipped += batch["skipped"]
            step_samples += batch["size"]
            if batch["size"] == 0:
                continue
            batch = _to_device(batch, device)
            # DDP all-reduces gradients only on the last micro-batch of an accumulation.
            last = micro == settings.grad_accum - 1
            no_sync = (
                model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext()
            )
            autocast = torch.autocast(device.type, autocast_dtype, enabled=autocast_dtype is not None)
            with no_sync, autocast:
                losses = model(batch)
                scaler.scale(losses["loss"] / settings.grad_accum).backward()
            for name, value in losses.items():
                accumulated[name] = accumulated.get(name, 0.0) + value.item() / settings.grad_accum
            samples_seen += batch["size"] * distributed.world_size()
            window_samples += batch["size"] * distributed.world_size()
        empty_steps = 0 if step_samples else empty_steps + 1
        if empty_steps == EMPTY_STEPS_LIMIT:
            # A few unreadable files are skipped; this many in a row means the data source itself is wrong.
            raise RuntimeError(
                f"{EMPTY_STEPS_LIMIT} steps in a row without one readable sample ({skipped} skipped in all): "
                "check the manifest's image paths or that --features was cached from this manifest; "
                "the warnings above name the files"
            )
        if settings.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable_state(task).values(), settings.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        logged = step % settings.log_every == 0 or step == settings.steps
        if logged or first_losses is None:  # the global mean only where it is reported: one collective less
            accumulated = distributed.all_reduce_mean(accumulated, device)
        first_losses = first_losses or accumulated
        last_losses = accumulated  # the last step is always logged, so the summary's figure is global
        if logged:
            elapsed = time.perf_counter() - window_start
            record = {"step": step, **{k: round(v, 5) for k, v in accumulated.items()}, "lr": lr}
            record |= {"samples_per_s": round(window_samples / elapsed, 2), "skipped": skipped}
            if json_log:
                json_log.write(record)
                bar.set_postfix(loss=f"{accumulated.get('loss', float('nan')):.4f}")
            window_start, window_samples = time.perf_counter(), 0
        if step % settings.save_every == 0 or step == settings.steps:
            if distributed.is_main_process():
                trainer_state = {
                    "step": step,
                    "samples_seen": samples_seen,
                    "skipped": skipped,
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": checkpoint.rng_state(),
                    **batches.state(),
                }
                checkpoint.save(
                    ckpt_dir, step, trainable_state(task), trainer_state, settings.keep_checkpoints
                )
    bar.close()

    summary = {
        "steps": step,
        "samples_seen": samples_seen,
        "skipped_samples": skipped,
        "first_losses": first_losses,
        "last_losses": last_losses,
        "model": str(output / "model"),
        "settings": asdict(settings),
    }
    if distributed.is_main_process():
        task.save_model(output / "model")
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps({"summary": {k: v for k, v in summary.items() if k != "settings"}}), flush=True)
    distributed.teardown()
    return summary
