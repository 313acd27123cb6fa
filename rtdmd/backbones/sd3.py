"""Stable Diffusion 3 / 3.5 (Medium, Large): ``SD3Transformer2DModel``, CLIP-L + CLIP-G + T5, ``AutoencoderKL``.

Model timestep ``tau = 1000 sigma``; CFG concatenates ``[uncond; cond]`` in one forward; latents are
``[B, 16, H/8, W/8]`` and decode as ``vae.decode(x / scaling_factor + shift_factor)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
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
    net_dtype,
    vae_scale_factor,
)
from rtdmd.flow.schedules import TimeShift, linspace_timesteps, shift_static

# LoRA on the joint-attention projections of every block (official RTDMD configs; rtdmd_method.md §4.1).
SD3_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


def sd3_default_timesteps(num_steps: int, time_shift: TimeShift) -> tuple[float, ...]:
    """diffusers' SD3 spacing: ``linspace(1, sigma_min, n)`` where ``sigma_min`` is the scheduler's
    smallest training sigma, already shifted once when the shift is static (the shift is then
    applied again on top, exactly as diffusers does)."""
    u_min = (
        1e-3
        if time_shift.mu_rule != "none"
        else float(shift_static(torch.tensor(1e-3, dtype=torch.float64), time_shift.shift))
    )
    return linspace_timesteps(num_steps, u_min)


def sd3_forward(
    net: nn.Module, x: Tensor, sigma: Tensor, tensors: dict[str, Tensor], guidance: float | None = None
) -> Tensor:
    """One ``SD3Transformer2DModel`` call in sigma units: the model takes ``tau = 1000 sigma``.

    SD3 has no guidance embedding; ``guidance`` must be None (CFG happens around this call)."""
    if guidance is not None:
        raise ValueError("SD3 transformers have no guidance embedding")
    dtype = net_dtype(net)
    return net(
        hidden_states=x.to(dtype),
        timestep=sigma.float() * 1000,
        encoder_hidden_states=tensors["prompt_embeds"].to(dtype),
        pooled_projections=tensors["pooled_prompt_embeds"].to(dtype),
        return_dict=False,
    )[0]


@BACKBONES.register("sd3")
class SD3Backbone:
    """SD3-M / SD3.5-M (and SD3.5-L) through diffusers' ``StableDiffusion3Pipeline`` components."""

    name = "sd3"
    lora_targets = SD3_LORA_TARGETS
    # the released SD3-M / SD3.5-M scheduler: static shift 3; 16 pixels per token (VAE 8 x patch 2)
    REFERENCE_TIME_SHIFT = TimeShift(mu_rule="none", shift=3.0)
    spacing = staticmethod(sd3_default_timesteps)  # the pipeline's default raw times (num_steps, time_shift)
    REFERENCE_PIXELS_PER_TOKEN = 16

    def __init__(self, pipe, max_sequence_length: int = 256) -> None:
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.max_sequence_length = max_sequence_length
        self.time_shift = TimeShift.from_scheduler_config(dict(pipe.scheduler.config), dynamic_mu_rule="resolution")
        self._empty: dict[str, dict[str, Tensor]] = {}

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        max_sequence_length: int = 256,
    ):
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(source, dtype=dtype).to(device)
        return cls(pipe, max_sequence_length=max_sequence_length)

    @classmethod
    def from_config(cls, cfg: BackboneConfig, device: torch.device) -> SD3Backbone:
        if not cfg.source:
            raise ValueError("backbone.source must name a hub id or a local directory for family 'sd3'")
        return cls.from_pretrained(cfg.source, TORCH_DTYPES[cfg.dtype], device, cfg.max_sequence_length or 256)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    def _encode_texts(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], guidance: float = 1.0) -> Cond:
        return encode_with_negative(self._encode_texts, prompts, guidance != 1.0, self._empty)

    def velocity(self, net: nn.Module, x: Tensor, sigma: float | Tensor, cond: Cond, guidance: float = 1.0) -> Tensor:
        return guided_velocity(partial(sd3_forward, net), x, sigma, cond, guidance)

    def decode(self, latents: Tensor) -> Tensor:
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return images_from_vae(self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0])

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = vae_scale_factor(self.vae)
        check_resolution(height, width, f * self.patch_size, self.name)
        return (self.transformer.config.in_channels, height // f, width // f)

    def default_timesteps(self, num_steps: int) -> tuple[float, ...]:
        return self.spacing(num_steps, self.time_shift)

    def schedule(self, num_steps: int, height: int, width: int, timesteps: Sequence[float] | None = None) -> Tensor:
        _, h, w = self.latent_shape(height, width)
        seq_len = (h // self.patch_size) * (w // self.patch_size)
        return self.time_shift.sigmas(timesteps or self.default_timesteps(num_steps), seq_len)
