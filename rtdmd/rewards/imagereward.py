"""ImageReward v1.0 (Xu et al. 2023; ``THUDM/ImageReward``, PyPI ``image-reward==1.5``), metrics.md §6.

The network is BLIP's image-grounded text encoder with a linear head:

* vision: BLIP ViT-L/16 at 224 (24 blocks, width 1024, 16 heads, LayerNorm eps 1e-6) ->
  ``E`` = all 197 normalised tokens ``[B, 197, 1024]``; here ``timm``'s ``VisionTransformer``,
  whose parameter names are BLIP's (``blip.visual_encoder.*``);
* text: BERT-base (12 layers, width 768) whose every layer cross-attends to ``E`` with no image
  mask, run as an *encoder* (bidirectional self-attention); here ``transformers.BlipTextModel``,
  the maintained port of BLIP's ``med.py`` with the same parameter names (``blip.text_encoder.*``;
  no token-type embeddings, cross-attention keys/values read 1024-wide image tokens);
* head: ``h`` = last hidden state at position 0 ([CLS]); ``MLP`` = 768 -> 1024 -> 128 -> 64 -> 16
  -> 1 with dropouts and no activations (an affine map in eval mode), ``mlp.layers.{0,2,4,6,7}``;

    r = (MLP(h) - 0.16717362830052426) / 1.0333394966054072

Text: ``bert-base-uncased`` WordPiece with BLIP's added ``[DEC]`` (bos) and ``[ENC]`` tokens
(vocabulary 30524), ``padding="max_length", truncation=True, max_length=35``: prompts longer than
33 word pieces are cut. The first token stays ``[CLS]``: ``ImageReward.score`` / ``inference_rank``
/ ``score_gard`` pass the tokenizer's ids unchanged (BLIP's ITM head swaps in ``[ENC]``; ImageReward
does not, in v1.5 and in its training code).

Two paths share the network (:func:`standardised_reward`):

* ``__call__``: float images ``[B, 3, H, W]`` in [0, 1], batched and differentiable: bicubic
  antialiased resize of the shortest side to 224, centre crop, OpenAI normalisation, on tensors;
* ``reference``: the official preprocessing (PIL ``Resize(224, bicubic)`` -> ``CenterCrop(224)``
  -> ``ToTensor`` -> ``Normalize``) on the uint8 images, one prompt per image. It equals
  ``ImageReward.score(prompt_i, image_i)`` per pair, not ``inference_rank(prompts, images)``, which
  would score every image against every prompt (the B x B pitfall of metrics.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rtdmd.rewards.base import DTYPES, REWARDS, OnDevice, RewardInfo
from rtdmd.rewards.heads import linear_head
from rtdmd.rewards.preprocess import clip_reference, clip_tensor
from rtdmd.weights import WeightFiles, resolve_all

REWARD_MEAN = 0.16717362830052426  # ImageReward.mean: raw head output on the authors' benchmark set
REWARD_STD = 1.0333394966054072  # ImageReward.std
MAX_TOKENS = 35  # the tokenizer's max_length in ImageReward.score
IMAGE_SIZE_PX = 224  # BLIP_Pretrain(image_size=224) and _transform(224)
VIT_HEAD_WIDTH = 64  # both BLIP ViTs: base 768 / 12 heads, large 1024 / 16; the checkpoint has no head count
VIT_LAYER_NORM_EPS = 1e-6  # BLIP's VisionTransformer: partial(nn.LayerNorm, eps=1e-6)
CHECKPOINT = "ImageReward.pt"
MED_CONFIG = "med_config.json"

MODEL_FILES = WeightFiles(repo="THUDM/ImageReward", files=(CHECKPOINT, MED_CONFIG))
# BertTokenizer.from_pretrained reads vocab.txt and tokenizer_config.json (do_lower_case); the
# repository's tokenizer.json is the same WordPiece model, rebuilt here from vocab.txt
TOKENIZER_FILES = WeightFiles(repo="bert-base-uncased", files=("vocab.txt", "tokenizer_config.json"))

# the parts of ImageReward.pt that scoring reads; the file also holds BLIP_Pretrain's contrastive
# projections (blip.vision_proj, blip.text_proj), unused by ImageReward.score
USED_PREFIXES = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.")
# med.py registers position ids (an arange) as a persistent buffer; BlipTextModel's is not persistent
POSITION_IDS = "blip.text_encoder.embeddings.position_ids"


@dataclass(frozen=True)
class VitShape:
    """A BLIP ViT: ``image_px`` square input, ``patch_px`` patches, ``depth`` blocks of ``width``
    channels, ``heads`` heads and a ``mlp_width`` hidden MLP layer."""

    image_px: int = IMAGE_SIZE_PX
    patch_px: int = 16
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_width: int = 4096


VIT_L16 = VitShape()  # create_vit("large", 224): what ImageReward.pt holds


def vit_shape(state: dict[str, Tensor], prefix: str = "blip.visual_encoder.") -> VitShape:
    """The ViT a state dict holds: width from ``cls_token``, patch from the patch conv, image side
    ``sqrt(tokens - 1) * patch`` from ``pos_embed``, depth from the block count, heads =
    ``width / 64``."""
    width = state[prefix + "cls_token"].shape[-1]
    patch_px = state[prefix + "patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state[prefix + "pos_embed"].shape[1] - 1)
    blocks = {key[len(prefix) :].split(".")[1] for key in state if key.startswith(prefix + "blocks.")}
    return VitShape(
        image_px=grid * patch_px,
        patch_px=patch_px,
        width=width,
        depth=len(blocks),
        heads=width // VIT_HEAD_WIDTH,
        mlp_width=state[prefix + "blocks.0.mlp.fc1.weight"].shape[0],
    )


def vision_transformer(shape: VitShape) -> nn.Module:
    """BLIP's ``VisionTransformer`` as timm's: class token, learned position embedding added to all
    tokens, pre-norm blocks with qkv bias and exact GELU, final LayerNorm, no pooling and no head,
    so ``forward_features`` returns every token ``[B, 1 + (image/patch)^2, width]``."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=shape.image_px,
        patch_size=shape.patch_px,
        embed_dim=shape.width,
        depth=shape.depth,
        num_heads=shape.heads,
        mlp_ratio=shape.mlp_width / shape.width,
        qkv_bias=True,
        class_token=True,
        global_pool="",
        num_classes=0,
        norm_layer=partial(nn.LayerNorm, eps=VIT_LAYER_NORM_EPS),
    )


def text_config(med_config: dict[str, Any], vision_width: int):
    """``BlipTextConfig`` from BLIP's ``med_config.json`` (a ``BertConfig``); cross-attention
    keys and values read ``vision_width``-wide tokens, as ``BLIP_Pretrain`` sets
    ``encoder_width = vision_width`` over the file's value."""
    from transformers import BlipTextConfig

    if not med_config.get("add_cross_attention"):
        raise ValueError(f"{MED_CONFIG}: ImageReward's text encoder needs add_cross_attention=true")
    if med_config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{MED_CONFIG}: only absolute position embeddings are supported")
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
        "layer_norm_eps",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "pad_token_id",
    )
    return BlipTextConfig(
        **{key: med_config[key] for key in keys},
        encoder_hidden_size=vision_width,
        bos_token_id=None,  # generation-only ids of BlipTextConfig's defaults; the encoder never reads them
        eos_token_id=None,
        sep_token_id=None,
        is_decoder=True,  # builds the cross-attention layers; forward runs as an encoder (is_decoder=False)
        attn_implementation="eager",  # the BLIP attention adds an additive float mask, as med.py
    )


class ImageRewardNet(nn.Module):
    """The scoring network with ``ImageReward``'s module tree, so that ``state_dict`` keys are those
    of ``ImageReward.pt``: ``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``."""

    def __init__(self, med_config: dict[str, Any], vision: VitShape = VIT_L16) -> None:
        super().__init__()
        from transformers import BlipTextModel

        self.blip = nn.Module()
        self.blip.visual_encoder = vision_transformer(vision)
        self.blip.text_encoder = BlipTextModel(text_config(med_config, vision.width), add_pooling_layer=False)
        self.mlp = nn.Module()
        self.mlp.layers = linear_head(med_config["hidden_size"])
        self.image_px = vision.image_px

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return standardised_reward(self, pixels, input_ids, attention_mask)


def standardised_reward(net: ImageRewardNet, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``(MLP(h) - mean) / std`` ``[B]`` for normalised pixels ``[B, 3, 224, 224]`` and token ids
    ``[B, 35]``, ``h`` = the text encoder's last hidden state at [CLS] when every layer
    cross-attends to all image tokens (``ImageReward.score_gard``, one prompt per image)."""
    image_tokens = net.blip.visual_encoder.forward_features(pixels)
    # no encoder mask: the reference's all-ones image mask adds 0 to every cross-attention logit
    hidden = net.blip.text_encoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        encoder_hidden_states=image_tokens,
        is_decoder=False,
        return_dict=True,
    ).last_hidden_state
    raw = net.mlp.layers(hidden[:, 0, :])
    return ((raw - REWARD_MEAN) / REWARD_STD).squeeze(-1)


def load_net(folder: Path) -> ImageRewardNet:
    """``ImageReward.pt`` + ``med_config.json`` -> the network (fp32, CPU). Like the reference's
    ``load_state_dict(strict=False)``, keys outside the scoring network are ignored; unlike it, every
    parameter of the scoring network must be in the file (the reference would silently leave a
    missing one at its random initialisation)."""
    med_config = json.loads((folder / MED_CONFIG).read_text())
    state = torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=True)
    state = {key: value for key, value in state.items() if key.startswith(USED_PREFIXES) and key != POSITION_IDS}
    net = ImageRewardNet(med_config, vit_shape(state))
    net.load_state_dict(state, strict=True)
    return net


def load_tokenizer(folder: Path):
    """``bert-base-uncased`` WordPiece plus BLIP's ``init_tokenizer`` additions: ``[DEC]`` as bos
    and ``[ENC]`` as an additional special token (ids 30522 and 30523 in the real vocabulary)."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(folder))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


@REWARDS.register("imagereward")
class ImageReward:
    """ImageReward v1.0: ``(MLP(h_CLS) - 0.16717362830052426) / 1.0333394966054072`` (see module docstring)."""

    name = "imagereward"
    weights = (MODEL_FILES, TOKENIZER_FILES)
    info = RewardInfo(
        version="v1.0",
        higher_is_better=True,
        differentiable=True,
        units="standardised reward (ImageReward v1.0)",
    )

    def __init__(self, weights_dir: str | Path | None = None, dtype: str = "float32") -> None:
        model_dir, tokenizer_dir = resolve_all(self.name, self.weights, weights_dir)
        net = load_net(model_dir)
        self.tokenizer = load_tokenizer(tokenizer_dir)
        vocab_size = net.blip.text_encoder.config.vocab_size
        if len(self.tokenizer) != vocab_size:
            raise ValueError(f"tokenizer has {len(self.tokenizer)} tokens, {MED_CONFIG} says vocab_size {vocab_size}")
        self.image_px = net.image_px
        self.net = OnDevice(net, DTYPES[dtype])

    def tokens(self, prompts: Sequence[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask ``[B, 35]``, as ``ImageReward.score`` tokenises one prompt."""
        batch = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
        return batch.input_ids.to(device), batch.attention_mask.to(device)

    def from_pixels(self, pixels: Tensor, prompts: Sequence[str]) -> Tensor:
        """Rewards ``[B]`` (float32) of normalised pixels ``[B, 3, 224, 224]``, prompt i with image i."""
        if len(pixels) != len(prompts):
            raise ValueError(f"{len(pixels)} images and {len(prompts)} prompts")
        net = self.net.on(pixels.device)
        input_ids, attention_mask = self.tokens(prompts, pixels.device)
        return standardised_reward(net, pixels.to(self.net.dtype), input_ids, attention_mask).float()

    def __call__(self, images: Tensor, prompts: Sequence[str], meta: Sequence[dict[str, Any]] = ()) -> Tensor:
        return self.from_pixels(clip_tensor(images, self.image_px, "bicubic"), prompts)

    @torch.no_grad()
    def reference(self, images, prompts: Sequence[str], device: torch.device | str = "cpu") -> Tensor:
        """The official path: float ``[B, 3, H, W]`` in [0, 1] (rounded to uint8 as a PNG), uint8
        ``[B, H, W, 3]`` or PIL images through ``ImageReward``'s PIL transform."""
        return self.from_pixels(clip_reference(images, self.image_px).to(device), prompts)


__all__ = [
    "MODEL_FILES",
    "REWARD_MEAN",
    "REWARD_STD",
    "TOKENIZER_FILES",
    "VIT_L16",
    "ImageReward",
    "ImageRewardNet",
    "VitShape",
    "load_net",
    "load_tokenizer",
    "standardised_reward",
    "vit_shape",
]
