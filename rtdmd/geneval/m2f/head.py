"""Mask2Former's transformer decoder and prediction heads as mmdet 2.x builds them
(``Mask2FormerHead``), inference only, with its parameter names (``panoptic_head.*`` in the checkpoint).

100 queries attend, layer by layer, to the pixel decoder's maps at strides 32, 16, 8, 32, ... (9
layers: masked cross-attention, self-attention, FFN, each post-norm). Before each layer the current
mask prediction, resized to that level, restricts the cross-attention to the pixels it calls
foreground (``sigmoid < 0.5`` is masked, as mmdet tests it); a query whose mask would cover no pixel
attends everywhere instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rtdmd.geneval.m2f.pixel_decoder import DIMS, LEVELS, PixelDecoder, ffn, sine_position

HEADS = 8
QUERIES = 100
CLASSES = 80  # COCO things; the classifier has one more output, "no object"


def attention_mask(mask_logits: Tensor, size: tuple[int, int], heads: int = HEADS) -> Tensor:
    """``[B * heads, Q, h w]`` boolean mask (True = not attended) from ``[B, Q, H, W]`` mask logits:
    bilinear resize to ``size``, ``sigmoid < 0.5``; rows that would mask every pixel are cleared."""
    resized = F.interpolate(mask_logits, size, mode="bilinear", align_corners=False).flatten(2)
    masked = resized.sigmoid() < 0.5
    masked = masked & ~masked.all(-1, keepdim=True)
    return masked.repeat_interleave(heads, dim=0)


class MHA(nn.Module):
    """mmcv's MultiheadAttention wrapper: ``identity + attn(q + q_pos, k + k_pos, v)``."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(DIMS, HEADS, batch_first=True)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, mask: Tensor | None) -> Tensor:
        return q + self.attn(q + q_pos, k + k_pos, v, attn_mask=mask, need_weights=False)[0]


class DecoderLayer(nn.Module):
    """``attentions.0`` cross-attention, ``attentions.1`` self-attention, ``ffns.0``; ``norms.0-2`` after each."""

    def __init__(self) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([MHA(), MHA()])
        self.ffns = nn.ModuleList([ffn(DIMS, 8 * DIMS)])
        self.norms = nn.ModuleList([nn.LayerNorm(DIMS) for _ in range(3)])

    def forward(self, query: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor, mask: Tensor) -> Tensor:
        query = self.norms[0](self.attentions[0](query, memory, memory, query_pos, memory_pos, mask))
        query = self.norms[1](self.attentions[1](query, query, query, query_pos, query_pos, None))
        return self.norms[2](query + self.ffns[0].layers(query))


class Mask2FormerHead(nn.Module):
    """Backbone maps -> (class logits ``[B, 100, 81]``, mask logits ``[B, 100, H/4, W/4]``) of the last layer."""

    def __init__(self, layers: int = 9) -> None:
        super().__init__()
        self.pixel_decoder = PixelDecoder()
        self.transformer_decoder = nn.Module()
        self.transformer_decoder.layers = nn.ModuleList(DecoderLayer() for _ in range(layers))
        self.transformer_decoder.post_norm = nn.LayerNorm(DIMS)
        self.query_embed = nn.Embedding(QUERIES, DIMS)
        self.query_feat = nn.Embedding(QUERIES, DIMS)
        self.level_embed = nn.Embedding(LEVELS, DIMS)
        self.cls_embed = nn.Linear(DIMS, CLASSES + 1)
        self.mask_embed = nn.Sequential(
            nn.Linear(DIMS, DIMS), nn.ReLU(), nn.Linear(DIMS, DIMS), nn.ReLU(), nn.Linear(DIMS, DIMS)
        )

    def predict(self, query: Tensor, mask_features: Tensor) -> tuple[Tensor, Tensor]:
        """Class and mask logits of the (post-normed) queries."""
        query = self.transformer_decoder.post_norm(query)
        return self.cls_embed(query), torch.einsum("bqc,bchw->bqhw", self.mask_embed(query), mask_features)

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor]:
        mask_features, maps = self.pixel_decoder(feats)
        b = mask_features.shape[0]
        memories = [m.flatten(2).transpose(1, 2) + self.level_embed.weight[i] for i, m in enumerate(maps)]
        positions = [sine_position(*m.shape[-2:]).to(m).flatten(1).T.expand(b, -1, -1) for m in maps]
        sizes = [tuple(m.shape[-2:]) for m in maps]
        query = self.query_feat.weight.expand(b, -1, -1)
        query_pos = self.query_embed.weight.expand(b, -1, -1)
        classes, masks = self.predict(query, mask_features)
        for i, layer in enumerate(self.transformer_decoder.layers):
            level = i % LEVELS
            mask = attention_mask(masks, sizes[level])
            query = layer(query, query_pos, memories[level], positions[level], mask)
            classes, masks = self.predict(query, mask_features)
        return classes, masks
