"""Some rows of a batch, read and written back by view when they are consecutive.

An adapter that serves only some rows of a batch reads those rows, computes their delta and adds it back. With
a list of batch indices that is an `index_select` and an `index_add_`; on a CPU with two OpenMP threads each
costs 12-23 µs even for a few rows (the bench model's decode step), several times a slice and an in-place add.
Rows of one adapter are often consecutive (one row, or rows admitted together), so `Rows` keeps the range as
well and uses views when it can.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rows:
    """Batch rows: index [n] (batch indices); span (start, stop) when they are consecutive, ascending."""

    index: torch.Tensor
    span: tuple[int, int] | None

    @classmethod
    def of(cls, rows: Sequence[int], device: torch.device | str | None = None) -> Rows:
        rows = list(rows)
        consecutive = bool(rows) and all(b == a + 1 for a, b in zip(rows, rows[1:], strict=False))
        return cls(torch.tensor(rows, device=device), (rows[0], rows[-1] + 1) if consecutive else None)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """t[rows]: t [B, ...] -> [n, ...] (a view when consecutive)."""
        if self.span is not None:
            return t[self.span[0] : self.span[1]]
        return t.index_select(0, self.index)

    def add_into(self, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """y[rows] += delta, in place; returns y. y [B, ...], delta [n, ...]."""
        if self.span is not None:
            y[self.span[0] : self.span[1]].add_(delta)
            return y
        return y.index_add_(0, self.index, delta)

    def copy_into(self, y: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """y[rows] = values, in place; returns y."""
        if self.span is not None:
            y[self.span[0] : self.span[1]].copy_(values)
            return y
        return y.index_copy_(0, self.index, values)
