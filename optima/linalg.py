"""Linear algebra shared by the masks, the updates and the solver: the reconstruction objective."""

from __future__ import annotations

import torch


def quadratic_form(x: torch.Tensor, hessian: torch.Tensor, per_row: bool = True) -> torch.Tensor:
    """x^T H x of each row of ``x`` (``per_row``), else summed over all of its entries; in x's dtype."""
    terms = x * (x @ hessian)
    return terms.sum(1) if per_row else terms.sum()


def reconstruction_error(new: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor,
                         per_row: bool = True) -> torch.Tensor:
    """(w' - w)^T H (w' - w) in float64: the output error of replacing ``weight`` by ``new`` on the
    calibration inputs (H = X^T X), per row or for the whole layer."""
    return quadratic_form(new.double() - weight.double(), hessian.double(), per_row)
