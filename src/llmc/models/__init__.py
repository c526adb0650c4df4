"""Models: loading (whole, or lazily tensor by tensor) and the architecture adapters."""

from llmc.models.adapters import (
    ADAPTERS,
    Adapter,
    ScalePair,
    block_linears,
    get_adapter,
)
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

__all__ = [
    "ADAPTERS",
    "DEMO_MODELS",
    "Adapter",
    "DemoModel",
    "ModelSource",
    "ScalePair",
    "block_linears",
    "get_adapter",
    "load_config",
    "load_model",
    "load_tokenizer",
    "resolve",
    "stored_dtype",
]
