"""A calibration layer per head, fitted online on labels the model has not trained on.

An online model's probabilities drift from the truth as the world and the
traffic it serves change under it, even when it still orders items well.
:class:`PlattCalibration` maps each head's logit through ``scale * logit +
shift``; :meth:`PlattCalibration.fit_step` takes one gradient step on fresh
labels, using logits computed *before* the model learned from them (the same
progressive-validation view a launch gate uses), so the layer corrects what
the model gets wrong on new traffic, not what it memorised.

>>> import torch
>>> cal = PlattCalibration(1)
>>> opt = torch.optim.Adam(cal.parameters(), lr=0.05)
>>> logits = torch.zeros(400, 1)               # the model says 50% everywhere...
>>> labels = (torch.arange(400) % 5 == 0).float()[:, None]   # ...the truth is 20%
>>> for _ in range(200):
...     _ = cal.fit_step(opt, logits, labels, torch.ones(400, 1))
>>> round(float(torch.sigmoid(cal(logits).detach()).mean()), 2)
0.2
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PlattCalibration(nn.Module):
    """``scale * logit + shift`` per head; starts as the identity."""

    def __init__(self, heads: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(heads))
        self.shift = nn.Parameter(torch.zeros(heads))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.scale + self.shift

    def fit_step(self, optimizer: torch.optim.Optimizer, logits: torch.Tensor,
                 labels: torch.Tensor, mask: torch.Tensor) -> float:
        """One step on the known (row, head) cells; ``logits`` are detached (the
        model underneath is not trained through this layer).  Returns the loss."""
        cells = F.binary_cross_entropy_with_logits(self(logits.detach()), labels,
                                                   reduction="none") * mask
        loss = cells.sum() / mask.sum().clamp(min=1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            # A negative scale would invert the model's order: never let it cross zero.
            self.scale.clamp_(min=0.05)
        return float(loss.detach())
