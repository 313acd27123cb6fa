"""Stable Diffusion 3 / 3.5 (Medium, Large): ``SD3Transformer2DModel``, CLIP-L + CLIP-G + T5, ``AutoencoderKL``.

Model timestep ``tau = 1000 sigma``; CFG concatenates ``[uncond; cond]`` in one forward; latents are
``[B, 16, H/8, W/8]`` and decode as ``vae.decode(x / scaling_factor + shift_factor)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

from rtdmd.backbones.base import BACKBONES, Cond, check_resolution, guided_velocity, net_dtype, vae_scale_factor
from rtdmd.backbones.pipeline import PipelineBackbone, decode_scaled_vae
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
class SD3Backbone(PipelineBackbone):
    """SD3-M / SD3.5-M (and SD3.5-L) through diffusers' ``StableDiffusion3Pipeline`` components."""

    name = "sd3"
    PIPELINE = "StableDiffusion3Pipeline"
    DEFAULT_TEXT_LENGTH = 256  # T5 tokens; the official RTDMD code uses 128
    MU_RULE = "resolution"
    lora_targets = SD3_LORA_TARGETS
    # the released SD3-M / SD3.5-M scheduler: static shift 3; 16 pixels per token (VAE 8 x patch 2)
    REFERENCE_TIME_SHIFT = TimeShift(mu_rule="none", shift=3.0)
    REFERENCE_PIXELS_PER_TOKEN = 16
    spacing = staticmethod(sd3_default_timesteps)  # the pipeline's default raw times (num_steps, time_shift)

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

    def velocity(self, net: nn.Module, x: Tensor, sigma: float | Tensor, cond: Cond, guidance: float = 1.0) -> Tensor:
        return guided_velocity(partial(sd3_forward, net), x, sigma, cond, guidance)

    def decode(self, latents: Tensor) -> Tensor:
        return decode_scaled_vae(self.vae, latents)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = vae_scale_factor(self.vae)
        check_resolution(height, width, f * self.patch_size, self.name)
        return (self.transformer.config.in_channels, height // f, width // f)

    def schedule(self, num_steps: int, height: int, width: int, timesteps: Sequence[float] | None = None) -> Tensor:
        _, h, w = self.latent_shape(height, width)
        seq_len = (h // self.patch_size) * (w // self.patch_size)
        return self.time_shift.sigmas(timesteps or self.default_timesteps(num_steps), seq_len)
