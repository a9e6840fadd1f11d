"""What to prune and how: one validated set of options shared by every entry point."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from optima.masks import Pattern
from optima.prune import validate_options
from optima.solver import SolverOptions


@dataclass
class PruneConfig:
    """Options of a pruning run (field names follow llm-compressor where they exist).

    ``sparsity`` is one ratio for every layer, or a mapping from a regex on the layer
    name to its ratio (first match wins; unmatched layers get ``default_sparsity``).
    """

    sparsity: float | dict[str, float] | None = 0.5
    pattern: str = "unstructured"       # "unstructured" or "N:M" (llm-compressor: mask_structure)
    mask: str = "wanda"                 # optima.masks.MASK_SELECTORS
    update: str = "optima"              # "none" | "optima" | the selector's own ("sparsegpt", "thanos")
    damp: float = 0.01                  # llm-compressor: dampening_frac
    blocksize: int = 128                # SparseGPT's lazy-update block
    default_sparsity: float | None = 0.5
    hessian_dtype: torch.dtype = torch.float32
    solver: SolverOptions = field(default_factory=SolverOptions)

    def __post_init__(self) -> None:
        if self.damp < 0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")
        if self.blocksize < 1:
            raise ValueError(f"blocksize must be positive, got {self.blocksize}")
        if self.hessian_dtype not in (torch.float32, torch.float64):
            raise ValueError("hessian_dtype must be float32 or float64")
        if isinstance(self.sparsity, dict):
            for regex, value in self.sparsity.items():
                re.compile(regex)
                validate_options(value, self.pattern, self.mask, self.update)
            validate_options(self.default_sparsity, self.pattern, self.mask, self.update)
        else:
            validate_options(self.sparsity, self.pattern, self.mask, self.update)

    def sparsity_for(self, layer_name: str) -> float | None:
        """The sparsity ratio that applies to ``layer_name``."""
        if not isinstance(self.sparsity, dict):
            return self.sparsity
        for regex, value in self.sparsity.items():
            if re.search(regex, layer_name):
                return value
        return self.default_sparsity

    def pattern_for(self, layer_name: str) -> Pattern:
        return validate_options(self.sparsity_for(layer_name), self.pattern, self.mask, self.update)
