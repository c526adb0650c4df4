"""Models: loading (whole, or lazily tensor by tensor) and their structure, found by running a
small copy of the architecture (the adapters)."""

from llmc.models import kvcache  # noqa: F401  (registers the recipe's kv_cache section)
from llmc.models.adapters import OVERRIDES, Adapter, block_linears, get_adapter
from llmc.models.loading import (
    DEMO_MODELS,
    DemoModel,
    ModelSource,
    load_config,
    load_model,
    load_tokenizer,
    resolve,
    stored_dtype,
)
from llmc.models.scaling import ScalePair

__all__ = [
    "DEMO_MODELS",
    "Adapter",
    "DemoModel",
    "ModelSource",
    "OVERRIDES",
    "ScalePair",
    "block_linears",
    "get_adapter",
    "load_config",
    "load_model",
    "load_tokenizer",
    "resolve",
    "stored_dtype",
]
