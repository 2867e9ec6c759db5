"""PatchCore (Roth et al., CVPR 2022), faithful to the paper and its official implementation.

Usable alone: `PatchCore(config.model).fit(loader)` / `.predict(loader)`, `MemoryBank.load(path)`,
`greedy_coreset(features, size)`. Never imports the federation.
"""

import importlib
from typing import Any

# Imported on first use (PEP 562), so `import patchcore.config` stays free of torch: the CLI
# reads and validates a config before any heavy library loads.
_LAZY = {"MemoryBank": "patchcore.memory_bank", "PatchCore": "patchcore.model",
         "coverage_radius": "patchcore.coreset", "greedy_coreset": "patchcore.coreset"}

__all__ = ["MemoryBank", "PatchCore", "coverage_radius", "greedy_coreset"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
