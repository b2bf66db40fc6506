"""What a merge method's tensor function receives: one tensor of every model and its resolved parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TensorCall:
    """One tensor's merge: inputs and resolved parameters."""

    name: str
    base: torch.Tensor | None  # None: the method merges `models` without a base
    models: list[torch.Tensor]
    params: list[dict[str, Any]]  # per model, in `models` order
    g: dict[str, Any]  # global parameters
    out_dtype: torch.dtype

    def each(self, key: str) -> list[Any]:
        """One per-model parameter over the models."""
        return [p[key] for p in self.params]
