"""A gallery in the format earlier versions wrote (one Milvus row per query vector, a mean-vector row of query -1
per image, the model in a collection property, reached by an alias): the schema and rows exactly as the
Milvus-backed service/gallery.py (before the one-record-per-image stores) created them, so the conversion is
tested against what users have on disk."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient

from service.gallery import Record, mean_vector

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
