"""The whole detector and its checkpoint: ``backbone.*`` (Swin-S) and ``panoptic_head.*`` (pixel
decoder, transformer decoder, heads), named as in the released mmdet 2.x checkpoint
(``..._20220504_001756-743b7d99.pth``, 649 entries), which loads with ``strict=True``.

The mmdet 3.x copy of the same weights (``..._20220504_001756-c9d0c4f2.pth``) renamed the transformer
layers' attention and FFN modules (mmdet PR #9515); :func:`mmdet2_names` maps those names back. The
3.x file is the one that silently scored 0 under mmdet 2.x, which loads non-strictly (GenEval issue 6);
here any other mismatch is an error.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from rtdmd.geneval.m2f.head import Mask2FormerHead
from rtdmd.geneval.m2f.swin import SwinTransformer

MMDET3_TO_2 = (  # (mmdet 3.x pattern, mmdet 2.x replacement); each names its own layer stack
    (r"(pixel_decoder\.encoder\.layers\.\d+\.)self_attn\.", r"\1attentions.0."),
    (r"(pixel_decoder\.encoder\.layers\.\d+\.)ffn\.", r"\1ffns.0."),
    (r"(transformer_decoder\.layers\.\d+\.)cross_attn\.", r"\1attentions.0."),
    (r"(transformer_decoder\.layers\.\d+\.)self_attn\.", r"\1attentions.1."),
    (r"(transformer_decoder\.layers\.\d+\.)ffn\.", r"\1ffns.0."),
)


class Mask2Former(nn.Module):
    """Normalised RGB ``[B, 3, H, W]`` -> class logits ``[B, 100, 81]`` and mask logits ``[B, 100, H/4, W/4]``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = SwinTransformer()
        self.panoptic_head = Mask2FormerHead()

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.panoptic_head(self.backbone(image))


def mmdet2_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename mmdet 3.x transformer-layer keys to their 2.x names; 2.x keys pass unchanged."""
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in MMDET3_TO_2:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> Mask2Former:
    """The detector with the weights of an mmdet checkpoint file (``{"state_dict": ...}`` or a bare
    state dict), in float32, in eval mode; every key must match (``strict=True``)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = mmdet2_names(blob.get("state_dict", blob))
    model = Mask2Former()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: not the GenEval detector's checkpoint (Mask2Former Swin-S, COCO): "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return model.float().eval().to(device)
