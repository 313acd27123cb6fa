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


# ---------------------------------------------------------------- pixel decoder

from rtdmd.geneval.m2f import pixel_decoder as pdec  # noqa: E402


def test_sine_position_is_the_interleaved_formula():
    h, w, feats = 3, 5, 8
    pos = pdec.sine_position(h, w, num_feats=feats)
    two_pi = 2 * torch.pi
    for c, y, x in itertools.product(range(2 * feats), range(h), range(w)):
        k = c % feats
        coord = (y + 1) / (h + 1e-6) * two_pi if c < feats else (x + 1) / (w + 1e-6) * two_pi
        arg = torch.tensor(coord / 10000 ** (2 * (k // 2) / feats))
        expected = arg.sin() if k % 2 == 0 else arg.cos()
        assert pos[c, y, x] == pytest.approx(float(expected), abs=1e-6)


def bilinear_zero_outside(plane: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Sample ``plane [D, H, W]`` at normalised (x, y): pixel (x W - 0.5, y H - 0.5), zero outside."""
    _, h, w = plane.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = int(torch.floor(torch.tensor(px))), int(torch.floor(torch.tensor(py)))
    total = torch.zeros(plane.shape[0])
    for yy, xx in itertools.product((y0, y0 + 1), (x0, x0 + 1)):
        if 0 <= yy < h and 0 <= xx < w:
            total += plane[:, yy, xx] * (1 - abs(px - xx)) * (1 - abs(py - yy))
    return total


def test_deformable_sampling_equals_pointwise_bilinear():
    """Two levels (3 x 4, 2 x 2), 2 heads of 3 channels, 2 points, locations partly outside the map."""
    torch.manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    heads, d, points, n_q = 2, 3, 2, 5
    value = torch.randn(1, sum(h * w for h, w in shapes), heads, d)
    locations = torch.rand(1, n_q, heads, len(shapes), points, 2) * 1.4 - 0.2
    weights = torch.rand(1, n_q, heads, len(shapes), points)
    out = pdec.deformable_sample(value, shapes, locations, weights)
    starts = [0, shapes[0][0] * shapes[0][1]]
    for q, head in itertools.product(range(n_q), range(heads)):
        expected = torch.zeros(d)
        for level, (h, w) in enumerate(shapes):
            plane = value[0, starts[level] : starts[level] + h * w, head].T.reshape(d, h, w)
            for p in range(points):
                x, y = locations[0, q, head, level, p].tolist()
                expected += weights[0, q, head, level, p] * bilinear_zero_outside(plane, x, y)
        torch.testing.assert_close(out[0, q, head * d : (head + 1) * d], expected, rtol=1e-5, atol=1e-5)


def test_deformable_attention_normalises_offsets_by_level_and_weights_over_levels_and_points(monkeypatch):
    """Offsets are divided by each level's (W, H); the attention weights are one softmax over the 12
    (level, point) pairs of a head: with a constant value of 1 and in-map samples the output adds 1."""
    torch.manual_seed(0)
    attn = pdec.MSDeformAttn()
    shapes = [(2, 3), (4, 6), (8, 12)]
    n = sum(h * w for h, w in shapes)
    refs = pdec.reference_points(shapes, torch.device("cpu"))
    seen = {}
    original = pdec.deformable_sample
    monkeypatch.setattr(pdec, "deformable_sample", lambda *a: seen.setdefault("args", a) and original(*a))
    x, pos = torch.randn(1, n, pdec.DIMS), torch.randn(1, n, pdec.DIMS)
    with torch.no_grad():
        attn(x, pos, refs, shapes)
        offsets = attn.sampling_offsets(x + pos).view(1, n, 8, 3, 4, 2)
        locations = seen["args"][2]
        for level, (h, w) in enumerate(shapes):
            expected = refs[None, :, None, None, :] + offsets[:, :, :, level] / torch.tensor([w, h])
            torch.testing.assert_close(locations[:, :, :, level], expected)
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.zero_()
        attn.value_proj.weight.zero_()
        attn.value_proj.bias.fill_(1.0)
        attn.output_proj.weight.copy_(torch.eye(pdec.DIMS))
        attn.output_proj.bias.zero_()
        added = attn(x, pos, refs, shapes) - x
    # queries whose point lies where bilinear sampling takes all four taps from inside every level
    inside = torch.ones(n, dtype=torch.bool)
    for h, w in shapes:
        px, py = refs[:, 0] * w - 0.5, refs[:, 1] * h - 0.5
        inside &= (px >= 0) & (px <= w - 1) & (py >= 0) & (py <= h - 1)
    assert inside.sum() > 20
    torch.testing.assert_close(added[0, inside], torch.ones(int(inside.sum()), pdec.DIMS), rtol=1e-5, atol=1e-5)


def test_reference_points_are_pixel_centres_level_by_level():
    refs = pdec.reference_points([(2, 3), (1, 2)], torch.device("cpu"))
    expected = [((x + 0.5) / 3, (y + 0.5) / 2) for y in range(2) for x in range(3)] + [(0.25, 0.5), (0.75, 0.5)]
    torch.testing.assert_close(refs, torch.tensor(expected))


def test_pixel_decoder_names_and_shapes_are_mmdets():
    net = pdec.PixelDecoder().eval()
    state = net.state_dict()
    assert len(state) == 117
    for key, shape in (
        ("input_convs.0.conv.weight", (256, 768, 1, 1)),
        ("input_convs.2.gn.weight", (256,)),
        ("encoder.layers.5.attentions.0.sampling_offsets.weight", (192, 256)),
        ("encoder.layers.5.attentions.0.attention_weights.weight", (96, 256)),
        ("encoder.layers.0.ffns.0.layers.0.0.weight", (1024, 256)),
        ("level_encoding.weight", (3, 256)),
        ("lateral_convs.0.conv.weight", (256, 96, 1, 1)),
        ("output_convs.0.conv.weight", (256, 256, 3, 3)),
        ("mask_feature.bias", (256,)),
    ):
        assert tuple(state[key].shape) == shape, key
    assert "lateral_convs.0.conv.bias" not in state and "output_convs.0.conv.bias" not in state
    feats = [torch.randn(1, c, 32 // 2**i, 40 // 2**i) for i, c in enumerate((96, 192, 384, 768))]
    with torch.no_grad():
        mask_features, outs = net(feats)
    assert tuple(mask_features.shape) == (1, 256, 32, 40)
    assert [tuple(o.shape[-2:]) for o in outs] == [(4, 5), (8, 10), (16, 20)]


# ---------------------------------------------------------------- transformer decoder

from rtdmd.geneval.m2f import head as m2f_head  # noqa: E402


def test_attention_mask_keeps_foreground_and_frees_empty_rows():
    """Per pixel of the resized logits: masked iff sigmoid < 0.5; a query with no foreground pixel
    attends everywhere; rows ordered batch-major, head-minor (nn.MultiheadAttention's layout)."""
    logits = torch.full((2, 3, 2, 2), -5.0)
    logits[0, 0, 0, 1] = 5.0  # one foreground pixel
    logits[1, 2] = 5.0  # all foreground
    mask = m2f_head.attention_mask(logits, (2, 2), heads=4)
    assert mask.shape == (8, 3, 4)
    for b, head, q in itertools.product(range(2), range(4), range(3)):
        row = mask[b * 4 + head, q].tolist()
        if (b, q) == (0, 0):
            assert row == [True, False, True, True]
        else:  # all background (freed) or all foreground: nothing masked
            assert row == [False] * 4


def naive_attention(mha: torch.nn.MultiheadAttention, q, k, v, mask):
    c, heads = q.shape[-1], mha.num_heads
    d = c // heads
    w, bias = mha.in_proj_weight, mha.in_proj_bias
    qs, ks, vs = (x @ w[i * c : (i + 1) * c].T + bias[i * c : (i + 1) * c] for i, x in enumerate((q, k, v)))
    out = []
    for h in range(heads):
        part = slice(h * d, (h + 1) * d)
        logits = qs[:, part] @ ks[:, part].T / d**0.5
        if mask is not None:
            logits = logits.masked_fill(mask[h], float("-inf"))
        out.append(logits.softmax(-1) @ vs[:, part])
    return mha.out_proj(torch.cat(out, dim=1))


def test_decoder_layer_is_masked_cross_then_self_attention_then_ffn():
    """Positions go into queries and keys, never values; the mask blocks cross-attention only; each
    sub-layer adds its residual before its LayerNorm."""
    torch.manual_seed(0)
    layer = m2f_head.DecoderLayer().eval()
    q, qpos = torch.randn(1, 5, 256), torch.randn(1, 5, 256)
    mem, mpos = torch.randn(1, 7, 256), torch.randn(1, 7, 256)
    mask = torch.rand(8, 5, 7) < 0.4
    mask[:, :, 0] = False  # every row keeps one key
    with torch.no_grad():
        out = layer(q, qpos, mem, mpos, mask)
        cross, self_attn = (a.attn for a in layer.attentions)
        x = layer.norms[0](q[0] + naive_attention(cross, q[0] + qpos[0], mem[0] + mpos[0], mem[0], mask))
        x = layer.norms[1](x + naive_attention(self_attn, x + qpos[0], x + qpos[0], x, None))
        x = layer.norms[2](x + layer.ffns[0].layers(x))
    torch.testing.assert_close(out[0], x, rtol=1e-5, atol=1e-5)


def test_the_whole_model_has_the_checkpoints_649_entries_and_68_7m_parameters():
    """The count of mmdet 2.28.2's module tree for this config (backbone + panoptic_head)."""
    from rtdmd.geneval.m2f.swin import SwinTransformer

    state = {**SwinTransformer().state_dict(), **m2f_head.Mask2FormerHead().state_dict()}
    assert len(state) == 649
    assert sum(v.numel() for k, v in state.items() if not k.endswith("relative_position_index")) == 68_739_547


def test_the_model_maps_an_image_to_100_queries(detector):
    with torch.no_grad():
        classes, masks = detector(torch.randn(2, 3, 64, 96))
    assert classes.shape == (2, 100, 81) and masks.shape == (2, 100, 16, 24)


def test_layers_cycle_through_the_levels_masked_by_the_previous_prediction(monkeypatch):
    """Layer i attends to level i % 3 (strides 32, 16, 8), masked by the prediction made before it."""
    torch.manual_seed(0)
    net = m2f_head.Mask2FormerHead(layers=4).eval()
    calls, predictions = [], []
    layer_forward, predict = m2f_head.DecoderLayer.forward, net.predict

    def record_layer(self, query, query_pos, memory, memory_pos, mask):
        calls.append((memory.shape[1], mask))
        return layer_forward(self, query, query_pos, memory, memory_pos, mask)

    monkeypatch.setattr(m2f_head.DecoderLayer, "forward", record_layer)
    monkeypatch.setattr(net, "predict", lambda *a: predictions.append(predict(*a)) or predictions[-1])
    feats = [torch.randn(1, c, 32 // 2**i, 40 // 2**i) for i, c in enumerate((96, 192, 384, 768))]
    with torch.no_grad():
        classes, masks = net(feats)
    sizes = [(4, 5), (8, 10), (16, 20), (4, 5)]
    assert [n for n, _ in calls] == [h * w for h, w in sizes]
    for (_, mask), before, size in zip(calls, predictions, sizes, strict=False):
        assert torch.equal(mask, m2f_head.attention_mask(before[1], size))
    assert torch.equal(classes, predictions[-1][0]) and len(predictions) == 5


# ---------------------------------------------------------------- checkpoint

from rtdmd.geneval.m2f import model as m2f_model  # noqa: E402


def mmdet3_key(key: str) -> str:
    """The 3.x name of a 2.x key, as mmdet PR #9515's converter renames it (written out case by case)."""
    if ".encoder.layers." in key:
        return key.replace(".attentions.0.", ".self_attn.").replace(".ffns.0.", ".ffn.")
    if "transformer_decoder.layers." in key:
        key = key.replace(".attentions.0.", ".cross_attn.").replace(".attentions.1.", ".self_attn.")
        return key.replace(".ffns.0.", ".ffn.")
    return key


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return m2f_model.Mask2Former().eval()


def test_a_mmdet2_checkpoint_loads_strictly(detector, tmp_path):
    torch.save({"meta": {"CLASSES": ("person",)}, "state_dict": detector.state_dict()}, tmp_path / "v2.pth")
    loaded = m2f_model.load_detector(tmp_path / "v2.pth")
    for key, value in detector.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_mmdet3_checkpoint_is_renamed_back(detector, tmp_path):
    renamed = {mmdet3_key(k): v for k, v in detector.state_dict().items()}
    assert (
        sum(a != b for a, b in zip(renamed, detector.state_dict(), strict=True)) == 6 * 12 + 9 * 12
    )  # per layer: 8 + 4 (encoder), 4 + 4 + 4 (decoder)
    torch.save({"state_dict": renamed}, tmp_path / "v3.pth")
    loaded = m2f_model.load_detector(tmp_path / "v3.pth")
    for key, value in detector.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_checkpoint_with_other_keys_is_refused(detector, tmp_path):
    state = dict(detector.state_dict())
    state.pop("panoptic_head.cls_embed.weight")
    state["panoptic_head.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="1 missing keys.*cls_embed.*1 unexpected"):
        m2f_model.load_detector(tmp_path / "other.pth")


# ---------------------------------------------------------------- pre- and post-processing

import numpy as np  # noqa: E402

from rtdmd.geneval.m2f import pipeline  # noqa: E402

MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])


@pytest.mark.parametrize(
    ("h", "w", "expected"),
    [(512, 512, (800, 800)), (1024, 1024, (800, 800)), (768, 1024, (800, 1067)), (10, 13, (800, 1040))],
)
def test_images_are_rescaled_to_fit_1333_by_800(h, w, expected):
    assert pipeline.rescaled_size(h, w) == expected


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ((512, 512), (800, 800)),
        ((1024, 1024), (800, 800)),
        ((768, 1024), (800, 1067)),
        ((10, 13), (800, 1040)),
        ((37, 53), (61, 29)),
        ((5, 7), (3, 11)),
        ((200, 3), (17, 300)),
    ],
)
def test_the_resize_is_opencvs_bit_for_bit(src, dst):
    import cv2

    from rtdmd.geneval.m2f.resize import resize_bilinear_u8

    image = np.random.default_rng(sum(src) + sum(dst)).integers(0, 256, (*src, 3), dtype=np.uint8)
    expected = cv2.resize(image, dst[::-1], interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(resize_bilinear_u8(torch.from_numpy(image), *dst).numpy(), expected)


def opencv_resizes_float_with_ipp() -> bool:
    import cv2

    return cv2.ipp.useIPP()


@pytest.mark.skipif(not opencv_resizes_float_with_ipp(), reason="this OpenCV resizes float32 without IPP")
@pytest.mark.parametrize(("src", "dst"), [((512, 512), (800, 800)), ((96, 128), (800, 1067)), ((5, 7), (3, 11))])
def test_the_float_resize_is_opencvs_bit_for_bit(src, dst):
    """mmdet 3.x resizes a float32 image: OpenCV's IPP path (float64 positions, a fused lerp per pass)."""
    import cv2

    from rtdmd.geneval.m2f.resize import resize_bilinear_float

    image = np.random.default_rng(sum(src) + sum(dst)).integers(0, 256, (*src, 3), dtype=np.uint8)
    expected = cv2.resize(image.astype(np.float32), dst[::-1], interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(resize_bilinear_float(torch.from_numpy(image), *dst).numpy(), expected)


def mmdet3_pipeline(image: np.ndarray) -> np.ndarray:
    """mmdet 3.x's: float32 image resized by OpenCV, ``(x - mean) / std``, then padded with 0."""
    import cv2

    h, w = pipeline.rescaled_size(*image.shape[:2])
    resized = cv2.resize(image.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    normalised = (resized - MEAN.astype(np.float32)) / STD.astype(np.float32)
    return np.pad(normalised, ((0, (-h) % 32), (0, (-w) % 32), (0, 0))).transpose(2, 0, 1)


def mmcv_pipeline(image: np.ndarray) -> np.ndarray:
    """mmdet 2.x's test pipeline with OpenCV, as mmcv runs it (rescale, pad 128, imnormalize), RGB input.
    imnormalize's cv2.multiply by the float64 ``1 / std`` rounds once from float64 on OpenCV 4 (GenEval's
    environment; the mmdet env's 4.10 checked in ``tests/geneval_mmdet``), so that step is written out:
    OpenCV 5 multiplies in float32."""
    import cv2

    h, w = pipeline.rescaled_size(*image.shape[:2])
    resized = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    padded = cv2.copyMakeBorder(resized, 0, (-h) % 32, 0, (-w) % 32, cv2.BORDER_CONSTANT, value=(128, 128, 128))
    pixels = padded.astype(np.float32)
    cv2.subtract(pixels, MEAN.astype(np.float32).astype(np.float64)[None], pixels)
    pixels = (pixels * (1 / STD.astype(np.float32).astype(np.float64))).astype(np.float32)
    return pixels.transpose(2, 0, 1)


@pytest.mark.parametrize("mode", ["mmdet2", "mmdet3"])
def test_preprocessing_normalises_rgb_and_pads_as_mmdet_version(mode):
    """A 10 x 13 image becomes 800 x 1040 padded to 800 x 1056: mmdet 2.x's tensor bit for bit (OpenCV
    resize, padding with the uint8 value 128, mmcv's float32 normalisation); mmdet 3.x's: the float32
    image resized, normalised, then padded with 0."""
    if mode == "mmdet3" and not opencv_resizes_float_with_ipp():
        pytest.skip("this OpenCV resizes float32 without IPP")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (10, 13, 3), dtype=np.uint8)
    prepared = pipeline.preprocess(image, mode)
    assert prepared.tensor.shape == (3, 800, 1056) and prepared.resized == (800, 1040)
    if mode == "mmdet2":
        assert np.array_equal(prepared.tensor.numpy(), mmcv_pipeline(image))
    else:  # at this 80x upscale IPP rounds some border columns one float32 step (~1.5e-5 grey) differently
        np.testing.assert_allclose(prepared.tensor.numpy(), mmdet3_pipeline(image), rtol=0, atol=3e-7)
        assert (prepared.tensor[:, :, 1040:] == 0).all()


def test_preprocessing_refuses_what_is_not_uint8_rgb():
    with pytest.raises(ValueError, match="uint8 RGB"):
        pipeline.preprocess(np.zeros((4, 4), dtype=np.uint8))


def test_postprocessing_equals_the_instance_rule_computed_pixel_by_pixel():
    """Masks resized to the padded size, cropped, resized to the original; the top 100 (query, class)
    pairs by class probability; mask score = mean sigmoid inside ``logit > 0``; score = both; box =
    the mask's extent (right/bottom exclusive)."""
    torch.manual_seed(0)
    classes, masks = torch.randn(100, 81) * 3, torch.randn(100, 6, 7) * 2
    prepared = pipeline.Prepared(torch.zeros(3, 24, 28), resized=(20, 26), original=(11, 13))
    det = pipeline.postprocess(classes, masks, (24, 28), prepared)
    padded = torch.nn.functional.interpolate(masks[None], (24, 28), mode="bilinear", align_corners=False)
    full = torch.nn.functional.interpolate(padded[:, :, :20, :26], (11, 13), mode="bilinear", align_corners=False)[0]
    probs = classes.softmax(-1)[:, :80]
    pairs = sorted(((float(probs[q, c]), q, c) for q in range(100) for c in range(80)), reverse=True)[:100]
    expected = []
    for p, q, c in pairs:
        inside = [(y, x) for y in range(11) for x in range(13) if full[q, y, x] > 0]
        mean = sum(float(full[q, y, x].sigmoid()) for y, x in inside) / (len(inside) + 1e-6)
        box = (
            [
                min(x for _, x in inside),
                min(y for y, _ in inside),
                max(x for _, x in inside) + 1,
                max(y for y, _ in inside) + 1,
            ]
            if inside
            else [0, 0, 0, 0]
        )
        expected.append((p * mean, c, box))
    expected.sort(key=lambda e: -e[0])
    assert det.scores.tolist() == pytest.approx([e[0] for e in expected], rel=1e-5, abs=1e-7)
    assert det.labels.tolist() == [e[1] for e in expected]
    assert det.boxes.tolist() == [e[2] for e in expected]
    assert det.masks.shape == (100, 11, 13) and det.masks.dtype == torch.bool


@pytest.mark.parametrize("mode", ["mmdet2", "mmdet3"])
def test_batched_preprocessing_gives_each_image_its_own_tensor(mode):
    """Images of one size pre-processed together: each slice is that image's own :func:`preprocess`,
    bit for bit (the resize indexes the row and column axes, never the batch)."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 37, 53, 3), dtype=np.uint8)
    batch, resized = pipeline.preprocess_batch(torch.from_numpy(images), mode)
    for image, tensor in zip(images, batch, strict=True):
        alone = pipeline.preprocess(image, mode)
        assert alone.resized == resized and torch.equal(alone.tensor, tensor)
    assert not torch.equal(batch[0], batch[1])


def test_min_score_drops_pairs_before_their_masks_and_keeps_the_same_detections():
    """A score is the class probability times a mean probability, so pairs at or below ``min_score`` by
    class probability alone are dropped before their masks are resized: the detections above it are
    those of the full rule, the same values in the same order."""
    torch.manual_seed(2)
    classes, masks = torch.randn(100, 81) * 4, torch.randn(100, 6, 7) * 2
    classes[:20, 3] += 9  # 20 confident queries, of which the masks then decide
    prepared = pipeline.Prepared(torch.zeros(3, 24, 28), resized=(20, 26), original=(11, 13))
    full = pipeline.postprocess(classes, masks, (24, 28), prepared)
    floor = 0.6
    kept = pipeline.postprocess(classes, masks, (24, 28), prepared, min_score=floor)
    n = int((full.scores > floor).sum())
    assert 0 < n < int((pipeline.top_pairs(classes)[0] > floor).sum())  # the masks did drop some
    assert torch.equal(kept.scores, full.scores[:n]) and torch.equal(kept.labels, full.labels[:n])
    assert torch.equal(kept.boxes, full.boxes[:n]) and torch.equal(kept.masks, full.masks[:n])
    assert torch.equal(kept.queries, full.queries[:n])
    none = pipeline.postprocess(classes, masks, (24, 28), prepared, min_score=1.0)
    assert none.masks.shape == (0, 11, 13) and none.boxes.shape == (0, 4) and none.scores.numel() == 0


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 512, 512), (0, 9, 9)])
def test_masks_cross_to_the_host_as_numpys_bits(shape):
    """:func:`pack_bits` is ``np.packbits`` (first element in the high bit), and the detector's copy to the
    host restores the boolean masks exactly."""
    masks = torch.from_numpy(np.random.default_rng(3).random(shape) > 0.5)
    assert np.array_equal(pipeline.pack_bits(masks).numpy(), np.packbits(masks.numpy()))
    det = pipeline.Detections(
        torch.zeros(shape[0], dtype=torch.long), torch.ones(shape[0]), torch.zeros(shape[0], 4), masks,
        torch.zeros(shape[0], dtype=torch.long),
    )  # fmt: skip
    found = PortDetector.to_host(det)
    assert found.masks.dtype == bool and np.array_equal(found.masks, masks.numpy())


# ---------------------------------------------------------------- the detector in this process

from geneval_stand_ins import FixedOutputs  # noqa: E402

from rtdmd.geneval.m2f.detector import PortDetector  # noqa: E402
from rtdmd.rewards import geneval_real  # noqa: E402


class RowWise(torch.nn.Module):
    """A stand-in network whose outputs for an image depend on that image alone (as the real one's do,
    up to rounding): class and mask logits from the image's pixels."""

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = batch.shape
        pooled = torch.nn.functional.adaptive_avg_pool2d(batch, 4).flatten(1)  # [B, 48]
        classes = torch.sin(pooled[:, :, None] * torch.arange(1, 82 * 100 // 48 + 2)).flatten(1)[:, : 100 * 81]
        masks = torch.nn.functional.interpolate(batch[:, :1], (h // 4, w // 4), mode="nearest")
        return 3 * classes.view(b, 100, 81), masks * torch.linspace(-1, 1, 100).view(1, 100, 1, 1)


def test_the_port_detects_batches_of_mixed_sizes_as_one_image_at_a_time():
    """Images grouped by size and batched give each image's own detections, in the input order (the
    client's contract: float32 boxes and scores, int64 labels, bool masks at the image's size, scores
    above min_score)."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((64, 64, 3), (48, 80, 3), (64, 64, 3))]
    port = PortDetector(RowWise(), batch_size=2, min_score=0.005)
    together = port.detect(images)
    for image, found in zip(images, together, strict=True):
        alone = port.detect([image])[0]
        assert found.boxes.dtype == np.float32 and found.labels.dtype == np.int64 and found.masks.dtype == bool
        assert found.masks.shape[1:] == image.shape[:2] and (found.scores > 0.005).all() and len(found) > 0
        np.testing.assert_allclose(found.scores, alone.scores, rtol=1e-5)
        assert (found.labels == alone.labels).all() and (found.masks == alone.masks).all()
    assert not np.array_equal(together[0].scores, together[2].scores)  # two different images of one size


class SmallMemory(RowWise):
    """:class:`RowWise` on a device that holds at most ``limit`` images."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"out of memory at {batch.shape[0]} images (stand-in)")
        return super().forward(batch)


def test_a_batch_out_of_device_memory_is_detected_in_halves():
    """No lost work on a small GPU: the batch that did not fit is split, later batches keep the smaller
    size, and every image gets the detections it gets alone; a single image that does not fit is an error."""
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(5)]
    port = PortDetector(SmallMemory(2), batch_size=8, min_score=0.005)
    with pytest.warns(UserWarning, match="out of device memory at batch 5; continuing at batch 2"):
        found = port.detect(images)
    assert port.batch_size == 2
    for image, got in zip(images, found, strict=True):
        alone = PortDetector(RowWise(), batch_size=1, min_score=0.005).detect([image])[0]
        np.testing.assert_allclose(got.scores, alone.scores, rtol=1e-5)
        assert (got.labels == alone.labels).all() and (got.masks == alone.masks).all()
    with pytest.raises(torch.OutOfMemoryError):
        PortDetector(SmallMemory(0), batch_size=4).detect(images[:1])


def test_the_port_keeps_only_detections_scoring_above_min_score():
    """Pairs whose class probability passes ``min_score`` but whose score (times the mask's mean
    probability) does not are dropped: the detector returns exactly the rule's detections above it."""
    torch.manual_seed(2)
    classes, masks = torch.randn(100, 81) * 4, torch.randn(100, 6, 7) * 2
    classes[:20, 3] += 9
    image = np.random.default_rng(4).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    found = PortDetector(FixedOutputs(classes, masks), min_score=0.6).detect([image])[0]
    prepared = pipeline.preprocess(image)
    padded = tuple(prepared.tensor.shape[1:])
    _, mask_logits = FixedOutputs(classes, masks)(prepared.tensor[None])
    rule = pipeline.postprocess(classes, mask_logits[0], padded, prepared)
    above = rule.scores > 0.6
    assert 0 < int(above.sum()) < int((pipeline.top_pairs(classes)[0] > 0.6).sum())
    np.testing.assert_array_equal(found.scores, rule.scores[above].numpy())
    np.testing.assert_array_equal(found.labels, rule.labels[above].numpy())
    np.testing.assert_array_equal(found.masks, rule.masks[above].numpy())


def test_the_backend_is_the_port_unless_mmdet_is_asked_for(monkeypatch):
    monkeypatch.delenv(geneval_real.BACKEND_ENV, raising=False)
    assert geneval_real.backend_of(None) == "port"
    monkeypatch.setenv(geneval_real.BACKEND_ENV, "mmdet")
    assert geneval_real.backend_of(None) == "mmdet" and geneval_real.backend_of("port") == "port"
    with pytest.raises(ValueError, match="choose one of port, mmdet"):
        geneval_real.backend_of("detectron")
