"""The engine: the block-by-block walk (capture, device placement, the lockstep of chunks, the
activation cache in RAM or on disk), streaming a checkpoint from disk to disk, resuming a
killed run, and the plan of its memory, disk and time."""

from llmc.engine.config import DTYPES, WalkerConfig
from llmc.engine.walker import Engine, EngineOptions, LayerRecord, WalkReport

__all__ = ["DTYPES", "Engine", "EngineOptions", "LayerRecord", "WalkReport", "WalkerConfig"]
