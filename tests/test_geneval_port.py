"""The GenEval detector port (issue 20), the parts that fail silently when wrong, each against an
independent computation written here from the reference's description: the relative-position index,
PatchMerging's unfold channel order, the shifted-window mask, the qkv split and the window padding.
Parity with mmdet itself runs in ``tox -e geneval-mmdet``."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from rtdmd.geneval.m2f import swin


def test_relative_position_index_is_the_official_one():
    """index[p, q] = (di + w - 1)(2w - 1) + (dj + w - 1), d = position p - position q (row-major)."""
    w = 7
    cells = list(itertools.product(range(w), range(w)))
    expected = torch.tensor(
        [[(pi - qi + w - 1) * (2 * w - 1) + (pj - qj + w - 1) for qi, qj in cells] for pi, pj in cells]
    )
    assert torch.equal(swin.relative_position_index(w), expected)


def test_patch_merging_gathers_in_unfold_order():
    """Channel c * 4 + kh * 2 + kw of a merged token is x[c, 2i + kh, 2j + kw] (mmdet's nn.Unfold order,
    not the official Swin's tap-major concat), with odd sizes zero-padded bottom/right."""
    c, h, w = 3, 5, 4
    x = torch.randn(1, h * w, c)
    merge = swin.PatchMerging(c)
    merge.norm, merge.reduction = nn.Identity(), nn.Identity()
    out, (oh, ow) = merge(x, (h, w))
    grid = torch.zeros(c, h + 1, w)
    grid[:, :h, :w] = x[0].T.reshape(c, h, w)
    assert (oh, ow) == (3, 2)
    for i, j, ch, kh, kw in itertools.product(range(oh), range(ow), range(c), range(2), range(2)):
        assert out[0, i * ow + j, ch * 4 + kh * 2 + kw] == grid[ch, 2 * i + kh, 2 * j + kw]


def region_of(index: int, size: int, window: int, shift: int) -> int:
    return 0 if index < size - window else (1 if index < size - shift else 2)


def test_shift_mask_separates_the_rolled_regions():
    h = w = 14
    window, shift = 7, 3
    mask = swin.shift_mask(h, w, window, shift, torch.device("cpu"))
    windows = [(wi, wj) for wi in range(h // window) for wj in range(w // window)]
    for n, (wi, wj) in enumerate(windows):
        cells = [(wi * window + a, wj * window + b) for a in range(window) for b in range(window)]
        ids = [(region_of(y, h, window, shift), region_of(x, w, window, shift)) for y, x in cells]
        expected = torch.tensor([[0.0 if p == q else swin.SHIFT_MASK for q in ids] for p in ids])
        assert torch.equal(mask[n], expected)


def naive_window_attention(msa: swin.ShiftWindowMSA, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """One token at a time: pad to whole windows, roll, per window per head softmax(q k^T / sqrt(d) + bias
    (+ -100 across regions)) v with q, k, v = rows [0:C], [C:2C], [2C:3C] of the qkv weight."""
    h, w = hw
    win, shift, attn = msa.window, msa.shift, msa.w_msa
    c = x.shape[-1]
    heads, d = attn.heads, c // attn.heads
    hp, wp = -(-h // win) * win, -(-w // win) * win
    grid = torch.zeros(hp, wp, c)
    grid[:h, :w] = x[0].reshape(h, w, c)
    grid = torch.roll(grid, shifts=(-shift, -shift), dims=(0, 1))
    weight, bias = attn.qkv.weight, attn.qkv.bias
    out = torch.zeros(hp, wp, c)
    table = attn.relative_position_bias_table
    for wi, wj in itertools.product(range(hp // win), range(wp // win)):
        cells = [(wi * win + a, wj * win + b) for a in range(win) for b in range(win)]
        tokens = torch.stack([grid[y, xx] for y, xx in cells])
        q, k, v = (tokens @ weight[i * c : (i + 1) * c].T + bias[i * c : (i + 1) * c] for i in range(3))
        ids = [(region_of(y, hp, win, shift), region_of(xx, wp, win, shift)) for y, xx in cells]
        heads_out = []
        for head in range(heads):
            part = slice(head * d, (head + 1) * d)
            logits = q[:, part] @ k[:, part].T / d**0.5
            for p, q_cell in enumerate(cells):
                for r, k_cell in enumerate(cells):
                    di, dj = q_cell[0] - k_cell[0], q_cell[1] - k_cell[1]
                    logits[p, r] += table[(di + win - 1) * (2 * win - 1) + dj + win - 1, head]
                    if shift and ids[p] != ids[r]:
                        logits[p, r] += swin.SHIFT_MASK
            heads_out.append(logits.softmax(-1) @ v[:, part])
        result = attn.proj(torch.cat(heads_out, dim=1))
        for n, (y, xx) in enumerate(cells):
            out[y, xx] = result[n]
    out = torch.roll(out, shifts=(shift, shift), dims=(0, 1))
    return out[:h, :w].reshape(1, h * w, c)


@pytest.mark.parametrize("shift", [0, 3])
def test_window_attention_equals_the_token_by_token_computation(shift):
    """A 9 x 11 map (padded to 14 x 14, padded tokens attended to), 2 heads, random weights and bias table."""
    torch.manual_seed(0)
    msa = swin.ShiftWindowMSA(8, 2, 7, shift)
    with torch.no_grad():
        msa.w_msa.relative_position_bias_table.normal_()
    x = torch.randn(1, 9 * 11, 8)
    with torch.no_grad():
        torch.testing.assert_close(msa(x, (9, 11)), naive_window_attention(msa, x, (9, 11)), rtol=1e-5, atol=1e-5)


def test_backbone_names_and_sizes_are_mmdets():
    """Swin-S: 48.8M parameters; stage outputs at strides 4..32 with 96..768 channels; the names the
    released checkpoint uses (backbone.* without the prefix)."""
    net = swin.SwinTransformer()
    state = net.state_dict()
    assert sum(v.numel() for k, v in state.items() if not k.endswith("relative_position_index")) == 48_838_602
    for key in (
        "patch_embed.projection.weight",
        "stages.2.blocks.17.attn.w_msa.relative_position_bias_table",
        "stages.2.blocks.17.attn.w_msa.relative_position_index",
        "stages.0.blocks.1.ffn.layers.0.0.weight",
        "stages.0.blocks.1.ffn.layers.1.weight",
        "stages.2.downsample.reduction.weight",
        "norm3.weight",
    ):
        assert key in state, key
    assert "stages.3.downsample.norm.weight" not in state
    assert state["stages.2.downsample.reduction.weight"].shape == (768, 1536)
    with torch.no_grad():
        outs = net.eval()(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 96, 16, 24), (1, 192, 8, 12), (1, 384, 4, 6), (1, 768, 2, 3)]
