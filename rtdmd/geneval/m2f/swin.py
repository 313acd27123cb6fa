"""Swin Transformer backbone as mmdet builds it (``mmdet/models/backbones/swin.py``, 2.28.2 = 3.3.0),
inference only, with mmdet's parameter names.

Three details differ from the official Swin code and are kept because the checkpoint was trained
with them: PatchMerging gathers its 2x2 neighbourhood with ``nn.Unfold`` (channel ``c * 4 + kh * 2 +
kw``, not the official tap-major concat), windows are padded with zeros bottom/right after the
block's LayerNorm (the padded tokens are attended to, not masked), and the image is padded to a
multiple of the patch size before the patch embedding.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SHIFT_MASK = -100.0  # added to the logits between tokens of different shifted regions (mmdet's value)


@dataclass(frozen=True)
class SwinSpec:
    """Swin-S as GenEval's detector uses it."""

    embed_dims: int = 96
    patch_size: int = 4
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: int = 4


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad ``[B, C, H, W]`` at the bottom and right to multiples of ``multiple`` (mmdet's
    AdaptivePadding 'corner' when kernel = stride)."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, (-w) % multiple, 0, (-h) % multiple))


def relative_position_index(window: int) -> Tensor:
    """``[window^2, window^2]`` index into the ``(2 window - 1)^2`` bias table, built as mmdet does
    (``double_step_seq`` plus its transpose, flipped); equals the official ``(di + w - 1)(2w - 1) +
    (dj + w - 1)`` with ``d = p - q`` over row-major window positions."""
    span = 2 * window - 1
    coords = (torch.arange(0, span * window, span)[:, None] + torch.arange(window)[None, :]).reshape(1, -1)
    return (coords + coords.T).flip(1).contiguous()


def window_partition(x: Tensor, window: int) -> Tensor:
    """``[B, H, W, C]`` -> ``[B * nW, window^2, C]``, windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`window_partition`."""
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, -1)


@functools.lru_cache(maxsize=16)
def shift_mask(h: int, w: int, window: int, shift: int, device: torch.device) -> Tensor:
    """``[nW, window^2, window^2]``: 0 between tokens of the same region of the rolled map, -100 between
    regions (the 3 x 3 regions cut at ``-window`` and ``-shift`` on each axis). Cached: every shifted
    block of a stage (9 of Swin-S's third) asks for the same mask on every forward; callers only read it."""
    regions = torch.zeros(1, h, w, 1, device=device)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for n, (rows, cols) in enumerate((r, c) for r in cuts for c in cuts):
        regions[:, rows, cols, :] = n
    ids = window_partition(regions, window).squeeze(-1)
    differs = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(differs.shape, device=device).masked_fill(differs, SHIFT_MASK)


class WindowMSA(nn.Module):
    """Window multi-head self-attention with a relative position bias."""

    def __init__(self, dims: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.scale = (dims // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dims, 3 * dims)
        self.proj = nn.Linear(dims, dims)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """``x [B * nW, N, C]``; ``mask [nW, N, N]`` or None. Rows ``[0:C], [C:2C], [2C:3C]`` of the qkv
        weight are q, k, v, each split into heads of consecutive channels."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            windows = mask.shape[0]
            attn = attn.view(b // windows, windows, self.heads, n, n) + mask[None, :, None]
            attn = attn.view(b, self.heads, n, n)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class ShiftWindowMSA(nn.Module):
    """Pad to whole windows, roll by ``shift`` (odd blocks), attend within windows, undo both."""

    def __init__(self, dims: int, heads: int, window: int, shift: int) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.w_msa = WindowMSA(dims, heads, window)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        b, _, c = x.shape
        h, w = hw
        win, shift = self.window, self.shift
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, (-w) % win, 0, (-h) % win))
        hp, wp = x.shape[1:3]
        mask = None
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            mask = shift_mask(hp, wp, win, shift, x.device).to(x.dtype)
        out = window_reverse(self.w_msa(window_partition(x, win), mask), win, hp, wp)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return out[:, :h, :w, :].reshape(b, h * w, c)


class SwinBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``x + ffn(norm2(x))``."""

    def __init__(self, dims: int, heads: int, window: int, shift: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dims)
        self.attn = ShiftWindowMSA(dims, heads, window, shift)
        self.norm2 = nn.LayerNorm(dims)
        self.ffn = nn.Module()  # mmcv's FFN: keys ffn.layers.0.0 (Linear, GELU) and ffn.layers.1
        self.ffn.layers = nn.Sequential(
            nn.Sequential(nn.Linear(dims, mlp_ratio * dims), nn.GELU()), nn.Linear(mlp_ratio * dims, dims)
        )

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        x = x + self.attn(self.norm1(x), hw)
        return x + self.ffn.layers(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods (zero-padded to even sizes) gathered with ``nn.Unfold`` -> LayerNorm(4C) ->
    Linear(4C, 2C) without bias."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dims)
        self.reduction = nn.Linear(4 * dims, 2 * dims, bias=False)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        b, _, c = x.shape
        x = pad_to_multiple(x.view(b, *hw, c).permute(0, 3, 1, 2), 2)
        out_hw = (x.shape[2] // 2, x.shape[3] // 2)
        x = F.unfold(x, kernel_size=2, stride=2).transpose(1, 2)  # channel c * 4 + kh * 2 + kw
        return self.reduction(self.norm(x)), out_hw


class SwinStage(nn.Module):
    def __init__(self, dims: int, depth: int, heads: int, spec: SwinSpec, downsample: bool) -> None:
        super().__init__()
        win = spec.window_size
        self.blocks = nn.ModuleList(
            SwinBlock(dims, heads, win, win // 2 if i % 2 else 0, spec.mlp_ratio) for i in range(depth)
        )
        self.downsample = PatchMerging(dims) if downsample else None

    def forward(self, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int], Tensor]:
        """Returns the next stage's input and size, and this stage's output (before merging)."""
        for block in self.blocks:
            x = block(x, hw)
        if self.downsample is None:
            return x, hw, x
        merged, merged_hw = self.downsample(x, hw)
        return merged, merged_hw, x


class PatchEmbed(nn.Module):
    def __init__(self, dims: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.projection = nn.Conv2d(3, dims, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dims)

    def forward(self, image: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.projection(pad_to_multiple(image, self.patch))
        return self.norm(x.flatten(2).transpose(1, 2)), (x.shape[2], x.shape[3])


class SwinTransformer(nn.Module):
    """``[B, 3, H, W]`` normalised RGB -> four ``[B, C_i, H / 2^(i+2), W / 2^(i+2)]`` maps (C = 96,
    192, 384, 768), each stage's output through its own LayerNorm ``norm{i}``."""

    def __init__(self, spec: SwinSpec = SwinSpec()) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(spec.embed_dims, spec.patch_size)
        last = len(spec.depths) - 1
        dims = [spec.embed_dims * 2**i for i in range(len(spec.depths))]
        self.stages = nn.ModuleList(
            SwinStage(dims[i], spec.depths[i], spec.num_heads[i], spec, downsample=i < last)
            for i in range(len(spec.depths))
        )
        for i, d in enumerate(dims):
            self.add_module(f"norm{i}", nn.LayerNorm(d))
        self.dims = dims

    def forward(self, image: Tensor) -> list[Tensor]:
        x, hw = self.patch_embed(image)
        outs = []
        for i, stage in enumerate(self.stages):
            x, next_hw, out = stage(x, hw)
            out = getattr(self, f"norm{i}")(out)
            outs.append(out.view(-1, *hw, self.dims[i]).permute(0, 3, 1, 2).contiguous())
            hw = next_hw
        return outs
