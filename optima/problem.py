"""One layer's pruning problem, built once and handed to the update, the refinement and the solver.

A layer's weight, its Hessian (undamped, for the objective; damped, for the solves), the damping,
the mask, the pattern, the per-row weight range and the "ldl" input order travel together; so does
the row share of several processes, and this is the one place that splits the rows between them,
solves this process's rows and joins the results. Under the error-correcting objective
(``optima.target``) ``weight`` is the anchor ``w*`` and ``goals`` hold the objective to report.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from optima.block_ldl import keep_rate_order
from optima.linalg import Damping, reconstruction_error
from optima.masks import Pattern
from optima.share import RowShare
from optima.solver import QPResult, SolverOptions, resolve_method, solve_pinned
from optima.target import RowGoals


@dataclass(frozen=True)
class LayerProblem:
    """What the OPTIMA update and the mask refinement of one layer (or some of its rows) work on."""

    weight: torch.Tensor       # (rows, d) the weight the solve is anchored at (the dense one, or w*)
    hessian: torch.Tensor      # (d, d) undamped H: the objective
    damped: torch.Tensor       # (d, d) H as damped for the solves
    damping: Damping
    keep: torch.Tensor         # (rows, d) bool, True = kept
    pattern: Pattern
    order: torch.Tensor        # the "ldl" input order, from the whole layer's mask
    weight_range: tuple[torch.Tensor, torch.Tensor] | None = None   # per row: [min, max] of the new weights
    share: RowShare | None = None   # several processes: each solves its span of the rows
    goals: RowGoals | None = None   # the error-correcting objective; None: (w' - w)^T H (w' - w)

    @classmethod
    def build(cls, weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, pattern: Pattern, *,
              damped: tuple[torch.Tensor, Damping], keep_row_range: bool = False, share: RowShare | None = None,
              goals: RowGoals | None = None) -> LayerProblem:
        """The problem of ``weight`` under ``keep`` with ``damped`` = (damped H, its damping), with
        ``keep_row_range`` every row's original [min, max] as its bounds."""
        weight_range = (weight.amin(1), weight.amax(1)) if keep_row_range else None
        return cls(weight, hessian, *damped, keep, pattern, keep_rate_order(keep), weight_range, share, goals)

    def rows(self, index: slice | torch.Tensor, keep: torch.Tensor | None = None) -> LayerProblem:
        """The same problem on some of its rows, with ``keep`` for them (default: theirs); not shared."""
        bounds = None if self.weight_range is None else tuple(bound[index] for bound in self.weight_range)
        return replace(self, weight=self.weight[index], keep=self.keep[index] if keep is None else keep,
                       weight_range=bounds, share=None, goals=None if self.goals is None else self.goals.rows(index))

    def own(self) -> LayerProblem:
        """The rows this process solves: all of them without a share."""
        return self if self.share is None else self.rows(self.share.span(self.weight.shape[0]))

    def gather(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-row tensors of this process's rows, joined into the whole layer's (as given without a share)."""
        return parts if self.share is None else self.share.gather_columns(parts, self.weight.shape[0])

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the processes (as given without a share)."""
        return values if self.share is None else self.share.all_gather(values).sum(0)

    def errors(self, new: torch.Tensor) -> torch.Tensor:
        """Each row's objective at ``new`` (float64, undamped H): (w' - w)^T H (w' - w), or the
        error-correcting one of ``goals``."""
        if self.goals is None:
            return reconstruction_error(new, self.weight, self.hessian)
        return self.goals.errors(new, self.hessian)

    def objectives(self, candidates: list[torch.Tensor]) -> list[float]:
        """The layer objective, summed over rows (float64), of each whole-layer candidate ``w'``; with
        a share each process sums its rows and one collective adds the sums."""
        own = self.own()
        rows = slice(None) if self.share is None else self.share.span(self.weight.shape[0])
        if own.goals is None:
            parts = [float(reconstruction_error(new[rows], own.weight, self.hessian, per_row=False))
                     for new in candidates]
        else:
            parts = [float(own.errors(new[rows]).sum()) for new in candidates]
        if self.share is None:
            return parts
        return self.total(torch.tensor(parts, dtype=torch.float64, device=self.weight.device)).tolist()

    def solve(self, options: SolverOptions) -> QPResult:
        """``solve_pinned`` of this process's rows, joined so that every process holds the whole result."""
        own = self.own()
        if self.share is not None:  # every process must take the same path: choose it from the whole mask
            options = replace(options, method=resolve_method(options.method, self.keep,
                                                             self.weight_range is not None))
        part = solve_pinned(own.damped, own.weight, own.keep, own.damping, options,
                            weight_range=own.weight_range, order=own.order)
        return part if self.share is None else self._joined(part)

    def _joined(self, part: QPResult) -> QPResult:
        """Every process's rows of a solve joined; escalated rows counted over all processes (damping and
        method are the same everywhere)."""
        escalated = part.damping.escalated_rows if part.damping is not None else 0
        counts = self.share.all_gather(torch.tensor([escalated, part.newton_iterations], device=part.delta.device))
        per_row = [part.delta, part.converged, part.cg_iterations, part.kkt_residual]
        delta, converged, cg_iterations, kkt, *gap = self.gather(
            per_row if part.gap_bound is None else [*per_row, part.gap_bound])
        damping = None if part.damping is None else replace(part.damping, escalated_rows=int(counts[:, 0].sum()))
        return QPResult(delta=delta, converged=converged, cg_iterations=cg_iterations, kkt_residual=kkt,
                        gap_bound=gap[0] if gap else None, newton_iterations=int(counts[:, 1].max()),
                        method=part.method, damping=damping)
