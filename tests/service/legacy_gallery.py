"""A gallery in the format earlier versions wrote (one Milvus row per query vector, a mean-vector row of query -1
per image, the model in a collection property, reached by an alias): the schema and rows exactly as the
Milvus-backed service/engine/gallery.py (before the one-record-per-image stores) created them, so the conversion is
tested against what users have on disk."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient

from service.engine.gallery import Record, mean_vector

NAME = "blip2_gallery"
PROPERTY = "blip2.gallery"


def write_old_gallery(
    client: MilvusClient, model: dict[str, Any], records: list[Record], flush: bool
) -> None:
    """Create the old collection `blip2_gallery_1` (alias `blip2_gallery`) on `client` and insert `records`."""
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=200)
    schema.add_field("image_id", DataType.VARCHAR, max_length=128)
    schema.add_field("query", DataType.INT16)
    schema.add_field("sha256", DataType.VARCHAR, max_length=64)
    schema.add_field("file", DataType.VARCHAR, max_length=200)
    schema.add_field("added_at", DataType.INT64)
    schema.add_field("meta", DataType.JSON)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=model["dim"])
    index = client.prepare_index_params()
    index.add_index("vector", index_type="FLAT", metric_type="IP")
    for field in ("image_id", "sha256"):
        index.add_index(field, index_type="INVERTED")
    record = {
        "fingerprint": model["fingerprint"],
        "model": model["name"],
        "dim": model["dim"],
        "queries": model["queries"],
        "index": "FLAT",
        "created": time.time(),
    }
    collection = f"{NAME}_1"
    client.create_collection(
        collection, schema=schema, index_params=index, num_shards=1, properties={PROPERTY: json.dumps(record)}
    )
    client.create_alias(collection, NAME)
    insert_old_rows(client, records)
    if flush:
        client.flush(NAME)


def insert_old_rows(client: MilvusClient, records: list[Record]) -> None:
    """Each image's rows in one insert, as the old Gallery.add did (without its flush)."""
    for image in records:
        vectors = np.asarray(image.vectors, dtype=np.float32)
        numbered = [*enumerate(vectors), (-1, mean_vector(vectors))]
        rows = [
            {
                "pk": f"{image.image_id}/{query}",
                "image_id": image.image_id,
                "query": query,
                "sha256": image.sha256,
                "file": image.file,
                "added_at": int(image.added_at * 1000),
                "meta": image.metadata,
                "vector": vector,
            }
            for query, vector in numbered
        ]
        client.insert(NAME, rows)


def write_format2_gallery(folder: Path, model: dict[str, Any], records: list[Record]) -> None:
    """A LanceDB gallery as the first one-record-per-image store wrote it (gallery.json format 2): a table
    without stable row ids, its row as today's (the mean float32, the vectors float16), an ANN index on
    `mean`, and a compaction after the adds, which moves rows to new addresses."""
    import lancedb
    import pyarrow as pa
    from lancedb.index import IvfFlat

    queries, dim = model["queries"], model["dim"]
    vectors = np.stack([r.vectors for r in records]).astype(np.float32)
    table = pa.table(
        {
            "id": [r.image_id for r in records],
            "sha256": [r.sha256 for r in records],
            "file": [r.file for r in records],
            "added_at": [r.added_at for r in records],
            "meta": [json.dumps(r.metadata) for r in records],
            "tags": [[f"{k}={json.dumps(v)}" for k, v in r.metadata.items()] for r in records],
            "mean": pa.FixedSizeListArray.from_arrays(
                pa.array(np.stack([mean_vector(v) for v in vectors]).reshape(-1)), dim
            ),
            "vectors": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.astype(np.float16).reshape(-1)), queries * dim
            ),
        }
    )
    db = lancedb.connect(folder / "lance")
    created = db.create_table("images_1", data=table.slice(0, len(records) // 2))
    created.add(table.slice(len(records) // 2))
    created.create_index("mean", config=IvfFlat(distance_type="dot", num_partitions=2))
    created.optimize()
    info = {
        "format": 2,
        "engine": "lancedb",
        "table": "images_1",
        "model": model["name"],
        "created": time.time(),
    }
    info |= {key: model[key] for key in ("fingerprint", "dim", "queries")}
    (folder / "gallery.json").write_text(json.dumps(info))
