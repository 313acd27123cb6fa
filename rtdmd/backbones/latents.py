"""Exact latent re-layouts shared by the FLUX adapters (pure, invertible).

* ``patchify_2x2``: ``[B, C, h, w] -> [B, 4C, h/2, w/2]`` with channel ``4c + 2dy + dx``;
* ``to_tokens``: ``[B, C, h, w] -> [B, h w, C]`` (row-major tokens);
* FLUX.1 packing is ``to_tokens(patchify_2x2(x))``: ``[B, 16, h, w] <-> [B, h w / 4, 64]``;
* FLUX.2 latents are already patchified; its tokens are ``to_tokens(x)``: ``[B, C, h, w] <-> [B, h w, C]``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def patchify_2x2(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"patchify needs even height and width, got {h}x{w}")
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify_2x2(x: Tensor) -> Tensor:
    b, c4, h, w = x.shape
    return x.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


def to_tokens(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).permute(0, 2, 1)


def from_tokens(tokens: Tensor, height: int, width: int) -> Tensor:
    b, n, c = tokens.shape
    if n != height * width:
        raise ValueError(f"{n} tokens do not fill a {height}x{width} grid")
    return tokens.permute(0, 2, 1).reshape(b, c, height, width)


def grid_ids(height: int, width: int, axes: int, device: torch.device | str) -> Tensor:
    """Position ids of a ``height x width`` token grid: ``[h w, axes]`` with row in column 1 and
    column in column 2, zeros elsewhere (FLUX.1: 3 axes; FLUX.2: 4 axes (t, h, w, l))."""
    ids = torch.zeros(height, width, axes)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, axes).to(device)
