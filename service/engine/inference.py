"""What one batch does on the model thread: the Runner takes a batch of same-key jobs and hands it to its
generation (service.engine.generation) or its retrieval (service.engine.retrieval), which share the loaded
models and the vision cache.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from service.engine.generation import Generation
from service.engine.jobs import EmbedJob, GenerateJob, GenerationOptions, RetrieveJob
from service.engine.retrieval import Retrieval


class Runner(Generation, Retrieval):
    """Runs one batch of same-key jobs; called by the batcher on its worker thread. Made as Generation is:
    `Runner(models, vision_cache, decoder, cuda_graphs, kv_cache_max_mb)`."""

    def prepare(self, job: GenerateJob | EmbedJob | RetrieveJob) -> None:
        """A job's images -> `job.pixels`, as the processor of the model that reads them makes them (each
        image on its own: the same tensor as in a batch), unless done already. The server calls this at intake
        on a worker thread, so the model thread receives tensors: at BLIP-2's 224 px, a 640 px photo takes ~4 ms
        of resizing and normalising, ~130 ms for a batch of 32, which would otherwise stall the model."""
        if job.pixels is not None:
            return
        match job:
            case GenerateJob():
                images, processor = [job.image], self.models.generation.processor
            case EmbedJob():
                images, processor = job.images, self._retrieval().processor
            case RetrieveJob():
                images = job.candidate_images if job.query_image is None else [job.query_image]
                processor = self._retrieval().processor
        if images:
            job.pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]

    def __call__(self, jobs: list[GenerateJob] | list[EmbedJob] | list[RetrieveJob]) -> list[Any]:
        """One batch of jobs with one batch key (so of one type)."""
        for job in jobs:
            self.prepare(job)
        with torch.inference_mode():
            match jobs[0]:
                case GenerateJob():
                    return self.generate(jobs)
                case EmbedJob():
                    return self.embed(jobs)
                case RetrieveJob():
                    return [self.retrieve(job) for job in jobs]
        raise TypeError(f"no model work for {type(jobs[0]).__name__}")

    def warm_up(self) -> None:
        """One tiny call per model, so the first real request does not pay for lazy initialisation."""
        image = Image.new("RGB", (32, 32), (127, 127, 127))
        with torch.inference_mode():
            if self.models.generation is not None:
                self([GenerateJob(image, "", GenerationOptions(max_new_tokens=2))])
            if self.models.retrieval is not None:
                self([RetrieveJob(None, image, ["a photo"], [], top_k=1)])
