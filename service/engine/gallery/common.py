"""What every part of the gallery shares: the rules for ids and metadata, an image's records, the store interface
both engines implement, and the exact second pass of a search.

A store keeps one record per image: its id, sha256, file, added_at, metadata, its query vectors (two int8
layers in the embedded store, float16 in a Milvus server) and the normalised mean of them (float32: search by
image ranks by its cosine, and a text search's first pass finds candidates by it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

# One rule for image ids and metadata keys (a key that can be stored can be filtered on).
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$"
NAME_RULE = "1 to 128 characters: letters, digits, `_`, `.`, `:` or `-`, the first a letter, digit or `_`"
MAX_METADATA_BYTES = 4096
FINGERPRINT_SUFFIXES = (".safetensors", ".json", ".txt", ".model")


class GalleryError(RuntimeError):
    """The gallery cannot be opened as asked; the message says why and what to do."""


def check_name(value: str, what: str) -> str:
    """`value` if it is a valid image id or metadata key; a ValueError that states the rule otherwise."""
    if not isinstance(value, str) or not re.match(NAME_PATTERN, value):
        raise ValueError(f"{what} {value!r} is not valid: {NAME_RULE}")
    return value


def _wide_integer(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_wide_integer(v) for v in value.values())
    if isinstance(value, list):
        return any(_wide_integer(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63


def check_metadata(metadata: Any) -> dict[str, Any]:
    """`metadata` if a gallery can keep it (a JSON object, its keys valid names, small); a ValueError saying
    why not otherwise. Only top-level keys are filtered on, so only they follow the name rule."""
    if not isinstance(metadata, dict):
        raise ValueError("metadata must be a JSON object")
    for key in metadata:
        check_name(key, "metadata key")
    if _wide_integer(metadata):  # a Milvus server's JSON holds 64-bit integers; wider ones failed the insert
        raise ValueError("metadata: integers must fit in 64 bits")
    if len(json.dumps(metadata)) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata: at most {MAX_METADATA_BYTES} bytes of JSON")
    return metadata


def check_filter(conditions: dict[str, Any]) -> dict[str, list[Any]]:
    """{"shop": "a", "year": [2023, 2024]} -> {"shop": ["a"], "year": [2023, 2024]}: every key must match, a
    list means any of its values; each value a string, number or boolean. A ValueError says what is wrong."""
    checked = {}
    for key, wanted in conditions.items():
        check_name(key, "filter key")
        values = wanted if isinstance(wanted, list) else [wanted]
        if not values:
            raise ValueError(f"filter key {key!r}: an empty list matches nothing")
        for value in values:
            if not isinstance(value, (str, int, float, bool)):
                raise ValueError(f"{value!r}: a filter value is a string, number or boolean")
            if _wide_integer(value):  # what metadata may hold; a Milvus server refused wider ones (a 500)
                raise ValueError(f"{value!r}: a filter integer fits in 64 bits")
            if isinstance(value, str) and any(ord(c) < 0x20 for c in value):  # Milvus refused them (a 500)
                raise ValueError(f"{value!r}: a filter string holds no control characters")
        checked[key] = values
    return checked


def mean_vector(vectors: np.ndarray) -> np.ndarray:
    """The normalised mean of an image's query vectors (queries, dim): what search by image compares."""
    mean = np.asarray(vectors, dtype=np.float32).mean(axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


def model_of(info: dict[str, Any]) -> dict[str, Any]:
    """A gallery's record (any format) as the model description a new store is created for."""
    return {key: info[key] for key in ("fingerprint", "dim", "queries")} | {"name": info["model"]}


def content_key(data: bytes, image_id: str | None) -> tuple[str, str]:
    """(sha256 of the bytes, the image's id): an image given no id is named by its content, so adding the
    same bytes again, by the API or by `blip2-serve gallery add`, finds it."""
    digest = hashlib.sha256(data).hexdigest()
    return digest, image_id or digest[:32]


def model_fingerprint(source: str) -> str:
    """sha256 over a checkpoint folder's weights, configs and tokenizer files (names and bytes): equal for
    the same checkpoint on any device or dtype, different after any training step."""
    folder = Path(source)
    if not folder.is_dir():  # a hub id, already downloaded by the model loader
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, local_files_only=True))
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix in FINGERPRINT_SUFFIXES
        and not any(part.startswith(".") for part in p.parts)
    )
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Stored:
    """One image of the gallery, as GET /gallery/images/{id} shows it."""

    image_id: str
    sha256: str
    file: str  # relative to the images folder
    added_at: float  # seconds since the epoch
    metadata: dict[str, Any]


@dataclass
class Record(Stored):
    """An image as a store keeps it: what is shown, and its query vectors."""

    vectors: np.ndarray  # (queries, dim), L2-normalised; stored as float16


@dataclass
class NewImage:
    image_id: str
    sha256: str
    data: bytes  # the bytes as sent, kept for the ITM re-rank and a re-index
    metadata: dict[str, Any]
    vectors: np.ndarray  # (queries, dim), L2-normalised


@dataclass
class Planned:
    """Where one image of an add stands before the insert (`Gallery.plan`)."""

    image_id: str  # the id asked for, or the content-named one
    sha256: str
    # "new": to embed and insert; "repeat": the same id and bytes came earlier in this add; "exists": the
    # id holds these bytes; "conflict": the id holds other bytes; "duplicate": these bytes are stored, or
    # come earlier in this add, under `holder`; "reused_id": an earlier image of this add has this id and
    # other bytes.
    status: str
    holder: str  # the id that holds, or will hold, these bytes


class Store(Protocol):
    """What the gallery asks of a storage engine (LanceStore embedded, MilvusStore on a server). Each call
    blocks; an add is committed whole or not at all before it returns."""

    info: dict[str, Any]  # the gallery's record: fingerprint, model, dim, queries (and the engine's own keys)

    def lookup(self, ids: list[str], hashes: list[str]) -> tuple[dict[str, str], dict[str, str]]:
        """The stored images among `ids` (id -> its hash) and among `hashes` (hash -> its id): by key."""

    def get(self, image_id: str) -> Stored | None: ...

    def add(self, records: list[Record]) -> None:
        """Insert these (new) images in one commit."""

    def delete(self, image_id: str) -> bool: ...

    def count(self) -> int: ...

    def search(
        self, vectors: np.ndarray, k: int, conditions: dict[str, list[Any]] | None = None
    ) -> list[tuple[Stored, float]]:
        """The k best images for query vectors (n, dim) by ITC (max over both sides' vectors), best first."""

    def similar(
        self, vectors: np.ndarray, k: int, conditions: dict[str, list[Any]] | None = None
    ) -> list[tuple[Stored, float]]:
        """The k images whose mean vector is nearest (cosine) that of `vectors` (queries, dim), best first."""

    def query_vectors(self, ids: list[str]) -> dict[str, np.ndarray]: ...

    def records(self, batch_size: int) -> Iterator[list[Record]]:
        """Every stored image with its vectors, in batches (re-index, checks)."""

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


PRESELECT_MARGIN = 64  # most candidates beyond k that a rough preselection keeps for the exact scores
FLOAT16_ERROR = 2e-3  # how far a score from float16 vectors may be from the exact one (unit vectors)
# Up to this many images the first pass keeps BLIP2_GALLERY_CANDIDATES; beyond, C grows with the square root of
# the images, as the candidates needed for recall@10 >= 0.99 did (synthetic vectors: 2,000 at 100,000 images,
# 5,000 at 1,000,000; docs/BENCHMARKS.md).
CANDIDATES_GROW_FROM = 100_000


def candidate_count(setting: int, images: int) -> int:
    """C, the first pass's candidates in a gallery of `images`: the setting, grown as above."""
    return max(setting, round(setting * math.sqrt(images / CANDIDATES_GROW_FROM)))


def within_reach(rough: np.ndarray, k: int, error: float) -> np.ndarray:
    """Positions of the rough scores whose exact ones can be among the k best, best first, when each is within
    `error` of its exact one: a true top-k image scores at least s_k - error roughly, and the k-th best rough
    score is at most s_k + error (s_k: the k-th best exact score), so those within twice the error of the k-th
    best rough score. At most k + PRESELECT_MARGIN (a dense cluster of near-equal images); typically 15-45 for
    k = 10 and 32 x 256 int8 codes."""
    order = np.argsort(-rough, kind="stable")[: k + PRESELECT_MARGIN]
    if len(order) <= k:
        return order
    return order[rough[order] >= rough[order[k - 1]] - 2 * error]


def int8_codes(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectors (..., dim) as int8 codes times a float32 scale per vector (its largest value / 127)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    scale = np.maximum(np.abs(vectors).max(axis=-1), 1e-30) / 127
    return np.clip(np.rint(vectors / scale[..., None]), -127, 127).astype(np.int8), scale.astype(np.float32)


def best_products(matrix: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Each row's best inner product with any of `vectors`: a matrix-vector product per vector (a product with
    a matrix of one column is ~3x slower on CPU), nothing more for the usual single text vector."""
    best = matrix @ vectors[0]
    for vector in vectors[1:]:
        best = torch.maximum(best, matrix @ vector)
    return best


def max_sim(candidates: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The last pass: each candidate's exact ITC score, the best inner product over its query vectors
    (candidates, queries, dim; as the store keeps them) and the query's vectors (n, dim), in float32."""
    if len(candidates) == 0:
        return np.zeros(0, dtype=np.float32)
    count, per_image, dim = candidates.shape
    flat = candidates.reshape(count * per_image, dim).astype(np.float32)
    queries = np.asarray(queries, dtype=np.float32)
    # A matrix-vector product for one text vector: numpy's matrix product with a one-column matrix is ~100x
    # slower (measured on 2 cores).
    scores = (flat @ queries[0])[:, None] if len(queries) == 1 else flat @ queries.T
    return scores.reshape(count, -1).max(axis=1)


def top_by_max_sim(candidates: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, exact scores) of the candidates that can be among the k best by max_sim. Many candidates
    are first scored in float16 by torch's matrix product with the vector, which needs no widening (0.6 ms for 1,000
    images of 32 x 256, where widening them to float32 takes 15-30 ms, measured on 2 cores; each score within
    ~1e-3), and only those within reach of the k best (`within_reach`) exactly."""
    keep = np.arange(len(candidates))
    if len(candidates) > 2 * (k + PRESELECT_MARGIN):
        count, per_image, dim = candidates.shape
        flat = np.ascontiguousarray(candidates.reshape(count * per_image, dim))
        flat = torch.from_numpy(flat if flat.flags.writeable else flat.copy())  # torch wants writable memory
        half = torch.from_numpy(np.asarray(queries, dtype=np.float16).reshape(-1, dim).copy())
        best_rough = best_products(flat, half).float().reshape(count, per_image).amax(dim=1)
        keep = np.sort(within_reach(best_rough.numpy(), k, FLOAT16_ERROR))
    return keep, max_sim(candidates[keep], queries)


def best(scored: list[tuple[Stored, float]], k: int) -> list[tuple[Stored, float]]:
    """The k best (stored, score) pairs, best first; ties in id order, so a ranking is repeatable."""
    return sorted(scored, key=lambda pair: (-pair[1], pair[0].image_id))[:k]


class FolderLock:
    """An exclusive lock on a folder, held while the gallery is open; it dies with the process (flock)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "LOCK"
        self.handle = self.path.open("a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise GalleryError(
                f"the gallery in {folder} is open in {holder}: an embedded gallery serves one process. Stop "
                "that one, or keep the vectors in a Milvus server (BLIP2_GALLERY_URI) that replicas share"
            ) from None
        self.handle.truncate(0)
        self.handle.write(f"pid {os.getpid()}\n")
        self.handle.flush()

    def release(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
