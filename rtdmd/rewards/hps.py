"""HPSv2 and HPSv2.1: ``hpsv2`` and ``hpsv21`` (metrics.md §5).

An open_clip ``ViT-H-14`` (vision: 32 layers, width 1280, patch 14, 224 px; text: 24 layers, width
1024; embedding 1024) with the fine-tuned weights of the hub repository ``xswu/HPSv2``
(``HPS_v2_compressed.pt`` for v2.0, ``HPS_v2.1_compressed.pt`` for v2.1). The score is the raw
cosine

    s = <f_img / |f_img|, f_txt / |f_txt|>

with no logit scale (typically 0.25-0.35; the HPSv2 benchmark prints ``100 s``). v2.0 and v2.1
scores are not comparable with each other.

``__call__`` is the differentiable tensor path: float images ``[B, 3, H, W]`` in [0, 1], longest
side resized to 224 (bicubic, antialiased), zero-padded to 224 x 224, OpenAI normalisation.
``reference`` is the official ``hpsv2.img_score.score`` preprocessing on uint8 or PIL images: PIL ->
``ToTensor`` -> ``ResizeMaxSize(224)`` on the float tensor -> normalisation. For images with uint8
values (``k / 255``) both paths apply the same arithmetic; they differ only by rounding a float
image to uint8.

Differences from the official code, all deliberate:

* the official ``score`` first builds the model with the base laion weights (a 3.9 GB download)
  that the HPS state dict then overwrites; we build with random initialisation instead, like
  ``hpsv2.evaluation`` (the strict load replaces every parameter either way);
* the official ``score`` runs under CUDA fp16 autocast, one image at a time; we run batched in the
  reward's dtype (fp32 by default, which is what the parity test compares);
* RGBA images are converted to RGB (the official transform keeps the alpha channel, which the
  3-channel patch embedding then rejects);
* ``hpsv2`` vendors open_clip 2.16; we use the installed ``open_clip_torch``, whose ``ViT-H-14``
  has the same configuration, module tree and state-dict keys, and whose tokenizer gives the same
  tokens (checked by ``tests/parity/test_parity_hps.py``).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from rtdmd.rewards.base import DTYPES, REWARDS, OnDevice, RewardInfo
from rtdmd.rewards.preprocess import normalize, resize_longest_pad, to_pil
from rtdmd.weights import WeightFiles, resolve

HPS_REPO = "xswu/HPSv2"
HPS_V20_FILE = "HPS_v2_compressed.pt"
HPS_V21_FILE = "HPS_v2.1_compressed.pt"
TOKENIZER_NAME = "ViT-H-14"  # hpsv2 calls get_tokenizer('ViT-H-14'): CLIP BPE, 77 tokens

# hpsv2/src/open_clip/model_configs/ViT-H-14.json, pinned here so that a change of the installed
# open_clip's copy cannot silently change the architecture the weights are loaded into
VIT_H_14: dict[str, Any] = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}

# torch's own opt-in to full unpickling; we honour it instead of inventing another switch
TRUST_PICKLE_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def hps_score(image_features: Tensor, text_features: Tensor) -> Tensor:
    """``s_i = <a_i / |a_i|, b_i / |b_i|>`` row by row: the raw cosine of image and text features,
    computed in fp32 (no logit scale)."""
    a = nn.functional.normalize(image_features.float(), dim=-1)
    b = nn.functional.normalize(text_features.float(), dim=-1)
    return (a * b).sum(-1)


def build_clip(model_cfg: dict[str, Any]) -> nn.Module:
    """A randomly initialised open_clip ``CLIP`` of ``model_cfg`` (the keys of a ``model_configs``
    JSON file), in fp32 on the CPU, as ``create_model(name, pretrained=None)`` builds it."""
    from open_clip.model import CLIP

    return CLIP(**deepcopy(model_cfg))


def load_state_dict(path: Path) -> dict[str, Tensor]:
    """``torch.load(path)['state_dict']`` with the safe unpickler.

    hpsv2's trainer saves ``{iterations: int, name: str, state_dict, optimizer}``, all types that
    ``weights_only=True`` accepts. A file that needs more fails with the refused global named;
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (torch's own switch) loads it with full unpickling.
    """
    trusted = os.environ.get(TRUST_PICKLE_ENV, "").lower() in ("1", "y", "yes", "true")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as error:
        reason = next((line.strip() for line in str(error).splitlines() if "WeightsUnpickler" in line), str(error))
        raise ValueError(
            f"{path}: torch.load(weights_only=True) refused it ({reason}). If you trust the file, "
            f"set {TRUST_PICKLE_ENV}=1 to load it with full unpickling."
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        keys = list(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path}: not an HPS checkpoint (expected a dict with 'state_dict', got {keys})")
    return checkpoint["state_dict"]


def load_hps(path: Path, model_cfg: dict[str, Any] = VIT_H_14) -> nn.Module:
    """The HPS model: :func:`build_clip` then a strict load of the checkpoint's state dict (fp16
    values are copied into the fp32 parameters, as ``load_state_dict`` does in hpsv2)."""
    model = build_clip(model_cfg)
    model.load_state_dict(load_state_dict(path), strict=True)
    return model.eval()


def reference_pixels(images, size: int = 224, antialias: bool = True) -> Tensor:
    """The official ``preprocess_val`` (``image_transform(is_train=False, resize_longest_max=True)``)
    per image: RGB PIL -> ``ToTensor`` (uint8 / 255) -> ``ResizeMaxSize`` (:func:`resize_longest_pad`,
    bicubic) -> OpenAI normalisation; stacked to ``[B, 3, size, size]``."""
    from torchvision.transforms import functional as F

    resized = [resize_longest_pad(F.to_tensor(image), size, "bicubic", antialias) for image in to_pil(images)]
    return normalize(torch.stack(resized))


def tensor_pixels(images: Tensor, size: int = 224) -> Tensor:
    """The differentiable path: ``normalize(resize_longest_pad(x, size, bicubic))`` on ``[B, 3, H, W]``
    in [0, 1] (antialiased, the reference's arithmetic on a batch)."""
    return normalize(resize_longest_pad(images.float(), size, "bicubic"))


class _Hps:
    """HPS plumbing shared by both versions; subclasses set the checkpoint file."""

    name: ClassVar[str]
    checkpoint: ClassVar[str]
    weights: ClassVar[tuple[WeightFiles, ...]]
    info: ClassVar[RewardInfo]

    def __init__(
        self, weights_dir: str | Path | None = None, dtype: str = "float32", model_cfg: dict[str, Any] | None = None
    ) -> None:
        """``model_cfg`` overrides the ``ViT-H-14`` architecture (tests load tiny checkpoints of the
        same structure through this same path)."""
        import open_clip

        folder = resolve(self.name, self.weights[0], weights_dir)
        self.net = OnDevice(load_hps(folder / self.checkpoint, model_cfg or VIT_H_14), DTYPES[dtype])
        self.tokenizer = open_clip.get_tokenizer(TOKENIZER_NAME)
        self.image_size = int(self.net.module.visual.image_size[0])

    def text_features(self, prompts: Sequence[str], device: torch.device) -> Tensor:
        """Text features ``[B, D]`` (not normalised); each distinct prompt is encoded once (RL
        batches repeat a prompt for every image of its group)."""
        row = {prompt: i for i, prompt in enumerate(dict.fromkeys(prompts))}
        tokens = self.tokenizer(list(row)).to(device)
        features = self.net.on(device).encode_text(tokens)
        return features[torch.tensor([row[prompt] for prompt in prompts], device=device)]

    def from_pixels(self, pixels: Tensor, prompts: Sequence[str]) -> Tensor:
        """Scores ``[B]`` (fp32) of normalised ``[B, 3, 224, 224]`` pixels: :func:`hps_score`."""
        if len(prompts) != len(pixels):
            raise ValueError(f"{len(pixels)} images but {len(prompts)} prompts")
        net = self.net.on(pixels.device)
        image_features = net.encode_image(pixels.to(self.net.dtype))
        return hps_score(image_features, self.text_features(prompts, pixels.device))

    def __call__(self, images: Tensor, prompts: Sequence[str], meta: Sequence[dict[str, Any]] = ()) -> Tensor:
        return self.from_pixels(tensor_pixels(images, self.image_size), prompts)

    @torch.no_grad()
    def reference(
        self, images, prompts: Sequence[str], device: torch.device | str = "cpu", antialias: bool = True
    ) -> Tensor:
        """Scores of uint8 ``[B, H, W, 3]`` / PIL images (float ``[B, 3, H, W]`` is rounded to uint8
        first) through the official preprocessing; ``antialias=False`` is torchvision < 0.17's
        tensor resize."""
        pixels = reference_pixels(images, self.image_size, antialias).to(device)
        return self.from_pixels(pixels, prompts)


def _info(version: str) -> RewardInfo:
    return RewardInfo(
        version=version,
        higher_is_better=True,
        differentiable=True,
        units="raw cosine (the HPSv2 benchmark reports x100)",
    )


@REWARDS.register("hpsv2")
class HpsV2(_Hps):
    """HPS v2.0 (``HPS_v2_compressed.pt``): raw cosine of open_clip ViT-H-14 image and text features."""

    name = "hpsv2"
    checkpoint = HPS_V20_FILE
    weights = (WeightFiles(repo=HPS_REPO, files=(HPS_V20_FILE,)),)
    info = _info(f"v2.0 ({HPS_V20_FILE})")


@REWARDS.register("hpsv21")
class HpsV21(_Hps):
    """HPS v2.1 (``HPS_v2.1_compressed.pt``): raw cosine of open_clip ViT-H-14 image and text features."""

    name = "hpsv21"
    checkpoint = HPS_V21_FILE
    weights = (WeightFiles(repo=HPS_REPO, files=(HPS_V21_FILE,)),)
    info = _info(f"v2.1 ({HPS_V21_FILE})")
