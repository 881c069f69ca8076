"""Datasets, loaders and samplers. Every built-in dataset, sampler and transform module is imported
here, so registration never depends on import order (a new one is a file here plus a name below)."""

from src.data import (
    arithmetic,
    batch_views,
    digits,
    docstrings,
    hf,
    image_folder,
    image_text,
    jsonl,
    objects,
    samplers,
    shards,
    text,
    views,
)
