"""The compression methods, one module each: a frozen config dataclass, pure functions with the
paper's math, and a thin class registered by name next to its config. Importing this package
imports every module in it, so each method registers itself in :data:`llmc.registry.METHODS`:
a new method is one new file."""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
