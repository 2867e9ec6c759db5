"""PatchCore (Roth et al., CVPR 2022), faithful to the paper and its official implementation.

Usable alone: `PatchCore(config.model).fit(loader)` / `.predict(loader)`, `MemoryBank.load(path)`,
`greedy_coreset(features, size)`. Never imports the federation.
"""

from patchcore.coreset import coverage_radius, greedy_coreset
from patchcore.memory_bank import MemoryBank
from patchcore.model import PatchCore

__all__ = ["MemoryBank", "PatchCore", "coverage_radius", "greedy_coreset"]
