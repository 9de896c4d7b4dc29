"""The runner's generation: one batch of generate jobs on the model thread, and the prompt's tokens for the
event loop.

Generation follows the checkpoint class's own `generate` step by step, starting from ViT states so that
they can come from the vision cache (a test checks the answers equal plain transformers').
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from service.engine.batching import InvalidInput
from service.engine.decoding import FastDecoder, graph_blocker, unsupported
from service.engine.jobs import Generated, GenerateJob, GenerationOptions
from service.engine.loading import GenerationModel, LoadedModels
from service.engine.prompts import Prompt
from service.engine.vision import ModelsOnDevice, VisionCache, to_device

log = logging.getLogger("service.inference")  # the runner's name in the log, as before it was split


class RowStreamer(BaseStreamer):
    """Hands each row of a batched `generate` its new token, as transformers produces them step by step.

    A batch that failed runs again in halves (the batcher isolates the request at fault), so a job may have
    streamed tokens already: a re-run passes on only what comes after them. Where the re-run disagrees
    with what was sent (sampling draws anew), that row's stream ends; its final answer tells the rest."""

    def __init__(self, jobs: list[GenerateJob], eos: set[int]) -> None:
        self.jobs, self.eos = jobs, eos
        self.position = [0] * len(jobs)
        self.ended = [job.on_token is None for job in jobs]
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt (or the decoder's start token)
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.jobs), -1)[:, -1].tolist()):
            if self.ended[row]:
                continue
            job, position = self.jobs[row], self.position[row]
            self.position[row] += 1
            if token in self.eos:  # after it, a finished row only receives padding
                self.ended[row] = True
            elif position < len(job.streamed):
                self.ended[row] = job.streamed[position] != token
            else:
                job.streamed.append(token)
                job.on_token(token)

    def end(self) -> None:
        self.ended = [True] * len(self.jobs)


@dataclass(frozen=True)
class PromptIds:
    """A prompt's token ids: the LLM's (with its tokenizer's own bos/eos) and, for InstructBLIP, the
    Q-Former's (its BERT tokenizer's)."""

    llm: tuple[int, ...]
    qformer: tuple[int, ...] | None


class Generation(ModelsOnDevice):
    """Generation with the loaded generation model: `generate` runs a batch; `prompt_tokens` and `decode`
    serve the event loop (under a lock, with tokenizers of their own)."""

    def __init__(
        self,
        models: LoadedModels,
        vision_cache: VisionCache | None = None,
        decoder: str = "fast",
        cuda_graphs: bool = False,
        kv_cache_max_mb: int | None = None,
    ) -> None:
        """`kv_cache_max_mb`: the most the fast decoder keeps between batches for its KV cache (None: no cap)."""
        super().__init__(models, vision_cache)
        # Tokenizer copies for prompt_ids and decode, which run on the event loop and on the model thread
        # (see _prompt_ids), used under this lock; the model thread pads batches with the models' own.
        self._private_tokenizers: tuple[Any, Any] | None = None
        self._private_lock = threading.Lock()
        # Once per distinct prompt, by whichever thread asks first (every /caption sends the same prompt):
        # the event loop counts a request's tokens with it, then its batch reuses the ids.
        self.prompt_ids = functools.lru_cache(maxsize=4096)(self._prompt_ids)
        arena_max_bytes = None if kv_cache_max_mb is None else kv_cache_max_mb * 2**20
        self.fast_decoder = (
            self._fast_decoder(models.generation, cuda_graphs, arena_max_bytes) if decoder == "fast" else None
        )

    @staticmethod
    def _fast_decoder(
        gen: GenerationModel | None, cuda_graphs: bool, arena_max_bytes: int | None = None
    ) -> FastDecoder | None:
        if gen is None or gen.is_encoder_decoder:
            return None
        llm = gen.model.language_model
        reason = unsupported(llm)
        if reason is not None:
            log.info("generation uses transformers' generate(): %s", reason)
            return None
        if cuda_graphs and (blocker := graph_blocker(llm)) is not None:
            log.warning("decode steps are not captured in CUDA graphs: %s", blocker)
            cuda_graphs = False
        if cuda_graphs and llm.device.type != "cuda":
            log.warning("--cuda-graphs on %s: fixed-shape decode steps without graphs (slower)", llm.device)
        return FastDecoder(llm, fixed_shapes=cuda_graphs, arena_max_bytes=arena_max_bytes)

    def generate(self, jobs: list[GenerateJob]) -> list[Generated | InvalidInput]:
        """One `generate` for the jobs that can run (all with the same options); a job whose input cannot
        (its own fault) gets an InvalidInput in its place, and the others their answers."""
        gen, options = self.models.generation, jobs[0].options
        prompts = [self.prompt_ids(job.prompt) for job in jobs]
        problems = [self._prompt_problem(gen, prompt.qformer) for prompt in prompts]
        runnable = [n for n, problem in enumerate(problems) if problem is None]
        answers = iter(
            self._generate_halving(gen, options, [jobs[n] for n in runnable], [prompts[n] for n in runnable])
            if runnable
            else []
        )
        return [InvalidInput(problem) if problem else next(answers) for problem in problems]

    @staticmethod
    def _prompt_problem(gen: GenerationModel, qformer_ids: tuple[int, ...] | None) -> str | None:
        """The Q-Former reads the prompt within its position embeddings."""
        limit = gen.model.config.qformer_config.max_position_embeddings
        if qformer_ids is None or len(qformer_ids) <= limit:
            return None
        return f"the prompt is {len(qformer_ids)} tokens for the Q-Former, which reads at most {limit}"

    def _generate_halving(
        self,
        gen: GenerationModel,
        options: GenerationOptions,
        jobs: list[GenerateJob],
        prompts: list[PromptIds],
    ) -> list[Generated | torch.cuda.OutOfMemoryError]:
        """`_generate_batch`, and on CUDA out of memory: the memory the decoder keeps is freed, the allocator's
        cache emptied, and the batch runs again in halves, down to one request, which alone then gets the error
        (the batcher hands a result that is an exception to its request only)."""
        try:
            return self._generate_batch(gen, options, jobs, prompts)
        except torch.cuda.OutOfMemoryError as exc:
            # Without its traceback, the error no longer holds the failed batch's tensors.
            error = exc.with_traceback(None)
        self.release_memory()
        if len(jobs) == 1:
            log.error("out of GPU memory for one request alone: %s", error)
            return [error]
        log.warning("out of GPU memory at a batch of %d: running its halves", len(jobs))
        half = len(jobs) // 2
        return self._generate_halving(gen, options, jobs[:half], prompts[:half]) + self._generate_halving(
            gen, options, jobs[half:], prompts[half:]
        )

    def release_memory(self) -> None:
        """Give back what the decoder keeps between batches, and on a GPU the allocator's cached blocks."""
        if self.fast_decoder is not None:
            self.fast_decoder.release_memory()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _generate_batch(
        self,
        gen: GenerationModel,
        options: GenerationOptions,
        jobs: list[GenerateJob],
        prompts: list[PromptIds],
    ) -> list[Generated]:
        inputs = self._encode(gen, prompts)
        pixels = torch.cat([job.pixels for job in jobs])
        inputs = {k: to_device(v, self.models.device) for k, v in inputs.items()}
        states = self.vision_states(gen.model.vision_model, pixels)
        streamer = RowStreamer(jobs, gen.eos_token_ids) if any(job.on_token for job in jobs) else None
        output = self._generate(gen, states, inputs, options, streamer)
        return [self._decoded(gen, row, options) for row in output.cpu()]

    @staticmethod
    def _encode(gen: GenerationModel, prompts: list[PromptIds]) -> dict[str, torch.Tensor]:
        """The token inputs the model's processor makes (query placeholders first, then the prompt with the
        tokenizer's own bos/eos), padded as its tokenizers pad a batch; the prompts' ids are `prompt_ids`'."""
        text = gen.processor.tokenizer.pad(
            {"input_ids": [list(prompt.llm) for prompt in prompts]}, padding=True, return_tensors="pt"
        )
        placeholders = torch.full(
            (len(prompts), gen.model.config.num_query_tokens), gen.model.config.image_token_id
        )
        inputs = {
            "input_ids": torch.cat([placeholders, text["input_ids"]], dim=1),
            "attention_mask": torch.cat([torch.ones_like(placeholders), text["attention_mask"]], dim=1),
        }
        if prompts[0].qformer is not None:  # InstructBLIP
            # InstructBlipProcessor pads the Q-Former's text on the LLM tokenizer's side (left for decoder
            # LLMs); BERT's positions are absolute, so pad it as the Q-Former was trained: on the right.
            # Otherwise an answer depends on the other prompts in its batch.
            qformer = gen.processor.qformer_tokenizer.pad(
                {"input_ids": [list(prompt.qformer) for prompt in prompts]},
                padding=True,
                padding_side="right",
                return_tensors="pt",
            )
            inputs["qformer_input_ids"] = qformer["input_ids"]
            inputs["qformer_attention_mask"] = qformer["attention_mask"]
        return inputs

    def _generate(
        self, gen: GenerationModel, states: torch.Tensor, inputs: dict, options: GenerationOptions, streamer
    ) -> torch.Tensor:
        """The new tokens of the model's own `generate` from ViT states instead of pixels (transformers'
        steps, same order): queries over the image (InstructBLIP: with the prompt too) -> projection -> into
        the image placeholders of the prompt -> the LLM generates, in the fast decoder where it applies."""
        model = gen.model
        image_mask = torch.ones(states.shape[:-1], dtype=torch.long, device=states.device)
        queries = model.query_tokens.expand(states.shape[0], -1, -1)
        if gen.kind == "instructblip":
            query_mask = torch.ones(queries.shape[:-1], dtype=torch.long, device=states.device)
            out = model.qformer(
                input_ids=inputs["qformer_input_ids"],
                attention_mask=torch.cat([query_mask, inputs["qformer_attention_mask"]], dim=1),
                query_embeds=queries,
                encoder_hidden_states=states,
                encoder_attention_mask=image_mask,
            )
        else:
            out = model.qformer(
                query_embeds=queries, encoder_hidden_states=states, encoder_attention_mask=image_mask
            )
        query_output = out.last_hidden_state[:, : queries.shape[1], :]
        if query_output.dtype != states.dtype:  # the Q-Former stays fp32
            query_output = query_output.to(states.dtype)
        projected = model.language_projection(query_output)
        input_ids = inputs["input_ids"]
        embeds = model.get_input_embeddings()(input_ids)
        placeholders = (input_ids == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(placeholders, projected.to(embeds.device, embeds.dtype))
        if self.fast_decoder is not None and self.fast_decoder.covers(options):
            return self.fast_decoder.generate(embeds, inputs["attention_mask"], input_ids, options, streamer)
        llm_inputs = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}
        if streamer is not None:
            llm_inputs["streamer"] = streamer
        if gen.is_encoder_decoder:
            return model.language_model.generate(**llm_inputs, **options.generate_kwargs())
        # decoder LLMs return the prompt (queries included) before the answer
        output = model.language_model.generate(input_ids=input_ids, **llm_inputs, **options.generate_kwargs())
        return output[:, input_ids.shape[1] :]

    @staticmethod
    def _decoded(gen: GenerationModel, row: torch.Tensor, options: GenerationOptions) -> Generated:
        tokenizer = gen.processor.tokenizer
        ids = row.tolist()
        start = gen.model.config.text_config.decoder_start_token_id if gen.is_encoder_decoder else None
        if start is not None and ids and ids[0] == start:
            ids = ids[1:]
        # Rows that stop early in a batch are padded after their end of sequence: cut there.
        end = next((n for n, token in enumerate(ids) if token in gen.eos_token_ids), None)
        stopped = end is not None
        if stopped:
            ids = ids[:end]
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        return Generated(text, len(ids), "stop" if stopped or len(ids) < options.max_new_tokens else "length")

    def prompt_text(self, prompt: str | Prompt) -> str:
        """The prompt as the LLM reads it: a person's texts in it through the model's text processing (a
        plain string is the server's own text, as it is)."""
        if isinstance(prompt, str):
            return prompt
        return prompt.text(self.models.generation.text_processing)

    def _prompt_ids(self, prompt: str | Prompt) -> PromptIds:
        """A prompt's ids, its text only ever text: `split_special_tokens` turns `<image>`, `</s>` or
        `[SEP]` typed into a prompt into ordinary pieces (only `_encode`'s template places control tokens: a
        typed `<image>` would otherwise add a placeholder and break the batch). InstructBLIP's Q-Former reads
        the prompt too, through its own tokenizer.

        Tokenised with private copies, under a lock: the event loop asks while the model thread may be
        padding a batch, and a fast tokenizer keeps its padding setting on its shared Rust object (sharing
        one turned batches ragged under load: 500s)."""
        prompt = self.prompt_text(prompt)
        with self._private_lock:
            llm, qformer = self._tokenizer_copies()
            ids = llm(prompt, split_special_tokens=True)["input_ids"]
            qformer_ids = None if qformer is None else qformer(prompt, split_special_tokens=True)["input_ids"]
        return PromptIds(tuple(ids), None if qformer_ids is None else tuple(qformer_ids))

    def prompt_tokens(self, prompt: str | Prompt) -> int:
        """Tokens the LLM sees for a prompt: the text plus the query tokens."""
        return len(self.prompt_ids(prompt).llm) + self.models.generation.model.config.num_query_tokens

    def checked_prompt_tokens(self, prompt: str | Prompt, options: GenerationOptions) -> int:
        """`prompt_tokens`, refused (InvalidInput) where the prompt and the answer would run past the LLM's
        positions, instead of failing inside the model."""
        tokens = self.prompt_tokens(prompt)
        limit = self.models.generation.max_positions
        if limit is not None and tokens + options.max_new_tokens > limit:
            raise InvalidInput(
                f"prompt ({tokens} tokens with the image) + max_new_tokens ({options.max_new_tokens}) exceeds "
                f"the model's {limit} positions"
            )
        return tokens

    def decode(self, token_ids: list[int]) -> str:
        """Text of generated tokens, on the event loop (streaming), as `Generated.text` is made."""
        with self._private_lock:
            return self._tokenizer_copies()[0].decode(token_ids, skip_special_tokens=True).strip()

    def _tokenizer_copies(self) -> tuple[Any, Any]:
        if self._private_tokenizers is None:
            gen = self.models.generation
            qformer = gen.processor.qformer_tokenizer if gen.kind == "instructblip" else None
            self._private_tokenizers = (copy.deepcopy(gen.processor.tokenizer), copy.deepcopy(qformer))
        return self._private_tokenizers
