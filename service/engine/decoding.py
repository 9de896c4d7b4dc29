"""The serving decode loop for decoder-only LLMs (OPT, as in the released BLIP-2 checkpoints).

transformers' `generate()` pays, on every step, for what a server does not need: re-validating settings,
rebuilding attention masks and position ids, a cache object, output dataclasses, and, in beam search, a
prefill once per beam. Here the prompt is prefilled once per image with the model's own forward, its keys
and values go into a preallocated cache, and each step runs the decoder's modules directly (the same ops in
the same order, so the logits are bit for bit those of the model's forward on the CPU). Greedy, sampling and
beam search follow `generate()`'s own algorithms step for step, with transformers' logits processors, so the
tokens are the ones `generate()` gives (tests/service/test_decoding.py checks it).

With `cuda_graphs` the steps take fixed shapes instead (rows padded to a power of two, a capacity rounded
up to 64 positions, attention over the whole capacity under a mask, the new key and value written at a
tensor index), so that on a GPU each step is one CUDA graph replay instead of hundreds of kernel launches.
Those logits are no longer bit for bit the model's (the sums run over masked positions too); the tests
check that the tokens still equal `generate()`'s on the CPU, where the same fixed-shape steps run eagerly.

A model or a setting this loop does not cover is served by `generate()` (`Runner` asks `unsupported`).
"""

from __future__ import annotations

import logging

import torch
from torch.nn import functional as F
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from service.engine.jobs import GenerationOptions

log = logging.getLogger("service.decoding")

# generation_config fields whose non-default values make generate() add a step this loop does not have.
_UNSUPPORTED_DEFAULTS = {
    "early_stopping": False, "min_length": 0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "remove_invalid_values": False,
    "exponential_decay_length_penalty": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "sequence_bias": None, "guidance_scale": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "min_p": None, "top_h": None, "renormalize_logits": False, "watermarking_config": None,
    "diversity_penalty": None, "encoder_repetition_penalty": 1.0, "max_time": None, "stop_strings": None,
    "num_return_sequences": 1,
}  # fmt: skip


def unsupported(llm: torch.nn.Module) -> str | None:
    """Why this LLM is served by `generate()` instead of the loop below, or None."""
    if llm.config.model_type != "opt":
        return f"the fast decoder covers OPT LLMs, not {llm.config.model_type!r}"
    config = llm.generation_config
    for name, default in _UNSUPPORTED_DEFAULTS.items():
        value = getattr(config, name, None)
        if value is not None and value != default:
            return f"the LLM's generation_config sets {name}={value!r}"
    return None


class Arena:
    """One flat buffer that every batch's cache is cut from, kept between batches (they run one at a time,
    on the model thread): fresh megabytes per batch cost their page faults each time on the CPU.

    It keeps at most `max_bytes` (the `kv_cache_max_mb` setting): a batch that needs more gets a buffer of
    its own, freed with the batch, so one large batch does not hold its peak for the server's lifetime."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.memory: torch.Tensor | None = None
        self.max_bytes = max_bytes

    def take(self, size: int, like: torch.Tensor) -> torch.Tensor:
        """`size` elements of `like`'s dtype and device, uninitialised."""
        if self.max_bytes is not None and size * like.element_size() > self.max_bytes:
            return like.new_empty(size)  # over the cap: this batch's own, the kept buffer stays as it is
        memory = self.memory
        if (
            memory is None
            or memory.numel() < size
            or memory.dtype != like.dtype
            or memory.device != like.device
        ):
            memory = self.memory = None  # the old buffer goes before the larger one is made
            memory = self.memory = like.new_empty(size)
        return memory[:size]

    def release(self) -> None:
        """Forget the kept buffer (out of memory: its bytes go back to the allocator)."""
        self.memory = None


class KVCache:
    """Keys and values of every layer, preallocated for the whole answer: [layers, rows, heads, capacity,
    head_dim] each, so that reordering beams is two gathers whatever the depth. A step writes one position
    and attends over exactly the filled length (a view, no copy): attending over the padded capacity would
    change the float sums, and the logits would no longer equal the model's."""

    def __init__(
        self, prefilled, rows: torch.Tensor, capacity: int, arena: Arena, padded_rows: int | None = None
    ) -> None:
        """`padded_rows` (fixed shapes): room for that many rows, of which the first len(rows) are used."""
        first = prefilled.layers[0].keys  # [rows, heads, length, head_dim]
        _, heads, self.length, dim = first.shape
        self.rows = len(rows)
        shape = (len(prefilled.layers), padded_rows or self.rows, heads, capacity, dim)
        size = shape[0] * shape[1] * heads * capacity * dim
        answer = size // capacity * (capacity - self.length)
        # Keys, values, and the buffer a reorder gathers the answer's part into before copying it back.
        memory = arena.take(2 * size + answer, first)
        self.keys, self.values = memory[:size].view(shape), memory[size : 2 * size].view(shape)
        self._scratch = memory[2 * size :]
        self.prompt = self.length
        for index, layer in enumerate(prefilled.layers):
            self.keys[index, : self.rows, :, : self.length] = layer.keys.index_select(0, rows)
            self.values[index, : self.rows, :, : self.length] = layer.values.index_select(0, rows)
        if padded_rows is not None:
            # Fixed-shape steps attend over every position, masked or not, and the arena's memory is
            # whatever it held: a NaN there would reach the answer (a masked score of NaN stays NaN).
            for store in (self.keys, self.values):
                store[:, :, :, self.length :].zero_()
                store[:, self.rows :].zero_()

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's key and value ([rows, heads, 1, dim]) and return the layer's filled views."""
        self.keys[layer, :, :, self.length] = key[:, :, 0]
        self.values[layer, :, :, self.length] = value[:, :, 0]
        end = self.length + 1
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row i continues from row rows[i], a beam of the same prompt. The prompt's keys and
        values are the same in every beam of a prompt, so only the answer's positions move."""
        if self.length == self.prompt:
            return
        for store in (self.keys, self.values):
            answer = store[:, : self.rows, :, self.prompt : self.length]
            gathered = self._scratch[: answer.numel()].view(answer.shape)
            torch.index_select(answer, 1, rows, out=gathered)
            answer.copy_(gathered)


class OptDecodeStep:
    """One token per row through an OPT decoder, written against the model's own modules (so an 8-bit or
    4-bit linear layer works as it does in the model), as OPTDecoder.forward computes it."""

    POSITION_OFFSET = 2  # OPT's learned positions start at index 2

    def __init__(self, llm: torch.nn.Module) -> None:
        self.llm, self.decoder = llm, llm.model.decoder
        attention = self.decoder.layers[0].self_attn
        self.heads, self.head_dim = attention.num_heads, attention.head_dim

    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        mask: torch.Tensor | None,
        write_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [rows, vocab] for `tokens` [rows] at `positions` [rows]; `mask` [rows, 1, 1, length+1], or
        None where every row attends every position so far.
        With `write_at` (fixed shapes: a one-element index, the cache's length) the step writes there, attends
        over the cache's whole capacity (`mask` [rows, 1, 1, capacity]) and leaves `cache.length` to the caller."""
        decoder, rows = self.decoder, tokens.shape[0]
        hidden = decoder.embed_tokens(tokens[:, None])
        if decoder.project_in is not None:
            hidden = decoder.project_in(hidden)
        hidden = hidden + decoder.embed_positions.weight[positions + self.POSITION_OFFSET][:, None]
        for index, layer in enumerate(decoder.layers):
            attention = layer.self_attn
            residual = hidden
            if layer.do_layer_norm_before:
                hidden = layer.self_attn_layer_norm(hidden)
            query = (attention.q_proj(hidden) * attention.scaling).view(rows, 1, self.heads, self.head_dim)
            key = attention.k_proj(hidden).view(rows, 1, self.heads, self.head_dim).transpose(1, 2)
            value = attention.v_proj(hidden).view(rows, 1, self.heads, self.head_dim).transpose(1, 2)
            if write_at is None:
                keys, values = cache.append(index, key, value)
            else:
                keys, values = cache.keys[index], cache.values[index]
                keys.index_copy_(2, write_at, key)
                values.index_copy_(2, write_at, value)
            out = F.scaled_dot_product_attention(
                query.transpose(1, 2), keys, values, attn_mask=mask, scale=1.0
            )
            hidden = residual + attention.out_proj(out.transpose(1, 2).reshape(rows, 1, -1))
            if not layer.do_layer_norm_before:
                hidden = layer.self_attn_layer_norm(hidden)
            residual = hidden
            if layer.do_layer_norm_before:
                hidden = layer.final_layer_norm(hidden)
            hidden = residual + layer.fc2(layer.activation_fn(layer.fc1(hidden)))
            if not layer.do_layer_norm_before:
                hidden = layer.final_layer_norm(hidden)
        if write_at is None:
            cache.length += 1
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        return self.llm.lm_head(hidden)[:, 0]


def graph_blocker(llm: torch.nn.Module) -> str | None:
    """Why this LLM's decode steps cannot be captured in CUDA graphs, or None."""
    if any(type(module).__module__.startswith("bitsandbytes") for module in llm.modules()):
        # LLM.int8 reads its outlier columns back to the host in every layer: no capture.
        return "bitsandbytes layers synchronise with the host"
    return None


class FastDecoder:
    """`generate()` for one batch of prompts given as embeddings (image queries already in place).
    `fixed_shapes`: the steps take fixed shapes (module docstring), captured as CUDA graphs on a GPU."""

    def __init__(
        self, llm: torch.nn.Module, fixed_shapes: bool = False, arena_max_bytes: int | None = None
    ) -> None:
        self.llm, self.step, self.arena = llm, OptDecodeStep(llm), Arena(arena_max_bytes)
        self.fixed_shapes = fixed_shapes
        self.graphs: dict[tuple, _FixedShapeBuffers] = {}  # per (padded rows, capacity, device)
        self.captures = 0  # CUDA graphs captured so far: more than the shapes seen means captured anew
        config = llm.generation_config
        eos = config.eos_token_id
        self.eos = torch.tensor(eos if isinstance(eos, list) else [eos])
        self.pad = config.pad_token_id if config.pad_token_id is not None else self.eos[0].item()
        self.top_k = config.top_k if config.top_k is not None else 50

    def release_memory(self) -> None:
        """Drop what the decoder keeps between batches (the cache arena, the CUDA graphs and their buffers),
        after an out-of-memory error: a smaller retry then starts from an empty allocator cache."""
        self.arena.release()
        self.graphs.clear()

    @staticmethod
    def covers(options: GenerationOptions) -> bool:
        return not (options.do_sample and options.num_beams > 1)  # beam sampling: generate()

    def processors(self, options: GenerationOptions, prompt_mask: torch.Tensor) -> _Processors:
        """The logits processors generate() builds for these settings, in its order; `prompt_mask` is the
        attention mask of the prompt, one row per decoded row."""
        eos = self.eos.to(prompt_mask.device)
        processors = []
        if options.repetition_penalty != 1.0:
            padding = (prompt_mask != 0).int().argmax(dim=1)  # left padding is no repetition
            try:
                processors.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty, padding))
            except ValueError:
                # transformers before per-row padding (5.17, the GPU image's): its generate() penalises the
                # padding too, and so does this loop then
                processors.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
        if options.min_new_tokens > 0:
            prompt_length = prompt_mask.shape[1]
            processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, options.min_new_tokens, eos))
        if options.do_sample:
            if options.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(options.temperature))
            if self.top_k != 0:
                processors.append(TopKLogitsWarper(self.top_k, min_tokens_to_keep=1))
            if options.top_p < 1.0:
                processors.append(TopPLogitsWarper(options.top_p, min_tokens_to_keep=1))
        return _Processors(processors, options.min_new_tokens)

    @torch.inference_mode()
    def generate(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        input_ids: torch.Tensor,
        options: GenerationOptions,
        streamer=None,
    ) -> torch.Tensor:
        """New tokens [batch, n] (rows that stop early are padded), as generate() would return them after
        the prompt."""
        # Logits of the last position only, as generate() asks (over the whole prompt they would be a
        # [batch, prompt, vocab] product thrown away: 50k-wide for OPT-2.7B).
        prefill = self.llm(
            inputs_embeds=embeds, attention_mask=attention_mask, use_cache=True, logits_to_keep=1
        )
        # transformers 5.25 names the output's cache `cache`; earlier 5.x (5.17 on the GPU image) `past_key_values`
        prefilled = prefill.cache if hasattr(prefill, "cache") else prefill.past_key_values
        logits = prefill.logits[:, -1]
        beams = options.num_beams
        rows = torch.arange(input_ids.shape[0], device=input_ids.device).repeat_interleave(beams)
        capacity = input_ids.shape[1] + options.max_new_tokens
        padded = None
        if self.fixed_shapes:
            padded, capacity = 1 << (len(rows) - 1).bit_length(), -(-capacity // 64) * 64
        cache = KVCache(prefilled, rows, capacity, self.arena, padded)
        del prefill, prefilled
        prompt_mask = attention_mask.bool().index_select(0, rows)  # left padding is False
        positions = attention_mask.sum(dim=1).index_select(0, rows) - 1  # OPT: positions count real tokens
        run = (_FixedShapeSteps if self.fixed_shapes else _Steps)(self, cache, prompt_mask, positions)
        processors = self.processors(options, prompt_mask)
        if beams == 1:
            return self._sample(run, logits, input_ids, options, processors, streamer)
        if streamer is not None:
            raise ValueError("streaming is for greedy and sampled decoding; beam search streams nothing")
        return self._beam_search(run, logits.index_select(0, rows), input_ids, options, processors)

    def _sample(
        self, run, logits, input_ids, options: GenerationOptions, processors, streamer
    ) -> torch.Tensor:
        """Greedy or sampled decoding, as GenerationMixin._sample."""
        eos = self.eos.to(input_ids.device)
        sequences = input_ids
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        for step in range(options.max_new_tokens):
            scores = processors(step, sequences, logits.to(torch.float32))
            if options.do_sample:
                tokens = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                tokens = torch.argmax(scores, dim=-1)
            tokens = tokens * unfinished + self.pad * (1 - unfinished)
            sequences = torch.cat([sequences, tokens[:, None]], dim=-1)
            if streamer is not None:
                streamer.put(tokens.cpu())
            unfinished = unfinished & ~torch.isin(tokens, eos)
            if step + 1 == options.max_new_tokens or unfinished.max() == 0:  # the one host sync: stopping
                break
            logits = run(tokens)
        if streamer is not None:
            streamer.end()
        return sequences[:, input_ids.shape[1] :]

    def _beam_search(self, run, logits, input_ids, options: GenerationOptions, processors) -> torch.Tensor:
        """Beam search as GenerationMixin._beam_search (early_stopping=False), with one prefill per image."""
        device, (batch, prompt) = input_ids.device, input_ids.shape
        beams, vocab = options.num_beams, logits.shape[-1]
        eos = self.eos.to(device)
        keep = max(2, 1 + len(eos)) * beams  # candidates per step: enough to continue after some finish
        top_beams = torch.arange(keep, device=device) < beams
        max_length = prompt + options.max_new_tokens
        running = torch.full((batch, beams, max_length), self.pad, dtype=torch.long, device=device)
        running[:, :, :prompt] = input_ids[:, None]
        finished_sequences = running.clone()
        running_scores = torch.zeros((batch, beams), device=device)
        running_scores[:, 1:] = -1e9
        finished_scores = torch.full((batch, beams), -1e9, device=device)
        finished = torch.zeros((batch, beams), dtype=torch.bool, device=device)
        improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)
        row_offset = torch.arange(batch, device=device)[:, None] * beams
        length = prompt
        while True:
            log_probs = F.log_softmax(logits.to(torch.float32), dim=-1)
            log_probs = processors(length - prompt, running.view(batch * beams, -1)[:, :length], log_probs)
            log_probs = (log_probs.view(batch, beams, vocab) + running_scores[:, :, None]).view(batch, -1)
            candidate_scores, candidates = torch.topk(log_probs, k=keep)
            parents = candidates // vocab
            candidate_sequences = torch.take_along_dim(running, parents[:, :, None], dim=1)
            candidate_sequences[:, :, length] = candidates % vocab
            hits = torch.isin(candidates % vocab, eos) | (length + 1 >= max_length)
            # the best unfinished candidates run on
            running_candidates = candidate_scores + hits.to(torch.float32) * -1.0e9
            chosen = torch.topk(running_candidates, k=beams)[1]
            running = torch.take_along_dim(candidate_sequences, chosen[:, :, None], dim=1)
            running_scores = torch.take_along_dim(running_candidates, chosen, dim=1)
            parents = torch.take_along_dim(parents, chosen, dim=1)
            # the best finished ones join the finished hypotheses
            just_finished = hits & top_beams[None, :]
            scores = candidate_scores / ((length + 1 - prompt) ** options.length_penalty)
            scores += (~improvable).to(torch.float32) * -1.0e9
            scores += (~just_finished) * -1.0e9
            merged_scores = torch.cat((finished_scores, scores), dim=1)
            best = torch.topk(merged_scores, k=beams)[1]
            finished_sequences = torch.take_along_dim(
                torch.cat((finished_sequences, candidate_sequences), dim=1), best[:, :, None], dim=1
            )
            finished_scores = torch.take_along_dim(merged_scores, best, dim=1)
            finished = torch.take_along_dim(torch.cat((finished, just_finished), dim=1), best, dim=1)
            length += 1
            best_running = running_scores[:, :1] / ((length - prompt) ** options.length_penalty)
            worst_finished = torch.where(finished, torch.min(finished_scores, dim=1, keepdim=True)[0], -1.0e9)
            improvable = improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
            if not (torch.any(improvable) & ~torch.all(hits)):  # the one host sync: stopping
                break
            run.cache.reorder((parents + row_offset).view(-1))
            logits = run(running[:, :, length - 1].reshape(-1))
        return finished_sequences[:, 0, prompt:]


class _Processors:
    """generate()'s logits processors of one batch, applied in its order, less what changes nothing: the
    min-new-tokens mask once enough tokens are out (it would still copy the scores every step), and the
    signature check LogitsProcessorList makes on every call."""

    def __init__(self, processors: list, min_new_tokens: int) -> None:
        self.early = processors
        self.late = [p for p in processors if not isinstance(p, MinNewTokensLengthLogitsProcessor)]
        self.min_new_tokens = min_new_tokens

    def __call__(self, produced: int, sequences: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """`scores` [rows, vocab] after `produced` new tokens; `sequences` [rows, length] so far."""
        for processor in self.early if produced < self.min_new_tokens else self.late:
            scores = processor(sequences, scores)
        return scores


class _Steps:
    """The decode steps of one batch: each call feeds one token per row and returns the next logits."""

    def __init__(
        self, decoder: FastDecoder, cache: KVCache, prompt_mask: torch.Tensor, positions: torch.Tensor
    ) -> None:
        self.step, self.cache, self.positions = decoder.step, cache, positions
        self.mask: torch.Tensor | None = None
        # generate() passes no mask when no row is padded (every /caption batch), and a mask or none makes
        # SDPA pick another kernel on a GPU (memory-efficient vs flash), whose near-ties can flip tokens.
        if not bool(prompt_mask.all()):
            # Every position a step may attend: the prompt's, then each answer's.
            rows, prompt = prompt_mask.shape
            self.mask = prompt_mask.new_ones((rows, cache.keys.shape[3]))
            self.mask[:, :prompt] = prompt_mask

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.positions = self.positions + 1
        mask = None if self.mask is None else self.mask[:, None, None, : self.cache.length + 1]
        return self.step(tokens, self.positions, self.cache, mask)


class _FixedShapeBuffers:
    """The inputs and output of one (padded rows, capacity) step shape, kept between batches: a CUDA graph
    replays on the addresses it was captured with."""

    def __init__(self, rows: int, capacity: int, device: torch.device) -> None:
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.write_at = torch.zeros(1, dtype=torch.long, device=device)
        self.mask = torch.zeros((rows, 1, 1, capacity), dtype=torch.bool, device=device)
        self.logits: torch.Tensor | None = None
        self.graph = None
        self.cache_address = 0  # where the captured graph's cache lives: a grown arena means a new capture


class _FixedShapeSteps:
    """The decode steps of one batch at fixed shapes; on a GPU each step is a replay of a CUDA graph that is
    captured the first time its shape comes."""

    def __init__(
        self, decoder: FastDecoder, cache: KVCache, prompt_mask: torch.Tensor, positions: torch.Tensor
    ):
        self.decoder, self.step, self.cache, self.positions = decoder, decoder.step, cache, positions
        padded, capacity, device = cache.keys.shape[1], cache.keys.shape[3], positions.device
        key = (padded, capacity, device)
        if key not in decoder.graphs:
            decoder.graphs[key] = _FixedShapeBuffers(padded, capacity, device)
        self.buffers = buffers = decoder.graphs[key]
        rows, prompt = prompt_mask.shape
        # Padding rows start from the same tokens and positions in every batch: an earlier batch's would
        # otherwise reach this one's answers wherever rows share a statistic (FP8's per-tensor scaling).
        buffers.tokens.zero_()
        buffers.positions.zero_()
        buffers.mask.zero_()
        buffers.mask[:rows, 0, 0, :prompt] = prompt_mask
        buffers.mask[rows:, 0, 0, 0] = True  # padding rows attend to something: no NaN from an empty softmax
        if buffers.graph is not None and buffers.cache_address != cache.keys.data_ptr():
            buffers.graph = None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        buffers, cache, rows = self.buffers, self.cache, tokens.shape[0]
        self.positions = self.positions + 1
        buffers.tokens[:rows] = tokens
        buffers.positions[:rows] = self.positions
        buffers.write_at.fill_(cache.length)
        buffers.mask[:, 0, 0, cache.length] = True
        # A failed capture turned the decoder's fixed shapes off: this batch's steps then run without a graph.
        if buffers.graph is None and tokens.is_cuda and self.decoder.fixed_shapes:
            self._capture()
        if buffers.graph is None:
            logits = self._forward()[:rows]
        else:
            buffers.graph.replay()
            logits = buffers.logits[:rows].clone()  # the next replay overwrites the graph's output
        cache.length += 1
        return logits

    def _forward(self) -> torch.Tensor:
        buffers = self.buffers
        return self.step(buffers.tokens, buffers.positions, self.cache, buffers.mask, buffers.write_at)

    def _capture(self) -> None:
        buffers = self.buffers
        # Warm-up runs before a capture, as torch.cuda.graph asks, on the stream that captures: libraries
        # create their per-stream handles then, not mid-capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward()  # writes this step's key and value, as the replay will again
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the event loop's thread (reading memory for /metrics) must not abort a capture
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                buffers.logits = self._forward()
        except RuntimeError as exc:  # e.g. a layer that reads a value back to the host
            log.warning("capturing a decode step in a CUDA graph failed (%s): decoding without graphs", exc)
            self.decoder.fixed_shapes = False
            return
        buffers.graph, buffers.cache_address = graph, self.cache.keys.data_ptr()
        self.decoder.captures += 1
