"""``tiny``: a random-weight, SD3-shaped backbone for tests and smoke runs (no files, no downloads).

* transformer: a small ``SD3Transformer2DModel`` (the real class, so LoRA targets, timestep
  convention and CFG are exercised exactly as for SD3);
* text: UTF-8 bytes -> learned embeddings (no tokenizer files);
* latent: the image itself, rearranged by a 4x4 pixel unshuffle (``[B, 48, H/4, W/4]``); decoding is
  the exact pixel shuffle, so ``decode`` is cheap and differentiable.

Weights come from a fixed seed, so every process builds the same model.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rtdmd.backbones.base import (
    BACKBONES,
    TORCH_DTYPES,
    BackboneConfig,
    Cond,
    check_resolution,
    encode_with_negative,
    guided_velocity,
    images_from_vae,
    reference_schedule,
    truncation_note,
)
from rtdmd.backbones.sd3 import SD3_LORA_TARGETS, sd3_default_timesteps, sd3_forward
from rtdmd.flow.schedules import TimeShift

PIXELS_PER_CELL = 4


class ByteTextEncoder(nn.Module):
    """Prompt -> UTF-8 bytes (truncated/padded to ``max_length``) -> ``[B, L, dim]`` embeddings and a
    pooled ``[B, pooled_dim]`` vector (masked mean, then a linear map)."""

    def __init__(self, dim: int = 32, pooled_dim: int = 32, max_length: int = 32) -> None:
        super().__init__()
        self.max_length = max_length
        self.pad_id = 256
        self.embed = nn.Embedding(257, dim)
        self.position = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        self.pool = nn.Linear(dim, pooled_dim)

    def token_ids(self, prompts: Sequence[str]) -> Tensor:
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            data = list(prompt.encode("utf-8"))[: self.max_length]
            ids[row, : len(data)] = torch.tensor(data, dtype=torch.long)
        return ids

    def forward(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        ids = self.token_ids(prompts).to(self.position.device)
        mask = (ids != self.pad_id).unsqueeze(-1).to(self.position.dtype)
        hidden = (self.embed(ids) + self.position) * mask
        pooled = self.pool(hidden.sum(1) / mask.sum(1).clamp(min=1))
        return hidden, pooled


def tiny_transformer(latent_channels: int = 3 * PIXELS_PER_CELL**2, text_dim: int = 32):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_dim,
        caption_projection_dim=32,
        pooled_projection_dim=text_dim,
        pos_embed_max_size=32,
    )


@BACKBONES.register("tiny")
class TinyBackbone:
    """Random tiny SD3-shaped backbone; static shift 3 like SD3."""

    name = "tiny"
    lora_targets = SD3_LORA_TARGETS
    REFERENCE_TIME_SHIFT = time_shift = TimeShift(mu_rule="none", shift=3.0)
    spacing = staticmethod(sd3_default_timesteps)  # the pipeline's default raw times (num_steps, time_shift)
    REFERENCE_PIXELS_PER_TOKEN = PIXELS_PER_CELL * 2

    def __init__(self, transformer: nn.Module, text_encoder: ByteTextEncoder) -> None:
        self.transformer = transformer
        self.text_encoder = text_encoder
        self._empty: dict[str, dict[str, Tensor]] = {}

    @classmethod
    def build(
        cls, seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> TinyBackbone:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = tiny_transformer()
            text_encoder = ByteTextEncoder()
        if dtype != torch.float32:  # built in float32; cast only when asked (diffusers warns on casts)
            transformer, text_encoder = transformer.to(dtype=dtype), text_encoder.to(dtype=dtype)
        return cls(transformer.to(device).eval(), text_encoder.to(device).eval())

    @classmethod
    def from_config(cls, cfg: BackboneConfig, device: torch.device) -> TinyBackbone:
        if cfg.source:
            raise ValueError("family 'tiny' is built from a fixed seed; backbone.source must be empty")
        return cls.build(dtype=TORCH_DTYPES[cfg.dtype], device=device)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def _encode_texts(self, prompts: list[str]) -> dict[str, Tensor]:
        hidden, pooled = self.text_encoder(prompts)
        return {"prompt_embeds": hidden, "pooled_prompt_embeds": pooled}

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], guidance: float = 1.0) -> Cond:
        return encode_with_negative(self._encode_texts, prompts, guidance != 1.0, self._empty)

    def velocity(self, net: nn.Module, x: Tensor, sigma: float | Tensor, cond: Cond, guidance: float = 1.0) -> Tensor:
        return guided_velocity(partial(sd3_forward, net), x, sigma, cond, guidance)

    def truncation_notes(self, prompts: Sequence[str]) -> list[str]:
        note = truncation_note(
            "the byte encoder", [len(p.encode("utf-8")) for p in prompts], self.text_encoder.max_length
        )
        return [note] if note else []

    def decode(self, latents: Tensor) -> Tensor:
        return images_from_vae(F.pixel_shuffle(latents.float(), PIXELS_PER_CELL))

    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [0, 1] -> latents (the exact inverse of :meth:`decode` inside (0, 1))."""
        return F.pixel_unshuffle(images.float() * 2 - 1, PIXELS_PER_CELL)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        check_resolution(height, width, PIXELS_PER_CELL * 2, self.name)
        return (3 * PIXELS_PER_CELL**2, height // PIXELS_PER_CELL, width // PIXELS_PER_CELL)

    def default_timesteps(self, num_steps: int) -> tuple[float, ...]:
        return self.spacing(num_steps, self.time_shift)

    def schedule(self, num_steps: int, height: int, width: int, timesteps: Sequence[float] | None = None) -> Tensor:
        return reference_schedule(type(self), num_steps, height, width, timesteps)
