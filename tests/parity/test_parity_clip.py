"""Parity of the CLIP-family rewards with their reference code (``tox -e parity-clip``).

Random weights, saved once and loaded by both sides; no downloads. Each test prints the maximum
absolute difference (run with ``-s`` to see it) and asserts it is at most 1e-5 (fp32, reference
path):

* ``clipscore`` x 100 against torchmetrics' ``clip_score`` (its per-image ``100 cos`` before the
  clamp at 0 and the mean);
* ``aesthetic`` against ``simple_inference.py``'s recipe: OpenAI's ``clip`` package (its own model
  class, QuickGELU, its ``preprocess``), L2 normalisation in numpy, the MLP in fp32;
* ``pickscore`` against the PickScore_v1 model card's code through transformers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rtdmd.rewards import clip as clip_rewards
from rtdmd.testing import save_tiny_clip
from rtdmd.weights import WeightFiles

pytestmark = pytest.mark.parity

PROMPTS = ["a photo of a cat", "a red cube on a table", "two dogs playing in the snow", "an astronaut"]
CLIP_DIR = "openai/clip-vit-large-patch14"


def _images(size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _pil_processor(folder):
    """The model's processor with the PIL image backend: the preprocessing of the reference code's
    era (transformers 5 defaults to a torchvision backend whose resampling differs slightly)."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPProcessor

    return CLIPProcessor(
        image_processor=CLIPImageProcessorPil.from_pretrained(folder), tokenizer=AutoTokenizer.from_pretrained(folder)
    )


def _report(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    diff = float((ours.double() - theirs.double()).abs().max())
    print(f"\nPARITY {name}: max |ours - reference| = {diff:.3e} over {ours.numel()} scores")
    return diff


class _FeaturesAsTensors(torch.nn.Module):
    """torchmetrics 1.9 expects ``get_*_features`` to return tensors, as transformers 4 did;
    transformers 5 returns an output whose ``pooler_output`` is that tensor."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


def test_clipscore_is_torchmetrics_clip_score_over_100(tmp_path):
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from transformers import CLIPModel

    save_tiny_clip(tmp_path / CLIP_DIR, seed=3, logit_scale=math.log(100))
    x = _images(200)
    uint8 = (x * 255).round().to(torch.uint8)
    model = _FeaturesAsTensors(CLIPModel.from_pretrained(tmp_path / CLIP_DIR).eval())
    with torch.no_grad():
        theirs, _ = _clip_score_update(list(uint8), PROMPTS, model, _pil_processor(tmp_path / CLIP_DIR))
    ours = 100 * clip_rewards.ClipScore(tmp_path).reference(uint8.permute(0, 2, 3, 1), PROMPTS)
    assert _report("clipscore x100 vs torchmetrics", ours, theirs) <= 1e-5 * 100


def _openai_to_hf_vision(visual: torch.nn.Module, hf_model) -> None:
    """Copy an OpenAI ``clip`` ViT's weights into a transformers ``CLIPModel``'s vision tower."""
    vision = hf_model.vision_model
    with torch.no_grad():
        vision.embeddings.patch_embedding.weight.copy_(visual.conv1.weight)
        vision.embeddings.class_embedding.copy_(visual.class_embedding)
        vision.embeddings.position_embedding.weight.copy_(visual.positional_embedding)
        vision.pre_layrnorm.load_state_dict(visual.ln_pre.state_dict())
        vision.post_layernorm.load_state_dict(visual.ln_post.state_dict())
        hf_model.visual_projection.weight.copy_(visual.proj.T)
        for ours, theirs in zip(vision.encoder.layers, visual.transformer.resblocks, strict=True):
            q, k, v = theirs.attn.in_proj_weight.chunk(3)
            qb, kb, vb = theirs.attn.in_proj_bias.chunk(3)
            for proj, w, b in (
                (ours.self_attn.q_proj, q, qb),
                (ours.self_attn.k_proj, k, kb),
                (ours.self_attn.v_proj, v, vb),
            ):
                proj.weight.copy_(w)
                proj.bias.copy_(b)
            ours.self_attn.out_proj.load_state_dict(theirs.attn.out_proj.state_dict())
            ours.layer_norm1.load_state_dict(theirs.ln_1.state_dict())
            ours.layer_norm2.load_state_dict(theirs.ln_2.state_dict())
            ours.mlp.fc1.load_state_dict(theirs.mlp.c_fc.state_dict())
            ours.mlp.fc2.load_state_dict(theirs.mlp.c_proj.state_dict())


def test_aesthetic_is_the_predictors_simple_inference_recipe(tmp_path, monkeypatch):
    import clip  # OpenAI's package (PyPI openai-clip): the reference's model class and preprocess
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    reference_clip = clip.model.CLIP(
        embed_dim=768,
        image_resolution=224,
        vision_layers=2,
        vision_width=64,
        vision_patch_size=32,
        context_length=77,
        vocab_size=49408,
        transformer_width=64,
        transformer_heads=2,
        transformer_layers=1,
    ).eval()
    save_tiny_clip(tmp_path / CLIP_DIR, projection_dim=768)  # tokenizer, image processor, a text tower
    config = CLIPConfig.from_pretrained(tmp_path / CLIP_DIR)
    # the vision tower at the reference's sizes (OpenAI CLIP: heads = width // 64, MLP 4x, QuickGELU)
    config.vision_config.update({"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 1})
    hf = CLIPModel(config).eval()
    _openai_to_hf_vision(reference_clip.visual, hf)
    hf.save_pretrained(tmp_path / CLIP_DIR)

    mlp = clip_rewards.aesthetic_mlp().eval()
    (tmp_path / "urls").mkdir()
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, tmp_path / "urls" / "mlp.pth")
    monkeypatch.setattr(
        clip_rewards.Aesthetic, "weights", (clip_rewards.CLIP_L14, WeightFiles(url="https://example.invalid/mlp.pth"))
    )

    x = _images(300, seed=1)
    pil = clip_rewards.to_pil(x)
    preprocess = clip.clip._transform(224)
    with torch.no_grad():
        features = reference_clip.encode_image(torch.stack([preprocess(image) for image in pil])).numpy()
        normalised = features / np.linalg.norm(features, axis=-1, keepdims=True)  # as simple_inference.py
        theirs = mlp(torch.from_numpy(normalised).float()).squeeze(-1)
    ours = clip_rewards.Aesthetic(tmp_path).reference(pil, PROMPTS)
    assert _report("aesthetic vs simple_inference.py", ours, theirs) <= 1e-5


def test_pickscore_is_the_model_cards_recipe(tmp_path):
    from transformers import AutoModel

    model_dir, processor_dir = (
        tmp_path / "yuvalkirstain/PickScore_v1",
        tmp_path / "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    )
    save_tiny_clip(model_dir, processor_dir, seed=4, logit_scale=4.6)
    x = _images(256, seed=2)
    pil = clip_rewards.to_pil(x)
    processor, model = _pil_processor(processor_dir), AutoModel.from_pretrained(model_dir).eval()
    theirs = []
    with torch.no_grad():  # the model card's calc_probs, one prompt against its image, pre-softmax
        for prompt, image in zip(PROMPTS, pil, strict=True):
            image_inputs = processor(images=[image], padding=True, truncation=True, max_length=77, return_tensors="pt")
            text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
            image_embs = model.get_image_features(**image_inputs).pooler_output
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = model.get_text_features(**text_inputs).pooler_output
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            theirs.append((model.logit_scale.exp() * (text_embs @ image_embs.T))[0, 0])
    ours = clip_rewards.PickScore(tmp_path).reference(pil, PROMPTS)
    assert _report("pickscore vs model card", ours, torch.stack(theirs)) <= 1e-5 * 100
