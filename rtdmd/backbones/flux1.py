"""FLUX.1 (dev, schnell): ``FluxTransformer2DModel``, CLIP-L (pooled) + T5, ``AutoencoderKL``.

The sampler's latent is the unpacked VAE latent ``[B, 16, H/8, W/8]``; it is packed 2x2 into
``[B, HW/256, 64]`` tokens only for the transformer call. The model timestep is ``sigma``.
FLUX.1-dev is guidance-distilled: its guidance is the embedded scalar in a single pass. A FLUX.1
without guidance embedding (schnell) gets classical CFG with the empty prompt (``true_cfg``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

from rtdmd.backbones.base import BACKBONES, Cond, check_resolution, guided_velocity, net_dtype, vae_scale_factor
from rtdmd.backbones.latents import from_tokens, grid_ids, patchify_2x2, to_tokens, unpatchify_2x2
from rtdmd.backbones.pipeline import PipelineBackbone, decode_scaled_vae
from rtdmd.backbones.sd3 import SD3_LORA_TARGETS
from rtdmd.flow.schedules import TimeShift, flux_default_timesteps


def pack_flux1(x: Tensor) -> Tensor:
    """``[B, C, h, w] -> [B, h w / 4, 4C]`` (2x2 patches as tokens)."""
    return to_tokens(patchify_2x2(x))


def unpack_flux1(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_flux1` for a latent of ``height x width`` cells."""
    return unpatchify_2x2(from_tokens(tokens, height // 2, width // 2))


def flux1_forward(
    net: nn.Module, x: Tensor, sigma: Tensor, tensors: dict[str, Tensor], guidance: float | None
) -> Tensor:
    """One ``FluxTransformer2DModel`` call on an unpacked latent; ``guidance`` is the embedded scalar or None."""
    dtype = net_dtype(net)
    b, _, h, w = x.shape
    embeds = tensors["prompt_embeds"]
    out = net(
        hidden_states=pack_flux1(x).to(dtype),
        timestep=sigma.float(),
        guidance=None if guidance is None else torch.full((b,), guidance, device=x.device, dtype=torch.float32),
        pooled_projections=tensors["pooled_prompt_embeds"].to(dtype),
        encoder_hidden_states=embeds.to(dtype),
        txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=dtype),
        img_ids=grid_ids(h // 2, w // 2, 3, x.device).to(dtype),
        return_dict=False,
    )[0]
    return unpack_flux1(out, h, w)


@BACKBONES.register("flux1")
class Flux1Backbone(PipelineBackbone):
    """FLUX.1-dev / -schnell through diffusers' ``FluxPipeline`` components."""

    name = "flux1"
    PIPELINE = "FluxPipeline"
    DEFAULT_TEXT_LENGTH = 512
    MU_RULE = "resolution"
    # The official RTDMD list: the joint-attention names, which also hit single-block attn.to_q/k/v.
    lora_targets = SD3_LORA_TARGETS
    # the released FLUX.1 scheduler: resolution-dependent mu; 16 pixels per packed token
    REFERENCE_TIME_SHIFT = TimeShift(
        mu_rule="resolution", base_shift=0.5, max_shift=1.15, base_seq_len=256, max_seq_len=4096
    )
    REFERENCE_PIXELS_PER_TOKEN = 16
    spacing = staticmethod(flux_default_timesteps)  # the pipeline's default raw times (num_steps, time_shift)

    def __init__(self, pipe, max_sequence_length: int | None = None) -> None:
        super().__init__(pipe, max_sequence_length)
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)

    def _encode_texts(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def velocity(self, net: nn.Module, x: Tensor, sigma: float | Tensor, cond: Cond, guidance: float = 1.0) -> Tensor:
        return guided_velocity(partial(flux1_forward, net), x, sigma, cond, guidance, embedded=self.guidance_embeds)

    def decode(self, latents: Tensor) -> Tensor:
        return decode_scaled_vae(self.vae, latents)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = vae_scale_factor(self.vae)
        check_resolution(height, width, f * 2, self.name)
        return (self.transformer.config.in_channels // 4, height // f, width // f)

    def schedule(self, num_steps: int, height: int, width: int, timesteps: Sequence[float] | None = None) -> Tensor:
        _, h, w = self.latent_shape(height, width)
        return self.time_shift.sigmas(timesteps or self.default_timesteps(num_steps), (h // 2) * (w // 2))
