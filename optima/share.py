"""Several processes pruning one model together: each solves its share of every layer's rows.

Rows of a layer are independent problems that share one Hessian, so with N processes
(data-parallel calibration, Hessians already summed) process r solves the r-th contiguous
N-th of the rows and an all-gather gives every process the whole layer: identical weights
everywhere, about N times less solver work each.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowShare:
    """This process's part of the rows.

    ``all_gather`` takes a tensor of the same shape on every process and returns them
    stacked in rank order, (world_size, ...), as Lightning's ``strategy.all_gather`` does.
    """

    rank: int
    world_size: int
    all_gather: Callable[[torch.Tensor], torch.Tensor]

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size} processes")

    def _per_process(self, rows: int) -> int:
        return -(-rows // self.world_size)

    def span(self, rows: int) -> slice:
        """The rows this process solves: the rank-th contiguous block of ceil(rows / world_size)."""
        per = self._per_process(rows)
        return slice(min(rows, self.rank * per), min(rows, (self.rank + 1) * per))

    def gather(self, part: torch.Tensor, rows: int) -> torch.Tensor:
        """Every process's ``part`` (its ``span(rows)`` rows of some per-row tensor), joined in row order."""
        per = self._per_process(rows)
        padded = part.new_zeros((per, *part.shape[1:]))
        padded[:part.shape[0]] = part
        return self.all_gather(padded).reshape(self.world_size * per, *part.shape[1:])[:rows]

    def gather_columns(self, parts: list[torch.Tensor], rows: int) -> list[torch.Tensor]:
        """``gather`` of several per-row tensors in one collective (each collective costs a latency).

        They travel as the columns of one tensor of the first one's floating dtype, which must hold
        the others exactly (float32 holds flags and counts below 2^24), and come back in their own
        dtypes and shapes.
        """
        dtype = parts[0].dtype
        if not dtype.is_floating_point:
            raise ValueError(f"gather_columns: the first part sets the dtype and must be floating, not {dtype}")
        columns = [part.reshape(part.shape[0], math.prod(part.shape[1:])) for part in parts]   # (0 rows too)
        if any(c.is_floating_point() and torch.finfo(c.dtype).bits > torch.finfo(dtype).bits for c in columns):
            raise ValueError(f"gather_columns: {dtype} cannot hold every part exactly")
        packed = self.gather(torch.cat([c.to(dtype) for c in columns], dim=1), rows)
        widths = [c.shape[1] for c in columns]
        return [column.to(part.dtype).reshape(rows, *part.shape[1:])
                for part, column in zip(parts, packed.split(widths, dim=1))]


def process_group_share() -> RowShare:
    """The share of this process in the default ``torch.distributed`` process group (initialized)."""
    import torch.distributed as dist

    def all_gather(tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    return RowShare(dist.get_rank(), dist.get_world_size(), all_gather)
