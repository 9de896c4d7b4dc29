"""The persistent image gallery (/gallery routes, `blip2-serve gallery`): gallery.py is the entry point,
common.py the shared rules and the store interface, lance_store.py and milvus_store.py the two engines,
legacy.py the conversion of galleries written by earlier versions."""

from service.engine.gallery.common import (
    MAX_METADATA_BYTES,
    NAME_PATTERN,
    NAME_RULE,
    GalleryError,
    NewImage,
    Planned,
    Record,
    Stored,
    check_filter,
    check_metadata,
    check_name,
    content_key,
    mean_vector,
    model_fingerprint,
)
from service.engine.gallery.gallery import Gallery, model_description, open_gallery, open_store

__all__ = [
    "MAX_METADATA_BYTES",
    "NAME_PATTERN",
    "NAME_RULE",
    "Gallery",
    "GalleryError",
    "NewImage",
    "Planned",
    "Record",
    "Stored",
    "check_filter",
    "check_metadata",
    "check_name",
    "content_key",
    "mean_vector",
    "model_description",
    "model_fingerprint",
    "open_gallery",
    "open_store",
]
