"""Stand-in networks for the ported GenEval detector's tests (shared by the port's and the metric's)."""

from __future__ import annotations

import torch


class FixedOutputs(torch.nn.Module):
    """A stand-in network with the same class logits for every image and one set of mask logits, resized
    to the input's quarter size."""

    def __init__(self, classes: torch.Tensor, masks: torch.Tensor) -> None:
        super().__init__()
        self.classes, self.masks = classes, masks

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = batch.shape
        masks = torch.nn.functional.interpolate(self.masks[None], (h // 4, w // 4), mode="bilinear")
        return self.classes.expand(b, -1, -1), masks.expand(b, -1, -1, -1)
