"""llmc: compress large language models so that they run on less hardware."""

from llmc.api import CompressionReport, compress, distill, evaluate, load, plan, save
from llmc.calibration import CalibrationConfig
from llmc.recipe import Recipe, Step

__version__ = "0.1.0"

__all__ = [
    "CalibrationConfig",
    "CompressionReport",
    "Recipe",
    "Step",
    "compress",
    "distill",
    "evaluate",
    "load",
    "plan",
    "save",
]
