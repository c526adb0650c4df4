"""Checkpoint formats, one module each: a layout (checks, a writer, a reader) registered by name
in :data:`llmc.registry.FORMATS`. Importing this package imports every module in it, so a new
format is one new file."""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
