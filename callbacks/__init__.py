"""Lightning adapters for the OPTIMA engine: the pruning callback, modules for the CLI, the CLI."""

__all__ = ["OptimaPruning"]


def __getattr__(name: str) -> object:
    """``OptimaPruning`` imported on first use: importing ``optima.callbacks.command`` loads no Lightning."""
    if name != "OptimaPruning":
        raise AttributeError(f"module 'optima.callbacks' has no attribute {name!r}")
    from optima.callbacks.pruning import OptimaPruning

    return OptimaPruning
