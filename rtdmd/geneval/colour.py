"""GenEval's colour classifier: zero-shot CLIP over the 10 colour names (metrics.md §8.5).

The official ``evaluate_images.py`` builds, per object class, a zero-shot head with clip-benchmark's
``zero_shot_classifier`` from three templates, and classifies each object crop with
``run_classification``:

* head: for each colour ``c``, ``w_c = normalize(mean_t normalize(E_txt(template_t(c, cls))))``, the
  columns of ``W [D, 10]``;
* crop: ``p = argmax_c 100 * normalize(E_img(preprocess(crop))) @ W`` (batches of 16 crops);
* the model is OpenAI CLIP ViT-L/14 **with QuickGELU** (open_clip ``ViT-L-14-quickgelu``): open_clip
  >= 2.29 builds plain GELU for ``ViT-L-14`` + ``openai`` and only warns, which changes the features;
* both steps run under ``torch.cuda.amp.autocast`` (clip-benchmark's ``amp=True`` default): fp16 on a
  GPU, no effect on a CPU. ``amp=False`` gives fp32 everywhere.

Crops come from :func:`rtdmd.geneval.judge.crop_for_color` (the object over grey #999 through its
mask, cropped to its box), called by the judge.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from rtdmd.distributed import resolve_device
from rtdmd.geneval.judge import COLORS
from rtdmd.weights import WeightFiles, resolve

ARCH = "ViT-L-14-quickgelu"
# open_clip 3.3's pretrained cfg for ViT-L-14(-quickgelu)/openai is hf_hub "timm/vit_large_patch14_clip_224.openai/";
# it loads the safetensors file of that repository first (open_clip.pretrained.download_pretrained_from_hf)
CLIP_L14_OPENAI = WeightFiles(repo="timm/vit_large_patch14_clip_224.openai", files=("open_clip_model.safetensors",))
TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
LOGIT_SCALE = 100.0  # clip-benchmark's fixed zero-shot temperature, not the model's logit_scale
BATCH_SIZE = 16  # crops per forward, as the official DataLoader (fp16 results depend on the batch)


def color_prompts(classname: str, colors: Sequence[str] = COLORS) -> list[list[str]]:
    """Per colour, the three official texts for objects of ``classname``."""
    return [[t.format(c=c, cls=classname) for t in TEMPLATES] for c in colors]


def uses_quick_gelu(model: nn.Module) -> bool:
    """True when every activation of the transformer MLPs is QuickGELU ``x * sigmoid(1.702 x)``."""
    from open_clip.transformer import QuickGELU

    acts = [m for m in model.modules() if isinstance(m, (nn.GELU, QuickGELU))]
    return bool(acts) and all(isinstance(m, QuickGELU) for m in acts)


def autocast(device: torch.device, amp: bool):
    """``torch.cuda.amp.autocast()`` as clip-benchmark: fp16 for CUDA ops, nothing for CPU ones."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def val_preprocess(model: nn.Module):
    """open_clip's validation transform for ``model`` (``create_model_and_transforms``' third output):
    bicubic resize of the shortest side, centre crop, RGB, ``ToTensor``, OpenAI normalisation."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = getattr(model.visual, "preprocess_cfg", None) or {"size": model.visual.image_size}
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


class ClipColorClassifier:
    """``(crops, classname) -> colour names``, the ``ColorClassifier`` that ``judge`` calls.

    ``model`` an open_clip CLIP with QuickGELU; ``tokenizer`` open_clip's (``SimpleTokenizer``);
    ``preprocess`` defaults to :func:`val_preprocess`. Heads are cached per class name."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        preprocess=None,
        device: str | torch.device = "cpu",
        amp: bool = True,
        colors: Sequence[str] = COLORS,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        if not uses_quick_gelu(model):
            raise ValueError("GenEval's colour CLIP is OpenAI ViT-L/14 with QuickGELU; this model uses GELU")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess = preprocess or val_preprocess(model)
        self.amp = amp
        self.colors = tuple(colors)
        self.batch_size = batch_size
        self._heads: dict[str, Tensor] = {}

    @classmethod
    def from_weights(
        cls, weights_dir: str | Path | None = None, device: str | torch.device | None = None, amp: bool = True
    ) -> ClipColorClassifier:
        """OpenAI ViT-L/14 (QuickGELU) from :data:`CLIP_L14_OPENAI`, found by :func:`resolve`."""
        import open_clip

        folder = resolve("geneval", CLIP_L14_OPENAI, weights_dir)
        model, _, preprocess = open_clip.create_model_and_transforms(
            ARCH, pretrained=str(folder / CLIP_L14_OPENAI.files[0])
        )
        device = device or resolve_device("auto")
        return cls(model, open_clip.get_tokenizer(ARCH), preprocess, device=device, amp=amp)

    @torch.no_grad()
    def head(self, classname: str) -> Tensor:
        """``W [D, n_colours]``: per colour the normalised mean of the normalised text embeddings."""
        if classname not in self._heads:
            columns = []
            with autocast(self.device, self.amp):
                for texts in color_prompts(classname, self.colors):
                    embedded = self.model.encode_text(self.tokenizer(texts).to(self.device))
                    column = nn.functional.normalize(embedded, dim=-1).mean(dim=0)
                    column /= column.norm()
                    columns.append(column)
                self._heads[classname] = torch.stack(columns, dim=1)
        return self._heads[classname]

    @torch.no_grad()
    def logits(self, crops: Sequence, classname: str) -> Tensor:
        """``100 * normalize(E_img(crop)) @ W`` ``[N, n_colours]`` (float32), in batches of ``batch_size``."""
        weights = self.head(classname)
        out = []
        for start in range(0, len(crops), self.batch_size):
            pixels = torch.stack([self.preprocess(c) for c in crops[start : start + self.batch_size]])
            with autocast(self.device, self.amp):
                features = nn.functional.normalize(self.model.encode_image(pixels.to(self.device)), dim=-1)
                out.append((LOGIT_SCALE * features @ weights).float().cpu())
        return torch.cat(out) if out else torch.empty(0, len(self.colors))

    def __call__(self, crops: Sequence, classname: str) -> list[str]:
        return [self.colors[i] for i in self.logits(crops, classname).argmax(1).tolist()]

    @torch.no_grad()
    def logits_many(self, requests: Sequence[tuple[Sequence, str]]) -> list[Tensor]:
        """Many ``(crops, classname)`` calls at once: every crop through the image encoder in batches of
        ``batch_size`` regardless of which call it came from, then each call's crops against its class's
        head. The same logits as one :meth:`logits` call each in float32; under fp16 autocast a row's
        rounding can depend on the batch it shared (the official script batches one image's crops)."""
        crops = [c for request_crops, _ in requests for c in request_crops]
        features = []
        for start in range(0, len(crops), self.batch_size):
            pixels = torch.stack([self.preprocess(c) for c in crops[start : start + self.batch_size]])
            with autocast(self.device, self.amp):
                features.append(nn.functional.normalize(self.model.encode_image(pixels.to(self.device)), dim=-1))
        rows = torch.cat(features).split([len(c) for c, _ in requests]) if features else [None] * len(requests)
        out = []
        for part, (_, classname) in zip(rows, requests, strict=True):
            if part is None or not len(part):
                out.append(torch.empty(0, len(self.colors)))
                continue
            with autocast(self.device, self.amp):
                out.append((LOGIT_SCALE * part @ self.head(classname)).float().cpu())
        return out

    def classify_many(self, requests: Sequence[tuple[Sequence, str]]) -> list[list[str]]:
        """:meth:`logits_many` -> the colour names of each call."""
        return [[self.colors[i] for i in logits.argmax(1).tolist()] for logits in self.logits_many(requests)]
