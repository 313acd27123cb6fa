"""``hpsv2`` / ``hpsv21`` against the official ``hpsv2`` package (PyPI ``hpsv2x==1.2.0``).

Random weights are made by hpsv2's own ``create_model_and_transforms`` (its vendored open_clip
2.16), perturbed, and saved in fp16 as ``{'iterations', 'name', 'state_dict'}`` under a weights root
laid out as ``<root>/xswu/HPSv2/HPS_v2_compressed.pt``. The official ``hpsv2.img_score.score``
loads that file itself (``cp=``) and scores PIL images one at a time; ours loads the same file
through ``resolve`` and scores the same images batched, by the reference path and, on the float
images ``uint8 / 255``, by the differentiable tensor path. All must agree to 1e-5 (fp32, CPU).

The official code runs unchanged except for two module globals: ``img_score.model_dict`` is
filled with the model that ``initialize_model`` would build (so that it does not download the
base laion weights, which the HPS state dict overwrites anyway), and ``img_score.device`` is
"cpu" (on a CUDA machine it would otherwise run under fp16 autocast).

``test_tiny`` registers a tiny ViT-H-14-shaped config in hpsv2's open_clip (``add_model_config``)
and passes the same dict to ours (about a minute on CPU); ``test_full_size`` (also marked ``slow``)
uses the real ``ViT-H-14`` (~1B parameters).

Environment: Python 3.11, ``torch==2.14.1 torchvision==0.29.1``, rtdmd with its ``rewards`` extra
(``open_clip_torch`` 3.3), then ``pip install --no-deps hpsv2x==1.2.0 clint==0.5.1 args==0.1.0``
(hpsv2x's own requirements pin ``protobuf<4`` and ``pytest==7.2.0``, which conflict with rtdmd's
and are not needed to score).
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rtdmd.rewards import hps

pytestmark = pytest.mark.parity

TOLERANCE = 1e-5
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
DEMO_PROMPT = "A cat with two horns on its head"  # the prompt of hpsv2's demo image (README)
PROMPTS = [
    "a photo of a cat",
    "An astronaut riding a horse, &amp; a &lt;b&gt; tag, CAPITALS and   extra   spaces",
    "café naïve — “curly quotes” 🐱🚀 \u3000ideographic space",
    "control\x1cchars\x1dthat\x1ffix_text removes",
    "",
    " ".join(["a very long prompt that runs past the seventy-seven token context"] * 8),
]
SIZES = [(224, 224), (512, 512), (300, 200), (97, 150), (768, 1024), (225, 224)]  # (height, width)


def images() -> list[Image.Image]:
    """hpsv2's demo image plus smooth random images of several sizes (square, portrait, landscape,
    up- and downscaled, one pixel off 224) and one greyscale image (mode 'L')."""
    import hpsv2

    generator = torch.Generator().manual_seed(0)
    out = [Image.open(Path(hpsv2.__file__).parent / "assets" / "demo_image.jpg")]
    for height, width in SIZES:
        coarse = torch.rand(1, 3, 12, 12, generator=generator)
        smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
        noisy = (smooth + 0.05 * torch.randn(smooth.shape, generator=generator)).clamp(0, 1)
        out.append(Image.fromarray((noisy[0].permute(1, 2, 0) * 255).round().byte().numpy()))
    out.append(out[3].convert("L"))
    return out


def official_model(model_name: str, config_dir: Path, cfg: dict | None):
    """``initialize_model``'s call with ``pretrained=None`` (``hpsv2.evaluation``'s choice)."""
    from hpsv2.src.open_clip import add_model_config, create_model_and_transforms

    if cfg is not None:
        path = config_dir / f"{model_name}.json"
        path.write_text(json.dumps(cfg))
        add_model_config(path)
    torch.manual_seed(0)  # the initial weights (then perturbed with a seeded generator): same scores every run
    model, _, preprocess_val = create_model_and_transforms(
        model_name,
        None,
        precision="amp",
        device="cpu",
        jit=False,
        force_quick_gelu=False,
        force_custom_text=False,
        force_patch_dropout=False,
        force_image_size=None,
        pretrained_image=False,
        image_mean=None,
        image_std=None,
        light_augmentation=True,
        aug_cfg={},
        output_dict=True,
        with_score_predictor=False,
        with_region_predictor=False,
    )
    return model, preprocess_val


def save_random_checkpoint(model, root: Path, seed: int = 0) -> Path:
    """Perturb every float tensor of the model (LayerNorms, biases, projections away from their
    structured initial values) and save it in fp16 like the ``*_compressed.pt`` files."""
    generator = torch.Generator().manual_seed(seed)
    state = {k: (v + 0.02 * torch.randn(v.shape, generator=generator)).half() for k, v in model.state_dict().items()}
    path = root / hps.HPS_REPO / hps.HPS_V20_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"iterations": 4000, "name": "parity", "state_dict": state}, path)
    (path.parent / hps.HPS_V21_FILE).symlink_to(path.name)
    return path


def official_scores(model, preprocess_val, checkpoint: Path, pictures, prompts, monkeypatch) -> torch.Tensor:
    """``hpsv2.img_score.score(images, prompt, cp=checkpoint)`` once per distinct prompt (it takes
    one prompt for a list of images, and reloads the checkpoint on every call)."""
    from hpsv2 import img_score

    monkeypatch.setattr(img_score, "device", "cpu")
    monkeypatch.setattr(img_score, "model_dict", {"model": model, "preprocess_val": preprocess_val})
    scores = np.zeros(len(pictures), dtype=np.float32)
    for prompt in dict.fromkeys(prompts):
        rows = [i for i, p in enumerate(prompts) if p == prompt]
        scores[rows] = img_score.score([pictures[i] for i in rows], prompt, cp=str(checkpoint))
    return torch.from_numpy(scores)


def compare(tmp_path, monkeypatch, model_name: str, cfg: dict | None, full: bool = True) -> dict[str, float]:
    """Official vs ours on the same checkpoint. ``full=False`` (the 1B-parameter run) scores 4
    images under 2 prompts (each distinct prompt costs the official code a checkpoint reload) by the
    reference path of ``hpsv2`` only (``hpsv21`` differs by its file name; the tensor path by
    preprocessing, both covered by the tiny run)."""
    from hpsv2.src.open_clip import get_tokenizer, tokenize

    pictures = images()
    prompts = [DEMO_PROMPT] + [PROMPTS[i % len(PROMPTS)] for i in range(len(pictures) - 1)]
    if not full:
        pictures, prompts = pictures[:4], [DEMO_PROMPT, PROMPTS[1], PROMPTS[1], DEMO_PROMPT]
    model, preprocess_val = official_model(model_name, tmp_path, cfg)
    checkpoint = save_random_checkpoint(model, tmp_path / "weights")
    official_keys = list(model.state_dict())
    expected = official_scores(model, preprocess_val, checkpoint, pictures, prompts, monkeypatch)
    official_pixels = torch.stack([preprocess_val(picture) for picture in pictures])
    del model  # the full-size run holds one ~4 GB model at a time
    gc.collect()

    assert get_tokenizer("ViT-H-14") is tokenize
    diffs = {"preprocessing": float((hps.reference_pixels(pictures) - official_pixels).abs().max())}
    for cls in (hps.HpsV2, hps.HpsV21) if full else (hps.HpsV2,):
        reward = cls(weights_dir=tmp_path / "weights", model_cfg=cfg or hps.VIT_H_14)
        assert list(reward.net.module.state_dict()) == official_keys
        assert torch.equal(reward.tokenizer(PROMPTS + [DEMO_PROMPT]), tokenize(PROMPTS + [DEMO_PROMPT]))
        diffs[f"{cls.name} reference path"] = float((reward.reference(pictures, prompts) - expected).abs().max())
        if full:
            with torch.no_grad():
                floats = [torch.from_numpy(np.asarray(p.convert("RGB"))).permute(2, 0, 1)[None] / 255 for p in pictures]
                tensor = torch.cat([reward(x.float(), [prompt]) for x, prompt in zip(floats, prompts, strict=True)])
            diffs[f"{cls.name} tensor path"] = float((tensor - expected).abs().max())
        del reward
        gc.collect()
    print(f"\nPARITY hps ({model_name}): official scores {[round(float(s), 5) for s in expected]}")
    for name, diff in diffs.items():
        print(f"PARITY {name}: max |ours - official| = {diff:.3e} over {len(pictures)} images")
    assert expected.std() > 1e-3  # the weights make scores depend on image and prompt
    assert all(diff <= TOLERANCE for diff in diffs.values()), diffs
    return diffs


def test_tiny(tmp_path, monkeypatch):
    compare(tmp_path, monkeypatch, "HPS-tiny-parity", TINY)


@pytest.mark.slow
def test_full_size(tmp_path, monkeypatch):
    """The released ViT-H-14 shapes and key layout with random weights, end to end: ~1B
    parameters built twice, a 2 GB checkpoint written and loaded three times (minutes on CPU, 10 GB
    of memory; deselect with ``-m "parity and not slow"``)."""
    start = time.perf_counter()
    compare(tmp_path, monkeypatch, "ViT-H-14", None, full=False)
    print(f"PARITY hps full-size took {time.perf_counter() - start:.0f} s")
