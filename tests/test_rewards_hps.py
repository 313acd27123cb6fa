"""``hpsv2`` / ``hpsv21`` on tiny random checkpoints of the ViT-H-14 structure (CPU, no downloads).

The checkpoints are written in the HPS file format (``{'state_dict': ...}``, fp16 like the
``*_compressed.pt`` files) under a temporary weights root and loaded through the real path:
``resolve`` -> ``torch.load(weights_only=True)`` -> strict ``load_state_dict``.
"""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from rtdmd.rewards import hps
from rtdmd.rewards.base import REWARDS, score
from rtdmd.rewards.preprocess import resize_longest_pad, to_pil
from rtdmd.weights import MissingWeights

# ViT-H-14's structure (patch 14, 224 px, 77-token BPE text tower), few layers and narrow widths
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
PROMPTS = ["a photo of a cat", "a red cube on a table", "two dogs playing in the snow"]


def tiny_state(seed: int) -> dict[str, torch.Tensor]:
    """A tiny model's state dict with every float tensor perturbed (so LayerNorm weights, biases and
    the projections are not at their structured initial values), stored in fp16 like the HPS files."""
    torch.manual_seed(seed)
    state = hps.build_clip(TINY).state_dict()
    generator = torch.Generator().manual_seed(seed)
    return {k: (v + 0.05 * torch.randn(v.shape, generator=generator)).half() for k, v in state.items()}


def write_checkpoint(path, state, **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"iterations": 1, "name": "tiny", "state_dict": state, **extra}, path)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    write_checkpoint(root / hps.HPS_REPO / hps.HPS_V20_FILE, tiny_state(0))
    write_checkpoint(root / hps.HPS_REPO / hps.HPS_V21_FILE, tiny_state(1))
    return root


@pytest.fixture(scope="module")
def reward(root):
    return hps.HpsV2(weights_dir=root, model_cfg=TINY)


def images(n: int, height: int = 224, width: int = 224, seed: int = 0) -> torch.Tensor:
    """Smooth random images (low-frequency noise upsampled), so resizing is not dominated by aliasing."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


def test_pinned_config_is_open_clips_vit_h_14():
    import open_clip

    assert open_clip.get_model_config("ViT-H-14") == hps.VIT_H_14


def test_tiny_model_has_the_full_models_keys():
    with torch.device("meta"):  # the 1B-parameter model's layout without allocating it
        full = hps.build_clip(hps.VIT_H_14).state_dict()
    tiny = hps.build_clip(TINY).state_dict()

    def layout(keys) -> set[str]:  # key names with the block index dropped: 32/24 blocks vs 2/2
        return {re.sub(r"\.resblocks\.\d+\.", ".resblocks.N.", key) for key in keys}

    assert layout(full) == layout(tiny)
    assert full["visual.conv1.weight"].shape[1:] == tiny["visual.conv1.weight"].shape[1:] == (3, 14, 14)
    assert full["positional_embedding"].shape[0] == tiny["positional_embedding"].shape[0] == 77


def test_registered_with_weights_and_info():
    assert REWARDS.get("hpsv2") is hps.HpsV2 and REWARDS.get("hpsv21") is hps.HpsV21
    assert hps.HpsV2.weights[0].repo == hps.HpsV21.weights[0].repo == "xswu/HPSv2"
    assert hps.HpsV2.weights[0].names == ("HPS_v2_compressed.pt",)
    assert hps.HpsV21.weights[0].names == ("HPS_v2.1_compressed.pt",)
    for cls, version in ((hps.HpsV2, "v2.0"), (hps.HpsV21, "v2.1")):
        assert cls.info.version.startswith(version) and cls.weights[0].names[0] in cls.info.version
        assert cls.info.higher_is_better and cls.info.differentiable and "raw cosine" in cls.info.units


def test_scores_are_cosines_of_shape_b(reward):
    out = reward(images(3), PROMPTS)
    assert out.shape == (3,) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and (out.abs() <= 1 + 1e-6).all()
    assert out.std() > 0  # different images and prompts, different scores


def test_score_is_the_cosine_of_the_models_features(reward):
    """The formula itself: <f_img/|f_img|, f_txt/|f_txt|> from open_clip's own normalising forward."""
    pixels = hps.tensor_pixels(images(2))
    tokens = reward.tokenizer(PROMPTS[:2])
    with torch.no_grad():
        out = reward.net.module(pixels, tokens)
        image_f, text_f = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
        expected = torch.diagonal(image_f @ text_f.T)
        ours = reward(images(2), PROMPTS[:2])
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_batch_invariance_with_repeated_prompts(reward):
    x = images(5, 256, 192, seed=1)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[0]]
    with torch.no_grad():
        batch = reward(x, prompts)
        alone = torch.cat([reward(x[i : i + 1], prompts[i : i + 1]) for i in range(5)])
    assert float((batch - alone).abs().max()) <= 1e-5
    torch.testing.assert_close(score(reward, x, prompts, batch_size=2), batch, atol=1e-5, rtol=0)


def test_gradient_reaches_the_image(reward):
    x = images(2, 320, 240, seed=2).requires_grad_(True)
    reward(x, PROMPTS[:2]).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.net.module.parameters())


def test_bfloat16_runs_close_to_float32(root, reward):
    low = hps.HpsV2(weights_dir=root, dtype="bfloat16", model_cfg=TINY)
    assert next(low.net.module.parameters()).dtype == torch.bfloat16
    x = images(2, seed=3).requires_grad_(True)
    out = low(x, PROMPTS[:2])
    out.sum().backward()
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    with torch.no_grad():
        diff = float((out.detach() - reward(x, PROMPTS[:2])).abs().max())
    print(f"\nhpsv2 tiny bf16 vs fp32: max |diff| = {diff:.2e}")
    assert diff < 0.05


def test_reference_path_equals_tensor_path_on_uint8_images(reward):
    """With uint8 values both paths do the same arithmetic (v1 vs v2 torchvision resize, per image
    vs batched): equal to GEMM noise, resized-and-padded or not."""
    for height, width in ((224, 224), (300, 200), (97, 150)):
        pixels = (images(2, height, width, seed=4) * 255).round().to(torch.uint8)
        with torch.no_grad():
            tensor = reward(pixels.float() / 255, PROMPTS[:2])
        reference = reward.reference(pixels.permute(0, 2, 3, 1), PROMPTS[:2])
        diff = float((tensor - reference).abs().max())
        print(f"\nhpsv2 reference vs tensor path, uint8 {height}x{width}: max |diff| = {diff:.2e}")
        assert diff <= 1e-5


def test_reference_path_rounds_float_images_to_uint8(reward):
    """On float images the reference path sees the uint8 rounding (what a saved PNG holds); the
    difference to the tensor path is that rounding's effect, small but not zero."""
    x = images(3, 384, 256, seed=5) + 0.002 * torch.randn(3, 3, 384, 256, generator=torch.Generator().manual_seed(0))
    x = x.clamp(0, 1)
    with torch.no_grad():
        tensor = reward(x, PROMPTS)
    reference = reward.reference(x, PROMPTS)
    diff = float((tensor - reference).abs().max())
    print(f"\nhpsv2 reference (uint8-rounded) vs tensor path, float 384x256: max |diff| = {diff:.2e}")
    assert 0 < diff < 1e-2


def test_reference_accepts_pil_and_antialias_matters_only_when_downscaling(reward):
    pixels = (images(2, 448, 336, seed=6) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    pil = to_pil(pixels)
    assert torch.equal(reward.reference(pil, PROMPTS[:2]), reward.reference(pixels, PROMPTS[:2]))
    downscaled = (reward.reference(pil, PROMPTS[:2]) - reward.reference(pil, PROMPTS[:2], antialias=False)).abs()
    assert downscaled.max() > 1e-6
    square = to_pil(pixels[:, :224, :224])
    assert torch.equal(reward.reference(square, PROMPTS[:2]), reward.reference(square, PROMPTS[:2], antialias=False))


def test_resize_max_size_geometry_and_agreement_with_the_batched_resize():
    image = torch.rand(3, 300, 200, generator=torch.Generator().manual_seed(7)) + 0.5  # no zeros inside
    out = resize_longest_pad(image, 224)  # one image, as the reference path resizes
    assert out.shape == (3, 224, 224)
    # 200 * 224/300 = 149.33 -> 149 columns; 75 padding columns: 37 left, 38 right
    assert (out[:, :, :37] == 0).all() and (out[:, :, -38:] == 0).all()
    assert (out[:, :, 37] != 0).all() and (out[:, :, 224 - 39] != 0).all()
    torch.testing.assert_close(resize_longest_pad(image[None], 224)[0], out, atol=1e-6, rtol=0)
    # a longest side of 224 passes unchanged, as in hpsv2 (unpadded, even when not square)
    assert torch.equal(resize_longest_pad(image[:, :224, :100], 224), image[:, :224, :100])


def test_hpsv21_loads_its_own_checkpoint(root, reward):
    v21 = hps.HpsV21(weights_dir=root, model_cfg=TINY)
    with torch.no_grad():
        assert not torch.allclose(v21(images(3), PROMPTS), reward(images(3), PROMPTS))
    loaded = v21.net.module.state_dict()["visual.proj"]
    torch.testing.assert_close(loaded, tiny_state(1)["visual.proj"].float())


def test_prompt_count_must_match(reward):
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        reward(images(3), PROMPTS[:2])


def test_missing_weights_names_the_file_and_the_command(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RTDMD_WEIGHTS", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MissingWeights) as error:
        hps.HpsV2(weights_dir=tmp_path / "empty", model_cfg=TINY)
    message = str(error.value)
    assert "HPS_v2_compressed.pt" in message and "xswu/HPSv2" in message
    assert "rtdmd-bench weights fetch hpsv2" in message
    with pytest.raises(MissingWeights, match=r"HPS_v2\.1_compressed\.pt.*rtdmd-bench weights fetch hpsv21"):
        hps.HpsV21(weights_dir=tmp_path / "empty", model_cfg=TINY)


def test_load_is_strict(tmp_path):
    state = tiny_state(0)
    del state["text_projection"]
    write_checkpoint(tmp_path / hps.HPS_REPO / hps.HPS_V20_FILE, state)
    with pytest.raises(RuntimeError, match="text_projection"):
        hps.HpsV2(weights_dir=tmp_path, model_cfg=TINY)


def test_unsafe_pickle_is_refused_unless_trusted(tmp_path, monkeypatch):
    monkeypatch.delenv(hps.TRUST_PICKLE_ENV, raising=False)
    write_checkpoint(tmp_path / hps.HPS_REPO / hps.HPS_V20_FILE, tiny_state(0), args=argparse.Namespace(lr=1.0))
    with pytest.raises(ValueError, match=f"argparse.Namespace.*{hps.TRUST_PICKLE_ENV}=1"):
        hps.HpsV2(weights_dir=tmp_path, model_cfg=TINY)
    monkeypatch.setenv(hps.TRUST_PICKLE_ENV, "1")
    assert hps.HpsV2(weights_dir=tmp_path, model_cfg=TINY)(images(1), PROMPTS[:1]).shape == (1,)


def test_not_an_hps_checkpoint(tmp_path):
    path = tmp_path / hps.HPS_REPO / hps.HPS_V20_FILE
    path.parent.mkdir(parents=True)
    torch.save(tiny_state(0), path)  # a bare state dict, not {'state_dict': ...}
    with pytest.raises(ValueError, match="not an HPS checkpoint"):
        hps.HpsV2(weights_dir=tmp_path, model_cfg=TINY)
