"""What a gallery search reads from memory (`InMemory`): every stored image's mean vector and the coarse int8
codes of its query vectors, in chunks that never move, and the first two passes of a text search over them
(service/engine/gallery/lance_store.py: the table they are read from and the third pass). Nothing here knows
the table: slots, row ids and arrays in, scores out."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from service.engine.gallery.common import best_products, int8_codes

# What searches hold grows by chunks of this many images, never moved: few enough that a search makes few
# calls (each torch call costs ~1 ms on a busy 2-core machine), each reserved, not written, until used
# (544 MB of address space with 32 x 256 vectors).
CHUNK_ROWS = 65536


class Chunk:
    """CHUNK_ROWS images' slots: mean vectors (float16), coarse query-vector codes (int8) and their scales."""

    def __init__(self, queries: int, dim: int) -> None:
        # empty, not zeros: the memory is taken as slots are written (a slot is read only once written)
        self.means = torch.empty((CHUNK_ROWS, dim), dtype=torch.float16)
        self.codes = torch.empty((CHUNK_ROWS, queries, dim), dtype=torch.int8)
        self.scales = torch.empty((CHUNK_ROWS, queries), dtype=torch.float32)


def by_chunk(slots: np.ndarray) -> Iterator[tuple[int, np.ndarray, torch.Tensor]]:
    """(chunk, the positions in `slots` of those in it, their offsets in it) for each chunk the slots fall in,
    in chunk order."""
    chunk_of, offsets = np.divmod(np.asarray(slots, dtype=np.int64), CHUNK_ROWS)
    for chunk in np.unique(chunk_of):
        positions = np.flatnonzero(chunk_of == chunk)
        yield int(chunk), positions, torch.from_numpy(offsets[positions])


class InMemory:
    """What a search reads from memory: every stored image's mean vector (the first pass) and coarse codes of
    its query vectors (the middle pass), 8.5 kB per image with 32 x 256 vectors, by slot; and the row ids of the
    slots, sorted (stable row ids only grow, adds append under the store's write lock). The chunks are never
    moved, so an add costs the same at any size. A search reads one snapshot (row ids, chunks, alive), the
    first n slots: an append writes past every snapshot taken before it, then publishes a longer one. A deleted
    image's slot is marked dead, which a search in progress may or may not see; the dead are dropped once they
    are a quarter."""

    def __init__(self, queries: int, dim: int) -> None:
        self.queries, self.dim = queries, dim
        self._empty()

    def _empty(self) -> None:
        self._row_ids = np.zeros(CHUNK_ROWS, dtype=np.uint64)
        self._alive = np.zeros(CHUNK_ROWS, dtype=bool)
        self._chunks: list[Chunk] = []
        self._publish(0)

    def _publish(self, count: int) -> None:
        self.snapshot = (self._row_ids[:count], list(self._chunks), self._alive[:count])

    def reserve(self, count: int) -> None:
        """Room for `count` slots in all (chunks are made as slots are written)."""
        if count > len(self._row_ids):
            capacity = max(2 * len(self._row_ids), count)
            self._row_ids = np.concatenate(
                [self._row_ids, np.zeros(capacity - len(self._row_ids), np.uint64)]
            )
            self._alive = np.concatenate([self._alive, np.zeros(capacity - len(self._alive), bool)])

    def write(self, slots: np.ndarray, means: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> None:
        """These slots hold these images (not yet searched: publishing a longer snapshot makes them so)."""
        while len(slots) and max(slots) // CHUNK_ROWS >= len(self._chunks):
            self._chunks.append(Chunk(self.queries, self.dim))
        for chunk, mine, at in by_chunk(slots):
            target = self._chunks[chunk]
            target.means[at] = torch.from_numpy(np.asarray(means[mine], dtype=np.float16))
            target.codes[at] = torch.from_numpy(np.ascontiguousarray(codes[mine]))
            target.scales[at] = torch.from_numpy(np.asarray(scales[mine], dtype=np.float32))

    def load(self, batches: Iterator[tuple[np.ndarray, ...]], row_ids: np.ndarray) -> None:
        """Fill an empty one from the table: `row_ids`, every row's (any order), then batches of (row ids,
        means, codes, scales), each written to its sorted place."""
        row_ids = np.sort(np.asarray(row_ids, dtype=np.uint64))
        self.reserve(len(row_ids))
        self._row_ids[: len(row_ids)] = row_ids
        self._alive[: len(row_ids)] = True
        for batch_row_ids, means, codes, scales in batches:
            self.write(np.searchsorted(row_ids, batch_row_ids.astype(np.uint64)), means, codes, scales)
        self._publish(len(row_ids))

    def append(self, row_ids: np.ndarray, means: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> None:
        count, added = len(self.snapshot[0]), len(row_ids)
        order = np.argsort(row_ids, kind="stable")
        row_ids = np.asarray(row_ids, dtype=np.uint64)[order]
        if count and added and row_ids[0] <= self._row_ids[count - 1]:
            raise RuntimeError("row ids out of order: the in-memory search data no longer matches the table")
        self.reserve(count + added)
        self._row_ids[count : count + added] = row_ids
        self._alive[count : count + added] = True
        self.write(np.arange(count, count + added), means[order], codes[order], scales[order])
        self._publish(count + added)

    @staticmethod
    def slots_of(known: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
        """The slots in `known` (sorted row ids) of those of `row_ids` that are there."""
        if len(known) == 0:
            return np.zeros(0, dtype=np.int64)
        row_ids = np.asarray(row_ids, dtype=np.uint64)
        found = np.searchsorted(known, row_ids).clip(max=len(known) - 1)
        return found[known[found] == row_ids]

    def remove(self, row_ids: np.ndarray) -> None:
        known, chunks, alive = self.snapshot
        alive[self.slots_of(known, row_ids)] = False
        if (~alive).sum() > max(1024, len(alive) // 4):  # new chunks: searches keep the old ones they hold
            keep = np.flatnonzero(alive)
            means, codes, scales = (
                part.numpy() for part in self.gather(self.snapshot, keep, ("means", "codes", "scales"))
            )
            self._empty()
            self.append(known[keep], means, codes, scales)

    def top(
        self, snapshot: tuple, queries: np.ndarray, limit: int, allowed: np.ndarray | None = None
    ) -> np.ndarray:
        """The slots (of `snapshot`) of the `limit` best images by the best inner product of their mean vector
        with any of `queries` (n, dim), among the live ones (and the `allowed` row ids, if given), best first."""
        known, chunks, alive = snapshot
        if len(known) == 0:
            return np.zeros(0, dtype=np.int64)
        half = torch.from_numpy(np.asarray(queries, dtype=np.float16).reshape(-1, self.dim).copy())
        used = [chunk.means[: len(known) - n * CHUNK_ROWS] for n, chunk in enumerate(chunks)]
        scores = torch.cat([best_products(means, half) for means in used]).float()
        scores[torch.from_numpy(~alive)] = -torch.inf
        slots = np.arange(len(known))
        if allowed is not None:  # a filter: the best of its images only
            slots = self.slots_of(known, allowed)
            scores = scores[torch.from_numpy(slots)]
        found = torch.topk(scores, min(limit, len(slots)))
        return slots[found.indices.numpy()[np.isfinite(found.values.numpy())]]

    @staticmethod
    def gather(snapshot: tuple, slots: np.ndarray, fields: tuple[str, ...]) -> list[torch.Tensor]:
        """These fields of a Chunk (`means`, `codes`, `scales`) for these slots of `snapshot`, which must be
        sorted (then the chunks' parts, one gather each, come in the slots' order)."""
        parts = [(snapshot[1][chunk], at) for chunk, _, at in by_chunk(slots)]
        return [
            torch.cat([getattr(chunk, field).index_select(0, at) for chunk, at in parts]) for field in fields
        ]

    def rough(self, snapshot: tuple, slots: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, float]:
        """The middle pass: the ITC of each slot (of `snapshot`; sorted) from its coarse codes and int8 codes of
        the query vectors, and a bound on how far each is from the exact one. Integer products (torch's
        `_int_mm`, exact in int32) need no widening of the codes: 1,000 images of 32 x 256 in ~2 ms on one
        core, 4x less than float16. Chunk by chunk, so the codes are copied once (into the product's input)."""
        text_codes, text_scales = int8_codes(np.asarray(queries).reshape(-1, self.dim))
        text_codes, text_steps = torch.from_numpy(text_codes.T.copy()), torch.from_numpy(text_scales)
        scores, largest_step = [], 0.0
        for chunk, _, at in by_chunk(slots):
            source = snapshot[1][chunk]
            products = torch._int_mm(source.codes.index_select(0, at).reshape(-1, self.dim), text_codes)
            per_vector = products.float() * text_steps
            steps = source.scales.index_select(0, at)
            scores.append((per_vector.amax(dim=1).reshape(len(at), self.queries) * steps).amax(dim=1))
            largest_step = max(largest_step, float(steps.max()))
        # Rounding leaves each element off by up to half a step, uniformly and independently, so a score of unit
        # vectors is off by sqrt((vector step^2 + text step^2) / 12) in standard deviation. Six of them bound it:
        # the largest error measured was 2.9e-3 against bounds of 4.8-5.7e-3 (20 texts x 2,000 candidates of
        # 100,000 synthetic images), 2.7e-3 against 3.8-4.6e-3 (the built-in model's vectors, 35 x 5,000).
        error = 6 * np.sqrt((largest_step**2 + float(text_scales.max()) ** 2) / 12)
        return torch.cat(scores).numpy(), float(error)
