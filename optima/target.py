"""The error-correcting objective: a layer fitted to the outputs the dense model would have produced.

With ``X~`` the layer's inputs as they arrive from the already pruned blocks and ``X`` its inputs in the
dense model, each row of the new weight minimises

    ||X~ w' - X w||^2 = w'^T H~ w' - 2 w'^T C w + w^T H w,   H~ = X~^T X~,  C = X~^T X,  H = X^T X,

instead of today's ``||X~ (w' - w)||^2``. Damped as that one is (``lambda ||w' - w||^2`` added), the
optimum with the pruned entries pinned to zero solves ``(H~ + lambda I)_KK w'_K = (C w + lambda w)_K``:
the ordinary pinned problem of the *anchor* ``w* = (H~ + lambda I)^-1 (C w + lambda w)`` under the same
damped ``H~``. So the masks, the solver and the refinement run unchanged on ``(w*, H~)``, and only the
objective that is reported and guarded (``RowGoals``) is written differently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optima.linalg import Damping, cholesky_escalating, quadratic_form


@dataclass(frozen=True)
class RowGoals:
    """Each row's error-correcting objective ``w'^T H~ w' - 2 w'^T (C w) + w^T H w``, without H~."""

    linear: torch.Tensor     # (rows, d) float64: C w of each dense row
    constant: torch.Tensor   # (rows,) float64: w^T H w, the energy of the dense model's outputs

    def rows(self, index: slice | torch.Tensor) -> RowGoals:
        return RowGoals(self.linear[index], self.constant[index])

    def errors(self, new: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
        """The objective of each row of ``new`` (float64); ``hessian`` is the undamped H~."""
        new = new.double()
        return quadratic_form(new, hessian.double()) - 2 * (new * self.linear).sum(1) + self.constant


@dataclass(frozen=True)
class DenseTarget:
    """A layer's cross and dense Hessians, ``C = X~^T X`` and ``H = X^T X`` (scaled as H~ is)."""

    cross: torch.Tensor
    dense: torch.Tensor

    def goals(self, weight: torch.Tensor) -> RowGoals:
        """The objective of each row of the dense ``weight``."""
        w = weight.double()
        return RowGoals(w @ self.cross.double().T, quadratic_form(w, self.dense.double()))

    def anchor(self, weight: torch.Tensor, hessian: torch.Tensor, damped: torch.Tensor,
               damping: Damping) -> tuple[torch.Tensor, torch.Tensor, Damping]:
        """``(w*, H~ + lambda I, damping)``: the unpruned optimum of every row, and the damped H~ it solves
        (damped further under the escalation policy if it did not factor). A dead input of ``H~`` keeps
        its dense weight."""
        damped, lower, used = cholesky_escalating(damped, damping)
        rhs = weight @ self.cross.to(weight.dtype).T + used.value * weight
        dead = hessian.diagonal() <= 0
        rhs[:, dead] = weight[:, dead] * damped.diagonal()[dead]
        return torch.cholesky_solve(rhs.T, lower).T, damped, used
