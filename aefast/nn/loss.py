from __future__ import annotations

import torch
from torch import nn

from aefast import functional as AF


class ReconstructionLoss(nn.Module):
    """Fused reconstruction loss; ``reduction="per_sample"`` gives one score per batch item."""

    def __init__(self, kind: str = "mse", reduction: str = "mean", delta: float = 1.0):
        super().__init__()
        if kind not in AF.LOSS_KINDS:
            raise ValueError(f"aefast: unknown loss kind {kind!r}; choose one of {AF.LOSS_KINDS}")
        self.kind, self.reduction, self.delta = kind, reduction, delta

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return AF.reconstruction_loss(input, target, self.kind, self.reduction, delta=self.delta)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, reduction={self.reduction!r}"


class Corruption(nn.Module):
    """Denoising-AE input corruption, applied in train mode only (identity in eval)."""

    def __init__(self, kind: str = "gaussian", level: float = 0.1, generator: torch.Generator | None = None,
                 low: float = 0.0, high: float = 1.0):
        super().__init__()
        if kind not in AF.CORRUPTIONS:
            raise ValueError(f"aefast: unknown corruption {kind!r}; choose one of {AF.CORRUPTIONS}")
        self.kind, self.level, self.generator, self.low, self.high = kind, level, generator, low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.level == 0:
            return x
        return AF.corrupt(x, self.kind, self.level, self.generator, low=self.low, high=self.high)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, level={self.level}"
