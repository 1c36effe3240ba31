"""Resumable, multi-device extraction of any per-sample output into numpy shards."""
from jaxroute.extraction.job import (
    ExtractionResult, load_manifest, load_shards, run_extraction, shard_path,
)
from jaxroute.extraction.plan import BatchPlan, batch_size_for_memory, parse_bytes, plan_batches

__all__ = [
    "BatchPlan", "ExtractionResult", "batch_size_for_memory", "load_manifest", "load_shards", "parse_bytes",
    "plan_batches", "run_extraction", "shard_path",
]
