"""CLIP-family rewards: ``clipscore``, ``aesthetic`` and ``pickscore`` (metrics.md §2-4).

All three are a ``transformers.CLIPModel``: image and text embeddings ``f_img``, ``f_txt`` (the
projected features), and

* ``clipscore``: ``cos(f_img, f_txt)``, OpenAI CLIP ViT-L/14, the raw cosine that RTDMD and
  DiffusionNFT report (0.2-0.35); torchmetrics' ``CLIPScore`` is ``max(100 cos, 0)``;
* ``aesthetic``: ``MLP(f_img / |f_img|)``, the LAION improved aesthetic predictor
  (``sac+logos+ava1-l14-linearMSE``: five linear layers, no activations) on CLIP ViT-L/14, 1-10;
* ``pickscore``: ``exp(logit_scale) cos(f_img, f_txt)``, PickScore_v1 (CLIP-H/14) in published
  units (about 18-24); ``scale="div26"`` gives Flow-GRPO's ``/26`` training reward.

``__call__`` is the differentiable tensor path (:func:`rtdmd.rewards.preprocess.clip_tensor`,
bicubic, antialiased); ``reference`` takes uint8 or PIL images through the official PIL
preprocessing: transformers' ``CLIPImageProcessorPil`` (CLIPScore, PickScore) or OpenAI CLIP's
``preprocess`` (aesthetic, as ``simple_inference.py``). Text is padded to 77 tokens, so a prompt's
score does not depend on the other prompts of its batch (CLIP's causal mask keeps padding out of
the end-of-text feature either way).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from rtdmd.rewards.base import DTYPES, REWARDS, OnDevice, RewardInfo
from rtdmd.rewards.heads import linear_head
from rtdmd.rewards.preprocess import Interpolation, clip_reference, clip_tensor, to_pil
from rtdmd.weights import WeightFiles, resolve_all

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CLIP_L14 = WeightFiles(
    repo="openai/clip-vit-large-patch14",
    files=("config.json", "model.safetensors", "preprocessor_config.json", *TOKENIZER_FILES),
)
AESTHETIC_MLP = WeightFiles(
    url="https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth",
    sha256="21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
)
PICKSCORE_V1 = WeightFiles(repo="yuvalkirstain/PickScore_v1", files=("config.json", "model.safetensors"))
# PickScore's model card takes the processor (tokenizer + image config) from the base CLIP-H
CLIP_H14_PROCESSOR = WeightFiles(
    repo="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", files=("preprocessor_config.json", *TOKENIZER_FILES)
)
PICKSCORE_DIVISOR = 26.0  # Flow-GRPO / DiffusionNFT / RTDMD train on PickScore / 26


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b> / (|a| |b|)`` row by row."""
    return (nn.functional.normalize(a.float(), dim=-1) * nn.functional.normalize(b.float(), dim=-1)).sum(-1)


def aesthetic_mlp() -> nn.Sequential:
    """The aesthetic predictor's head on the 768-wide CLIP ViT-L/14 embedding."""
    return linear_head(768)


class ClipModel:
    """A ``CLIPModel`` with its tokenizer and PIL image processor, following the images' device."""

    def __init__(self, model_dir: Path, processor_dir: Path | None = None, dtype: str = "float32") -> None:
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        processor_dir = processor_dir or model_dir
        self.net = OnDevice(CLIPModel.from_pretrained(model_dir), DTYPES[dtype])
        self.tokenizer = AutoTokenizer.from_pretrained(processor_dir)
        self.processor = CLIPImageProcessorPil.from_pretrained(processor_dir)
        self.image_size = int(self.net.module.config.vision_config.image_size)

    def image_features(self, pixels: Tensor) -> Tensor:
        """Projected image embeddings of normalised pixels ``[B, 3, S, S]`` (not normalised)."""
        net = self.net.on(pixels.device)
        return net.get_image_features(pixel_values=pixels.to(self.net.dtype)).pooler_output.float()

    def text_features(self, prompts: Sequence[str], device: torch.device) -> Tensor:
        ids = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=77, return_tensors="pt"
        ).to(device)
        net = self.net.on(device)
        return net.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask).pooler_output.float()

    def tensor_pixels(self, images: Tensor, interpolation: Interpolation) -> Tensor:
        return clip_tensor(images, self.image_size, interpolation)

    def reference_pixels(self, images) -> Tensor:
        """``CLIPImageProcessorPil``: PIL bicubic resize of the shortest side, centre crop, rescale, normalise."""
        return self.processor(images=to_pil(images), return_tensors="pt").pixel_values


class _ClipReward:
    """Shared plumbing: tensor path (``__call__``) and reference path (``reference``) both end in
    the subclass's ``from_pixels(pixels, prompts)``, the metric's formula on preprocessed pixels."""

    weights: ClassVar[tuple[WeightFiles, ...]]
    info: ClassVar[RewardInfo]
    name: ClassVar[str]

    def __init__(self, clip: ClipModel, interpolation: Interpolation = "bicubic") -> None:
        self.clip = clip
        self.interpolation = interpolation

    def __call__(self, images: Tensor, prompts: Sequence[str], meta: Sequence[dict[str, Any]] = ()) -> Tensor:
        return self.from_pixels(self.clip.tensor_pixels(images, self.interpolation), prompts)

    @torch.no_grad()
    def reference(self, images, prompts: Sequence[str], device: torch.device | str = "cpu") -> Tensor:
        return self.from_pixels(self.clip.reference_pixels(images).to(device), prompts)


@REWARDS.register("clipscore")
class ClipScore(_ClipReward):
    """``cos(f_img, f_txt)`` under OpenAI CLIP ViT-L/14 (raw cosine; torchmetrics reports
    ``max(100 cos, 0)``)."""

    name = "clipscore"
    weights = (CLIP_L14,)
    info = RewardInfo(
        version="openai/clip-vit-large-patch14",
        higher_is_better=True,
        differentiable=True,
        units="raw cosine (torchmetrics CLIPScore = max(100 x, 0))",
    )

    def __init__(self, weights_dir: str | Path | None = None, dtype: str = "float32", **kwargs) -> None:
        (folder,) = resolve_all(self.name, self.weights, weights_dir)
        super().__init__(ClipModel(folder, dtype=dtype), **kwargs)

    def from_pixels(self, pixels: Tensor, prompts: Sequence[str]) -> Tensor:
        return cosine(self.clip.image_features(pixels), self.clip.text_features(prompts, pixels.device))


@REWARDS.register("aesthetic")
class Aesthetic(_ClipReward):
    """``MLP(f_img / |f_img|)``: the LAION improved aesthetic predictor on OpenAI CLIP ViT-L/14
    (AVA's 1-10 scale; prompts are ignored)."""

    name = "aesthetic"
    weights = (CLIP_L14, AESTHETIC_MLP)
    info = RewardInfo(
        version="sac+logos+ava1-l14-linearMSE",
        higher_is_better=True,
        differentiable=True,
        units="AVA score, 1-10",
    )

    def __init__(self, weights_dir: str | Path | None = None, dtype: str = "float32", **kwargs) -> None:
        clip_dir, mlp_dir = resolve_all(self.name, self.weights, weights_dir)
        super().__init__(ClipModel(clip_dir, dtype=dtype), **kwargs)
        mlp = aesthetic_mlp()
        state = torch.load(mlp_dir / self.weights[1].names[0], map_location="cpu", weights_only=True)
        mlp.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()}, strict=True)
        self.mlp = OnDevice(mlp)  # float32 like the reference (which runs the MLP in fp32)

    def from_pixels(self, pixels: Tensor, prompts: Sequence[str]) -> Tensor:
        features = nn.functional.normalize(self.clip.image_features(pixels), dim=-1)
        return self.mlp.on(pixels.device)(features).squeeze(-1)

    @torch.no_grad()
    def reference(self, images, prompts: Sequence[str], device: torch.device | str = "cpu") -> Tensor:
        """OpenAI CLIP's ``preprocess`` (torchvision on PIL), as ``simple_inference.py``."""
        return self.from_pixels(clip_reference(images, self.clip.image_size).to(device), prompts)


@REWARDS.register("pickscore")
class PickScore(_ClipReward):
    """``exp(logit_scale) cos(f_img, f_txt)`` under PickScore_v1, the pre-softmax score of its
    model card (published tables report these units); ``scale="div26"`` divides by 26."""

    name = "pickscore"
    weights = (PICKSCORE_V1, CLIP_H14_PROCESSOR)
    info = RewardInfo(
        version="yuvalkirstain/PickScore_v1",
        higher_is_better=True,
        differentiable=True,
        units="exp(logit_scale) x cosine (published units)",
    )

    def __init__(
        self,
        weights_dir: str | Path | None = None,
        dtype: str = "float32",
        scale: Literal["raw", "div26"] = "raw",
        **kwargs,
    ) -> None:
        if scale not in ("raw", "div26"):
            raise ValueError(f"pickscore scale must be 'raw' or 'div26', got {scale!r}")
        model_dir, processor_dir = resolve_all(self.name, self.weights, weights_dir)
        super().__init__(ClipModel(model_dir, processor_dir, dtype=dtype), **kwargs)
        self.divisor = PICKSCORE_DIVISOR if scale == "div26" else 1.0

    def from_pixels(self, pixels: Tensor, prompts: Sequence[str]) -> Tensor:
        logit_scale = self.clip.net.on(pixels.device).logit_scale.float().exp()
        cos = cosine(self.clip.image_features(pixels), self.clip.text_features(prompts, pixels.device))
        return logit_scale * cos / self.divisor
