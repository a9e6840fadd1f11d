"""The "ldl" preconditioner: a block LDL^T factorization of the scaled Hessian, restricted per row.

With inputs grouped into consecutive blocks of ``block`` columns, H = L D L^T where L is unit
block-lower-triangular (identity diagonal blocks) and D is block diagonal. For a row whose
free (kept) set is K the preconditioner is

    M = L_KK S L_KK^T,   S = per block, ((D_B^-1)_KK)^-1   (the Schur complement of D_B's pruned part)

Two facts make it work:
- M <= H_KK (Loewner order), so M^-1 >= (H_KK)^-1 and CG's r^T z is a proven bound on the row's
  objective gap, exactly as with "hinv": writing u^T [L_KK L_KP] = [a^T c^T],
  u^T H_KK u = [a; c]^T D [a; c] >= a^T S a (minimizing over c) = u^T M u.
- M^-1 costs about one (rows x d) @ (d x d) matmul per application, shared by every row: L_KK is
  unit block-triangular, so the substitutions are one matmul panel per block with no per-row
  triangular solve, and S^-1 = (D_B^-1)_KK is the kept block of a shared b x b matrix.

``block = d`` gives L = I and M^-1 = (H^-1)_KK, the "hinv" preconditioner; ``block = 1`` gives the
Cholesky factor restricted to K. Smaller blocks leave less of H to CG (fewer iterations) at more,
thinner panels. The order of the inputs matters: the solver puts inputs most rows keep first
(``keep_rate_order``), which leaves less of H's coupling in the dropped L_KP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def keep_rate_order(keep: torch.Tensor) -> torch.Tensor:
    """Inputs by decreasing number of rows that keep them: the "ldl" factorization's order.

    The preconditioner drops the coupling L_KP of each row's kept inputs to pruned inputs earlier in
    the order; inputs that most rows keep first leave little of it (bench/README.md measures it).
    """
    return torch.argsort(keep.sum(0), descending=True, stable=True)


@dataclass
class BlockLDL:
    """The shared factors of the "ldl" preconditioner (module docstring)."""

    block: int
    forward: list[torch.Tensor]         # per block B: L[B, :start(B)]^T   (start x b)
    backward: list[torch.Tensor]        # per block B: L[end(B):, B]       ((d - end) x b)
    block_inverse: list[torch.Tensor]   # per block B: D_B^-1 (b x b, symmetric)

    @classmethod
    def from_cholesky(cls, factor: torch.Tensor, block: int) -> BlockLDL:
        """The block LDL^T factors from the lower Cholesky factor C of H = C C^T.

        With C_B the diagonal blocks of C: L = C blockdiag(C_B)^-1 and D_B = C_B C_B^T.
        """
        d = factor.shape[0]
        lower, block_inverse = factor.clone(), []
        for start in range(0, d, block):
            end = min(start + block, d)
            eye = torch.eye(end - start, dtype=factor.dtype, device=factor.device)
            c_inv = torch.linalg.solve_triangular(factor[start:end, start:end], eye, upper=False)
            lower[:, start:end] = factor[:, start:end] @ c_inv
            block_inverse.append(c_inv.T @ c_inv)
        starts = range(0, d, block)
        forward = [lower[start:start + block, :start].T.contiguous() for start in starts]
        backward = [lower[start + block:, start:start + block].contiguous() for start in starts]
        return cls(block, forward, backward, block_inverse)

    def to(self, dtype: torch.dtype) -> BlockLDL:
        """A copy whose factors are in ``dtype`` (low-precision CG matmuls)."""
        return BlockLDL(self.block, *([t.to(dtype) for t in ts] for ts in (self.forward, self.backward,
                                                                             self.block_inverse)))

    def apply(self, r: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
        """``M^-1 r`` per row for residuals ``r`` (rows x d, zero off the row's free set ``free``).

        Forward substitution with L_KK, the kept blocks of D^-1, back substitution with L_KK^T; in
        the factors' dtype, the result in ``r``'s.
        """
        out_dtype, dtype = r.dtype, self.block_inverse[0].dtype
        r, free = r.to(dtype), free.to(dtype)
        y, z, x = torch.empty_like(r), torch.empty_like(r), torch.empty_like(r)
        bounds = [(start, min(start + self.block, r.shape[1])) for start in range(0, r.shape[1], self.block)]
        for (start, end), lower, d_inv in zip(bounds, self.forward, self.block_inverse):
            y[:, start:end] = (r[:, start:end] - y[:, :start] @ lower) * free[:, start:end]
            z[:, start:end] = (y[:, start:end] @ d_inv) * free[:, start:end]
        for (start, end), upper in zip(reversed(bounds), reversed(self.backward)):
            x[:, start:end] = (z[:, start:end] - x[:, end:] @ upper) * free[:, start:end]
        return x.to(out_dtype)
