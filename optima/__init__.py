"""OPTIMA: one-shot pruning with exact per-row quadratic-program reconstruction.

The engine works on plain tensors and modules: options (``optima.config``), Hessians
(``optima.hessian``), masks (``optima.masks``, ``optima.sparsegpt``, ``optima.thanos``), the shared
linear algebra (``optima.linalg``), the QP solver (``optima.solver``, its CG kernel ``optima.cg``, its
preconditioner ``optima.block_ldl``, ``optima.direct``), one layer (``optima.problem``, ``optima.prune``), the walk over a model (``optima.walk``), the report (``optima.report``). The
Lightning adapters install as ``optima.callbacks`` (the engine never imports them).
"""

import importlib

_EXPORTS = {
    "OptionError": "optima.config", "PruneConfig": "optima.config", "HessianAccumulator": "optima.hessian",
    "damp_hessian": "optima.hessian", "Pattern": "optima.masks", "parse_pattern": "optima.masks",
    "PruneResult": "optima.prune", "PruneStats": "optima.prune", "prune_weight": "optima.prune",
    "reconstruction_objective": "optima.prune", "SolverOptions": "optima.solver", "solve_box_qp": "optima.solver",
    "solve_pinned": "optima.solver",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    """Import an export's module on first use: ``import optima`` stays instant, so the ``optima`` command
    catches a Ctrl-C from its first line (``optima.callbacks.command``)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'optima' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
