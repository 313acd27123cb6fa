"""Mask2Former's pixel decoder as mmdet builds it (``MSDeformAttnPixelDecoder``), inference only,
with mmdet 2.x's parameter names: 1x1 input projections of the three coarsest Swin levels, a 6-layer
multi-scale deformable-attention encoder over them (post-norm), and one FPN step to stride 4 that
gives the mask features.

No padding mask exists anywhere (every pixel of the padded input is image), so the sine positional
encoding runs over whole maps and every valid ratio is 1.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DIMS = 256
HEADS = 8
LEVELS = 3
POINTS = 4


@functools.lru_cache(maxsize=16)
def sine_position(h: int, w: int, num_feats: int = DIMS // 2, temperature: float = 10000.0) -> Tensor:
    """``[2 num_feats, h, w]`` normalised sine encoding (mmdet's ``SinePositionalEncoding``, normalize=True,
    no mask): ``y = (1..h) / (h + 1e-6) 2 pi`` (x likewise), ``d_k = T^(2 floor(k/2) / num_feats)``,
    channels ``[sin(y/d_0), cos(y/d_1), sin(y/d_2), ...]`` then the same for x. Cached (the pixel decoder
    and the transformer decoder ask for the same three maps on every forward); callers only read it."""
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, dtype=torch.float32) / (h + eps) * scale
    x = torch.arange(1, w + 1, dtype=torch.float32) / (w + eps) * scale
    dim_t = temperature ** (2 * (torch.arange(num_feats) // 2) / num_feats)

    def encode(values: Tensor) -> Tensor:
        pos = values[:, None] / dim_t
        return torch.stack((pos[:, 0::2].sin(), pos[:, 1::2].cos()), dim=2).flatten(1)  # [n, num_feats]

    pos_y = encode(y)[:, None, :].expand(h, w, num_feats)
    pos_x = encode(x)[None, :, :].expand(h, w, num_feats)
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)


def reference_points(shapes: list[tuple[int, int]], device: torch.device) -> Tensor:
    """``[sum h w, 2]``: each level's pixel centres ``((x + 0.5) / w, (y + 0.5) / h)``, row-major."""
    points = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        points.append(torch.stack(((xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h), dim=-1))
    return torch.cat(points)


def deformable_sample(value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor) -> Tensor:
    """Multi-scale deformable attention's sampling (mmcv's kernel and its PyTorch fallback):
    ``value [B, N_v, H, D]``, ``locations [B, N_q, H, L, P, 2]`` in [0, 1] as (x, y), ``weights
    [B, N_q, H, L, P]`` -> ``[B, N_q, H D]``: per head, the weighted sum of bilinear samples at pixel
    ``(x W - 0.5, y H - 0.5)``, zero outside the map. Summed level by level with the points on a middle
    axis (``[B H, D, P, N_q]``), not mmcv's fallback's stack of every level with the points innermost:
    the same terms, a few float32 roundings apart, without the stacked copy or a reduction over 12 values
    at stride 1 (the slowest kernels of the eager network on a GPU)."""
    b, _, heads, d = value.shape
    n_q = locations.shape[1]
    grids = 2 * locations - 1
    out = None
    for level, part in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[level]
        v = part.flatten(2).transpose(1, 2).reshape(b * heads, d, h, w)
        grid = grids[:, :, :, level].permute(0, 2, 3, 1, 4).flatten(0, 1)  # [B H, P, N_q, 2]
        sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # [B H, D, P, N_q]
        weight = weights[:, :, :, level].permute(0, 2, 3, 1).reshape(b * heads, 1, -1, n_q)
        term = (sampled * weight).sum(2)
        out = term if out is None else out + term
    return out.view(b, heads * d, n_q).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """mmcv's ``MultiScaleDeformableAttention`` (8 heads, 3 levels, 4 points): offsets and weights from
    ``query + pos``, values from the un-encoded input; adds the residual."""

    def __init__(self) -> None:
        super().__init__()
        self.sampling_offsets = nn.Linear(DIMS, HEADS * LEVELS * POINTS * 2)
        self.attention_weights = nn.Linear(DIMS, HEADS * LEVELS * POINTS)
        self.value_proj = nn.Linear(DIMS, DIMS)
        self.output_proj = nn.Linear(DIMS, DIMS)

    def forward(self, x: Tensor, pos: Tensor, refs: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        b, n, _ = x.shape
        query = x + pos
        value = self.value_proj(x).view(b, n, HEADS, DIMS // HEADS)
        offsets = self.sampling_offsets(query).view(b, n, HEADS, LEVELS, POINTS, 2)
        weights = self.attention_weights(query).view(b, n, HEADS, LEVELS * POINTS).softmax(-1)
        normaliser = torch.tensor([(w, h) for h, w in shapes], device=x.device, dtype=offsets.dtype)
        locations = refs[None, :, None, None, None, :] + offsets / normaliser[None, None, None, :, None, :]
        out = deformable_sample(value, shapes, locations, weights.view(b, n, HEADS, LEVELS, POINTS))
        return x + self.output_proj(out)


def ffn(dims: int, hidden: int) -> nn.Module:
    """mmcv's FFN (keys ``layers.0.0`` and ``layers.1``); the residual is added by the caller."""
    module = nn.Module()
    module.layers = nn.Sequential(nn.Sequential(nn.Linear(dims, hidden), nn.ReLU()), nn.Linear(hidden, dims))
    return module


class EncoderLayer(nn.Module):
    """Post-norm: ``norm0(deform_attn(x))`` (residual inside), then ``norm1(x + ffn(x))``."""

    def __init__(self) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([MSDeformAttn()])
        self.ffns = nn.ModuleList([ffn(DIMS, 4 * DIMS)])
        self.norms = nn.ModuleList([nn.LayerNorm(DIMS), nn.LayerNorm(DIMS)])

    def forward(self, x: Tensor, pos: Tensor, refs: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        x = self.norms[0](self.attentions[0](x, pos, refs, shapes))
        return self.norms[1](x + self.ffns[0].layers(x))


class ConvGN(nn.Module):
    """mmcv's ConvModule with GroupNorm(32) (keys ``conv`` and ``gn``), optionally followed by ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, bias: bool, relu: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias)
        self.gn = nn.GroupNorm(32, cout)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.gn(self.conv(x))
        return F.relu(x) if self.relu else x


class PixelDecoder(nn.Module):
    """Backbone maps (strides 4, 8, 16, 32) -> (mask features at stride 4, [maps at strides 32, 16, 8])."""

    def __init__(self, in_channels: tuple[int, ...] = (96, 192, 384, 768), layers: int = 6) -> None:
        super().__init__()
        coarse = in_channels[::-1][:LEVELS]  # strides 32, 16, 8
        self.input_convs = nn.ModuleList(ConvGN(c, DIMS, 1, bias=True) for c in coarse)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(EncoderLayer() for _ in range(layers))
        self.level_encoding = nn.Embedding(LEVELS, DIMS)
        self.lateral_convs = nn.ModuleList([ConvGN(in_channels[0], DIMS, 1, bias=False)])
        self.output_convs = nn.ModuleList([ConvGN(DIMS, DIMS, 3, bias=False, relu=True)])
        self.mask_feature = nn.Conv2d(DIMS, DIMS, 1)

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        b = feats[0].shape[0]
        maps = [conv(feats[-1 - i]) for i, conv in enumerate(self.input_convs)]
        shapes = [tuple(m.shape[-2:]) for m in maps]
        x = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
        pos = torch.cat(
            [
                (sine_position(h, w).to(x) + self.level_encoding.weight[i][:, None, None]).flatten(1).T
                for i, (h, w) in enumerate(shapes)
            ]
        ).expand(b, -1, -1)
        refs = reference_points(shapes, x.device).to(x.dtype)
        for layer in self.encoder.layers:
            x = layer(x, pos, refs, shapes)
        outs = [
            part.transpose(1, 2).reshape(b, DIMS, h, w)
            for part, (h, w) in zip(x.split([h * w for h, w in shapes], dim=1), shapes, strict=True)
        ]
        fine = self.lateral_convs[0](feats[0])
        fine = fine + F.interpolate(outs[-1], size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return self.mask_feature(self.output_convs[0](fine)), outs
