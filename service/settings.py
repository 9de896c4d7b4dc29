"""Server configuration: one typed object, filled from `BLIP2_*` environment variables and CLI flags.

Each field's description is the documentation: the settings table in docs/SETTINGS.md is generated from it.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from blip2.prompts import VQA_TEMPLATE_DECODER, VQA_TEMPLATE_SHORT

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"


class Settings(BaseSettings):
    """Settings of the BLIP-2 inference server (`blip2-serve`)."""

    model_config = SettingsConfigDict(env_prefix="BLIP2_", extra="ignore", protected_namespaces=())

    model: str | None = Field(
        None,
        description="Generation model: a folder or hub id holding a Blip2ForConditionalGeneration or "
        "InstructBlipForConditionalGeneration checkpoint (a Blip2ForImageTextRetrieval one serves "
        "/embed and /retrieve only). Default: the packaged `service/default_model/generation` when present.",
    )
    retrieval_model: str | None = Field(
        None,
        description="Stage-1 model (Blip2ForImageTextRetrieval) for /embed and /retrieve. "
        "Default: the packaged `service/default_model/stage1` when present; without one those routes answer 501.",
    )
    served_model_name: str | None = Field(
        None, description="Name reported by /v1/models and in responses. Default: the model folder's name."
    )
    host: str = Field("0.0.0.0", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    device: str = Field(
        "auto", description="`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="Weights dtype outside the quantised LLM. `auto`: fp32 on CPU; on GPU fp16, or bf16 when "
        "the LLM is T5 (it overflows in fp16).",
    )
    load_in_8bit: bool | None = Field(
        None,
        description="Load the LLM in 8-bit with bitsandbytes (ViT, Q-Former, query tokens and projection stay "
        "unquantised). Unset: on when a CUDA GPU is present. Works on the CPU too.",
    )
    load_in_4bit: bool = Field(False, description="Load the LLM in 4-bit NF4 instead (bitsandbytes).")
    quantization: Literal["auto", "none", "bnb-int8", "bnb-nf4", "torchao-int8", "torchao-fp8"] = Field(
        "auto",
        description="How the LLM is quantised (ViT, Q-Former, query tokens and projection never are). "
        "`bnb-int8`: bitsandbytes LLM.int8; `bnb-nf4`: bitsandbytes 4-bit NF4; `torchao-int8`: torchao int8 "
        "weight-only (CPU and GPU); `torchao-fp8`: torchao FP8 weights and activations (GPUs with FP8, e.g. "
        "H100); `none`. `auto`: what load_in_8bit / load_in_4bit say (bnb-int8 on a GPU by default, none on "
        "the CPU).",
    )
    llm_int8_threshold: float = Field(
        6.0,
        ge=0.0,
        description="bnb-int8 only: activations above this go through an fp16 outlier path; 0 turns the "
        "outlier decomposition (and its host sync per layer) off, faster, answers to be checked per model.",
    )
    decoder: Literal["fast", "transformers"] = Field(
        "fast",
        description="`fast`: the server's own decode loop for OPT LLMs (one prefill per image, a preallocated "
        "cache, the decoder's modules run directly; tokens equal transformers' `generate()`). `transformers`: "
        "`generate()` itself. Flan-T5 and other LLM families always use `generate()`.",
    )
    cuda_graphs: bool = Field(
        False,
        description="Experimental, GPU: the fast decoder's steps take fixed shapes and each is replayed as a "
        "CUDA graph (one launch per step instead of hundreds). Not with bitsandbytes LLMs (they synchronise "
        "with the host). Tokens equal `generate()`'s in the CPU tests; off by default until measured on a "
        "GPU (`bash bench/gpu_session.sh`).",
    )
    kv_cache_max_mb: int = Field(
        4096,
        ge=0,
        description="The most memory (MiB) the fast decoder keeps between batches for its KV cache; a batch "
        "that needs more gets a cache of its own, freed after it (with `--cuda-graphs`, captured anew unless "
        "the allocator hands back the same address: keep the cap above the largest batch's cache, ~1.7 GB for "
        "OPT-2.7B at 8 captions x beam 5). On CUDA out of memory the kept cache is freed, the allocator's "
        "cache emptied and the batch run again in halves, down to the one request at fault.",
    )
    allow_pickle: bool = Field(
        False, description="Allow pickle-based weight files (.bin/.pth). Off: only safetensors are loaded."
    )
    warmup: bool = Field(True, description="Run one request through each model before /ready says yes.")
    vision_cache_size: int = Field(
        64,
        ge=0,
        description="Recent images whose ViT outputs are kept, so an image captioned and then embedded (with "
        "a shared vision tower) runs the ViT once. 0: only identical images within a batch share a pass.",
    )
    max_batch_size: int = Field(8, ge=1, le=256, description="Most requests run together in one batch.")
    max_wait_ms: float = Field(
        10.0,
        ge=0,
        description="Under load, how long a batch waits for company before it runs. A request that arrives "
        "to an idle server runs at once.",
    )
    max_queue_size: int = Field(
        64,
        ge=1,
        description="Requests waiting beyond this number are refused at once with 429 and Retry-After.",
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="Deadline per request, queueing included; past it the answer is 504."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long in-flight requests may take to finish before the exit."
    )
    max_image_bytes: int = Field(
        20 * 1024 * 1024, gt=0, description="Largest image accepted, in bytes (413); 20 MiB by default."
    )
    max_image_pixels: int = Field(
        40_000_000,
        gt=0,
        description="Largest image accepted in pixels, read from the header before decoding (413).",
    )
    max_images_per_request: int = Field(16, ge=1, description="Most images in one /embed or /retrieve call.")
    allowed_url_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts whose http(s) image URLs the server may fetch (JSON list or comma-separated). "
        "Empty: remote URLs are refused (no SSRF).",
    )
    url_fetch_timeout_s: float = Field(5.0, gt=0, description="Timeout of one allowed image URL fetch.")
    api_key: SecretStr | None = Field(
        None,
        description="When set, every route but /health, /ready, /metrics and the files of the web page and the API "
        "reference (/, /static/*, /docs, /docs/*, /openapi.json) needs `Authorization: Bearer <key>`; the page asks "
        "for the key and sends it, /docs takes it from its Authorize button.",
    )
    max_prompt_chars: int = Field(2000, ge=1, description="Longest prompt, question or text accepted (422).")
    max_new_tokens_limit: int = Field(
        256, ge=1, description="Upper bound of max_new_tokens a client may ask for."
    )
    max_num_beams: int = Field(8, ge=1, description="Upper bound of num_beams a client may ask for.")
    max_retrieve_candidates: int = Field(128, ge=1, description="Most candidates in one /retrieve call.")
    itm_top_k: int = Field(16, ge=1, description="Default number of /retrieve candidates re-ranked with ITM.")
    gallery_dir: str | None = Field(
        None,
        description="Folder of the persistent image gallery (/gallery routes): the image files, and the embedded "
        "LanceDB store of its vectors unless BLIP2_GALLERY_URI names a Milvus server. Embedded: one server process "
        "at a time (a second is refused); a gallery written by an earlier version (Milvus Lite's `milvus.db`) is "
        "converted when opened. Unset: the /gallery routes answer 501.",
    )
    gallery_uri: str | None = Field(
        None,
        description="A Milvus server holding the gallery's vectors (`http://milvus:19530`), which several "
        "replicas may share; they must then share BLIP2_GALLERY_DIR too (the image files, for the ITM re-rank). "
        "Unset: LanceDB, embedded in BLIP2_GALLERY_DIR.",
    )
    gallery_token: SecretStr | None = Field(
        None, description="Token (`user:password` or an API key) for the Milvus server of BLIP2_GALLERY_URI."
    )
    gallery_collection: str = Field(
        "blip2_gallery",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,200}$",
        description="Name of the gallery in a Milvus server (galleries with different names can share one "
        "Milvus).",
    )
    gallery_index: Literal["FLAT", "HNSW", "IVF_FLAT", "AUTOINDEX"] = Field(
        "HNSW",
        description="Milvus server: the vector index over each image's mean query vector, the first pass of a "
        "search (set when the collection is created). FLAT is exact and reads every image.",
    )
    gallery_candidates: int = Field(
        2000,
        ge=1,
        le=16384,
        description="Images the first pass of a text search keeps (nearest mean query vectors, metadata filter "
        "applied), whose ITC over every query vector then ranks them. A gallery of at most this many "
        "(filtered) images is searched exactly. The embedded store keeps more in a gallery of over 100,000 "
        "images: this times the square root of (images / 100,000). Recall@10 against an exact search at 2,000: "
        "1.000 on the built-in model's vectors of 5,000 generated images and on 100,000 synthetic images "
        "(0.98 at 1,000); more: higher recall, ~1 ms more per 1,000 in the embedded store's in-memory middle "
        "pass (docs/BENCHMARKS.md).",
    )
    gallery_nprobes: int = Field(
        20,
        ge=1,
        description="Milvus server with BLIP2_GALLERY_INDEX=IVF_FLAT: the partitions a first pass searches.",
    )
    gallery_optimize_rows: int = Field(
        2048,
        ge=1,
        description="Embedded gallery: the fewest images added since the last maintenance that start the next one "
        "in the background (also at least 5% of the gallery): compaction, the new rows added to the id, sha256 "
        "and tag indexes, old versions' files deleted. Rows not yet indexed are looked up by a scan meanwhile.",
    )
    gallery_max_top_k: int = Field(
        100, ge=1, le=1000, description="Most results one /gallery/search returns."
    )
    caption_prompt: str | None = Field(
        None,
        description="Default /caption prompt. Unset: none for BLIP-2, a short instruction for InstructBLIP.",
    )
    vqa_prompt_template: str | None = Field(
        None,
        description="Default /vqa template with `{}` for the question. Unset: "
        f"`{VQA_TEMPLATE_DECODER}` for OPT, `{VQA_TEMPLATE_SHORT}` for Flan-T5 and InstructBLIP.",
    )
    text_processing: Literal["auto", "on", "off"] = Field(
        "auto",
        description="A person's text as the model was trained to read it: VQA questions (/vqa, chat), "
        "/caption and /generate prompts and search texts go through LAVIS's text processing before they are "
        "tokenised (lower case, LAVIS's punctuation `.!\"()*#:;~` removed, spaces collapsed, at most 50 words; "
        "a question ends with one `?`); the server's own templates never do. `auto`: what each model folder "
        "records in `text_processing.json` (written by `blip2-train`; the built-in model: on); a folder "
        "without one, e.g. a released Salesforce checkpoint, reads text as it comes. `on`: the record, or "
        "LAVIS's processing where there is none. `off`: text as it comes.",
    )
    log_prompts: bool = Field(False, description="Put prompts in the request log lines (never image bytes).")
    log_level: str = Field("info", description="Python logging level.")

    @field_validator("allowed_url_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                import json

                return json.loads(value)
            return [host.strip().lower() for host in value.split(",") if host.strip()]
        return value

    @field_validator("gallery_dir", "gallery_uri", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value  # compose and .env files pass unset variables as ""

    @model_validator(mode="after")
    def _packaged_defaults(self) -> Settings:
        # With no model named at all, serve the packaged pair. A model the operator names never gets the
        # packaged retrieval model added behind its back: /embed and /retrieve then say it is missing.
        if (
            self.model is None
            and self.retrieval_model is None
            and (DEFAULT_MODEL_DIR / "generation").is_dir()
        ):
            self.model = str(DEFAULT_MODEL_DIR / "generation")
            if (DEFAULT_MODEL_DIR / "stage1").is_dir():
                self.retrieval_model = str(DEFAULT_MODEL_DIR / "stage1")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("choose one of load_in_8bit and load_in_4bit")
        if self.gallery_uri and not self.gallery_dir:
            raise ValueError(
                "gallery_uri needs gallery_dir too: the folder (shared by replicas) of the image files"
            )
        if self.quantization != "auto" and (self.load_in_8bit or self.load_in_4bit):
            raise ValueError("give quantization or load_in_8bit / load_in_4bit, not both")
        return self

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        source = (self.model or self.retrieval_model or "blip2").rstrip("/")
        path = Path(source)
        # blip2-train writes <run>/generation and <run>/stage1: the run's name says more.
        if path.name in ("generation", "stage1") and path.parent.name:
            return path.parent.name
        return path.name if path.exists() else source


def settings_table() -> str:
    """The Markdown settings table of docs/SETTINGS.md, from the field descriptions (a test keeps them equal)."""
    rows = ["| setting | CLI flag | default | what it does |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        shown = "unset" if default is None else f"`{default}`" if default != [] else "empty"
        flag = "--" + name.replace("_", "-")
        if bool in typing.get_args(field.annotation) or field.annotation is bool:
            flag = "--[no-]" + flag[2:]
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `BLIP2_{name.upper()}` | `{flag}` | {shown} | {description} |")
    return "\n".join(rows)
