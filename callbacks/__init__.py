"""Lightning adapters for the OPTIMA engine: the pruning callback, modules for the CLI, the CLI."""

from optima.callbacks.pruning import OptimaPruning

__all__ = ["OptimaPruning"]
