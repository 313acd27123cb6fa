"""``toy``: the toy world's text-to-image teacher (trained by ``rtdmd-train pretrain --config toy``).

The same moving parts as SD3, at toy size:

* transformer: ``SD3Transformer2DModel`` (the real class: joint attention, adaLN, 1000-sigma time
  input, velocity output ``eps - x0``), sized by :class:`ToySpec`;
* text: the world's closed vocabulary (:mod:`rtdmd.toyworld.text`) -> word embeddings + positions
  -> a small pre-norm transformer encoder -> ``[B, 16, text_dim]`` and a pooled vector (masked mean,
  then a linear map); the empty prompt (all padding) is the CFG negative, learnt by caption dropout;
* latent: the 64x64 image itself, 4x4 pixel-unshuffled (``[B, 48, 16, 16]``), as in ``tiny``;
* output: the network predicts the clean latent ``x0`` and the adapter returns the velocity
  ``v = (x - x0_hat) / sigma`` (the contract's convention). Pixel-space tokens of 8x8x3 = 192 values
  are as wide as the network; predicting ``eps - x0`` there left per-token colour casts in samples,
  while ``x0`` lies on a low-dimensional manifold the network can reach (Li & He 2025, "Back to
  Basics: Let Denoising Generative Models Denoise"). Every sampler and loss sees only velocities.

Weights: the shipped ``toy_teacher`` checkpoint (sha256-verified) or a ``.safetensors`` file written by
:func:`save_toy`; its metadata holds the :class:`ToySpec`, so a checkpoint rebuilds itself.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from rtdmd.backbones.base import (
    BACKBONES,
    TORCH_DTYPES,
    BackboneConfig,
    Cond,
    check_resolution,
    guided_velocity,
    truncation_note,
)
from rtdmd.backbones.sd3 import sd3_forward
from rtdmd.backbones.tiny import PIXELS_PER_CELL, TinyBackbone
from rtdmd.checkpoint import load_tensors, save_tensors
from rtdmd.config import from_dict
from rtdmd.flow.path import expand_sigma
from rtdmd.flow.schedules import TimeShift
from rtdmd.toyworld.text import MAX_WORDS, PAD, VOCAB_SIZE, token_ids, unknown_words, words
from rtdmd.weights import packaged

SHIPPED = "toy_teacher"


@dataclass(frozen=True)
class ToySpec:
    """Sizes of the toy teacher (stored in every checkpoint)."""

    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 64
    text_dim: int = 128
    text_layers: int = 3
    text_heads: int = 4
    sample_size: int = 16  # latent cells of a 64x64 image
    patch_size: int = 2
    shift: float = 1.0  # static time shift k of training and sampling: sigma = k u / (1 + (k - 1) u)

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


class ToyTextEncoder(nn.Module):
    """Word ids -> ``([B, MAX_WORDS, text_dim]`` hidden states, ``[B, text_dim]`` pooled)."""

    def __init__(self, spec: ToySpec) -> None:
        super().__init__()
        d = spec.text_dim
        self.embed = nn.Embedding(VOCAB_SIZE, d)
        self.position = nn.Parameter(torch.randn(MAX_WORDS, d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d, spec.text_heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        # no padding mask: the empty prompt is all padding, and masking every key would give NaNs
        self.encoder = nn.TransformerEncoder(layer, spec.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.pool = nn.Linear(d, d)

    def forward_ids(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.norm(self.encoder(self.embed(ids) + self.position))
        keep = (ids != PAD).unsqueeze(-1).to(hidden.dtype)
        pooled = self.pool((hidden * keep).sum(1) / keep.sum(1).clamp(min=1))
        return hidden, pooled

    def forward(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        if unknown := unknown_words(prompts):  # read as one "unknown" token: conditioning is lost
            warnings.warn(f"the toy teacher does not know the words {unknown[:8]}", stacklevel=2)
        return self.forward_ids(token_ids(prompts).to(self.position.device))


def toy_transformer(spec: ToySpec):
    from diffusers import SD3Transformer2DModel

    channels = 3 * PIXELS_PER_CELL**2
    return SD3Transformer2DModel(
        sample_size=spec.sample_size,
        patch_size=spec.patch_size,
        in_channels=channels,
        out_channels=channels,
        num_layers=spec.num_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.text_dim,
        caption_projection_dim=spec.width,
        pooled_projection_dim=spec.text_dim,
        pos_embed_max_size=2 * spec.sample_size // spec.patch_size,  # up to 128x128 images
    )


def build_toy(spec: ToySpec, seed: int = 0) -> tuple[nn.Module, ToyTextEncoder]:
    """Randomly initialised transformer and text encoder (float32, CPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return toy_transformer(spec), ToyTextEncoder(spec)


def save_toy(
    path: str | Path, transformer: nn.Module, text_encoder: nn.Module, spec: ToySpec, dtype=torch.float16, **meta: str
) -> Path:
    """One safetensors file: ``transformer.*`` and ``text_encoder.*`` in ``dtype``, the spec in metadata."""

    tensors = {f"transformer.{k}": v.to(dtype) for k, v in transformer.state_dict().items()}
    tensors |= {f"text_encoder.{k}": v.to(dtype) for k, v in text_encoder.state_dict().items()}
    return save_tensors(tensors, path, metadata={"spec": json.dumps(asdict(spec)), **meta})


def load_toy(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """``(transformer, text_encoder, spec)`` from a :func:`save_toy` file, in eval mode."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if "spec" not in meta:
        raise ValueError(f"{path} is not a toy checkpoint (no `spec` metadata; write one with save_toy)")
    spec = from_dict(ToySpec, json.loads(meta["spec"]))
    tensors = load_tensors(path)
    transformer, text_encoder = build_toy(spec)
    for prefix, module in (("transformer.", transformer), ("text_encoder.", text_encoder)):
        state = {k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(state, strict=True)
    if dtype != torch.float32:  # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast
        transformer, text_encoder = nn.Module.to(transformer, dtype=dtype), text_encoder.to(dtype=dtype)
    return transformer.to(device).eval(), text_encoder.to(device).eval(), spec


def toy_forward(
    net: nn.Module, x: Tensor, sigma: Tensor, tensors: dict[str, Tensor], guidance: float | None = None
) -> Tensor:
    """``v = (x - x0_hat(x, sigma, c)) / sigma`` (float32, or float64 for a float64 network) from the
    x0-predicting transformer, and ``v = x - x0_hat`` at ``sigma = 0`` (e.g. AC-DMD's consistency
    rollback to 0), where every caller recovers ``x0 = x - 0 * v = x`` and a division by zero would give NaN."""
    x0_hat = sd3_forward(net, x, sigma, tensors, guidance)
    dtype = torch.promote_types(x0_hat.dtype, torch.float32)
    sigma = sigma.to(dtype)
    return (x.to(dtype) - x0_hat.to(dtype)) / expand_sigma(torch.where(sigma > 0, sigma, torch.ones_like(sigma)), x)


@BACKBONES.register("toy")
class ToyBackbone(TinyBackbone):
    """The trained toy teacher; ``backbone.source``: empty (the shipped teacher) or a checkpoint path."""

    name = "toy"

    def __init__(self, transformer: nn.Module, text_encoder: nn.Module, spec: ToySpec | None = None) -> None:
        super().__init__(transformer, text_encoder)
        # the shift the checkpoint was trained with (its spec) is the one it samples with
        self.time_shift = TimeShift(mu_rule="none", shift=(spec or ToySpec()).shift)

    @classmethod
    def build(cls, *args, **kwargs) -> ToyBackbone:
        raise TypeError("the toy backbone is trained, not built from a seed: use from_config or load_toy")

    @classmethod
    def from_config(cls, cfg: BackboneConfig, device: torch.device) -> ToyBackbone:

        path = Path(cfg.source) if cfg.source else packaged(SHIPPED)
        if not path.is_file():
            raise FileNotFoundError(
                f"toy checkpoint {path} does not exist (train one: rtdmd-train pretrain --config toy)"
            )
        transformer, text_encoder, spec = load_toy(path, device, TORCH_DTYPES[cfg.dtype])
        return cls(transformer, text_encoder, spec)

    def schedule(self, num_steps: int, height: int, width: int, timesteps: Sequence[float] | None = None) -> Tensor:
        """This checkpoint's shift (static: the token count does not enter)."""
        check_resolution(height, width, PIXELS_PER_CELL * 2, self.name)
        return self.time_shift.sigmas(timesteps or self.default_timesteps(num_steps), 0)

    def truncation_notes(self, prompts: Sequence[str]) -> list[str]:
        note = truncation_note("the toy word encoder", [len(words(p)) for p in prompts], MAX_WORDS)
        return [note] if note else []

    def velocity(self, net: nn.Module, x: Tensor, sigma: float | Tensor, cond: Cond, guidance: float = 1.0) -> Tensor:
        return guided_velocity(partial(toy_forward, net), x, sigma, cond, guidance)
