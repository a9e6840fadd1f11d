"""OPTIMA: one-shot pruning with exact per-row quadratic-program reconstruction.

The engine works on plain tensors and modules: options (``optima.config``), Hessians
(``optima.hessian``), masks (``optima.masks``, ``optima.sparsegpt``, ``optima.thanos``), the QP
solver (``optima.solver``, its preconditioner ``optima.block_ldl``, ``optima.direct``), one layer
(``optima.prune``), the walk over a model (``optima.walk``), the report (``optima.report``). The
Lightning adapters install as ``optima.callbacks`` (the engine never imports them).
"""

from optima.config import OptionError, PruneConfig
from optima.hessian import HessianAccumulator, damp_hessian
from optima.masks import Pattern, parse_pattern
from optima.prune import PruneResult, PruneStats, prune_weight, reconstruction_objective
from optima.solver import SolverOptions, solve_box_qp, solve_pinned

__all__ = [
    "HessianAccumulator", "OptionError", "Pattern", "PruneConfig", "PruneResult", "PruneStats", "SolverOptions", "damp_hessian",
    "parse_pattern", "prune_weight", "reconstruction_objective", "solve_box_qp", "solve_pinned",
]
