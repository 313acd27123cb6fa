"""FLUX.2-klein (4B, 9B; base and step-distilled): ``Flux2Transformer2DModel``, Qwen3, ``AutoencoderKLFlux2``.

The sampler's latent is the 2x2-patchified, batch-norm-normalised VAE latent
``[B, 128, H/16, W/16]``; the transformer sees it as ``[B, HW/256, 128]`` tokens. The model timestep
is ``sigma``. Text: Qwen3 chat template, hidden states of layers (9, 18, 27) concatenated. Guidance
is classical CFG with the empty prompt (klein-base, w = 4.0 in RTDMD); a step-distilled klein takes
no guidance.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

from rtdmd.backbones.base import (
    BACKBONES,
    Cond,
    check_resolution,
    guided_velocity,
    images_from_vae,
    net_dtype,
    vae_scale_factor,
)
from rtdmd.backbones.latents import from_tokens, grid_ids, to_tokens, unpatchify_2x2
from rtdmd.backbones.pipeline import PipelineBackbone
from rtdmd.flow.schedules import TimeShift, flux_default_timesteps

TEXT_LAYERS = (9, 18, 27)
_JOINT_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "to_qkv_mlp_proj",
)


def flux2_lora_targets(num_single_layers: int) -> tuple[str, ...]:
    """Official RTDMD targets: the joint projections, the fused single-block ``to_qkv_mlp_proj``, and
    each single block's ``attn.to_out`` by full name (a bare ``to_out`` would hit the joint blocks'
    ``ModuleList``)."""
    return _JOINT_TARGETS + tuple(f"single_transformer_blocks.{i}.attn.to_out" for i in range(num_single_layers))


def flux2_forward(
    net: nn.Module, x: Tensor, sigma: Tensor, tensors: dict[str, Tensor], guidance: float | None
) -> Tensor:
    """One ``Flux2Transformer2DModel`` call on a ``[B, C, h, w]`` latent."""
    dtype = net_dtype(net)
    b, _, h, w = x.shape
    embeds = tensors["prompt_embeds"]
    text_len = embeds.shape[1]
    txt_ids = torch.zeros(b, text_len, 4, device=x.device, dtype=torch.long)
    txt_ids[..., 3] = torch.arange(text_len, device=x.device)
    out = net(
        hidden_states=to_tokens(x).to(dtype),
        encoder_hidden_states=embeds.to(dtype),
        timestep=sigma.float(),
        img_ids=grid_ids(h, w, 4, x.device).long().expand(b, -1, -1),
        txt_ids=txt_ids,
        guidance=None if guidance is None else torch.full((b,), guidance, device=x.device, dtype=torch.float32),
        return_dict=False,
    )[0]
    return from_tokens(out[:, : h * w], h, w)


@BACKBONES.register("flux2")
class Flux2Backbone(PipelineBackbone):
    """FLUX.2-klein through diffusers' ``Flux2KleinPipeline`` components."""

    name = "flux2"
    PIPELINE = "Flux2KleinPipeline"
    DEFAULT_TEXT_LENGTH = 512
    MU_RULE = "empirical"
    # the released FLUX.2-klein scheduler: empirical mu(L, n); 16 pixels per token
    REFERENCE_TIME_SHIFT = TimeShift(mu_rule="empirical")
    REFERENCE_PIXELS_PER_TOKEN = 16
    spacing = staticmethod(flux_default_timesteps)  # the pipeline's default raw times (num_steps, time_shift)
    text_layers = TEXT_LAYERS  # Qwen3 hidden states concatenated into the text embedding

    def __init__(self, pipe, max_sequence_length: int | None = None) -> None:
        super().__init__(pipe, max_sequence_length)
        self.is_distilled = bool(pipe.config.get("is_distilled", False))
        self.guidance_embeds = bool(self.transformer.config.get("guidance_embeds", False))
        self.lora_targets = flux2_lora_targets(self.transformer.config.num_single_layers)

    def _encode_texts(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _ = self.pipe.encode_prompt(
            prompt=prompts,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
            text_encoder_out_layers=self.text_layers,
        )
        return {"prompt_embeds": embeds}

    def _check_guidance(self, guidance: float) -> None:
        if guidance != 1.0 and self.is_distilled and not self.guidance_embeds:
            raise ValueError(f"this FLUX.2-klein is step-distilled and takes no guidance; got guidance={guidance}")

    def encode(self, prompts: Sequence[str], guidance: float = 1.0) -> Cond:
        self._check_guidance(guidance)
        return super().encode(prompts, guidance)

    def velocity(self, net: nn.Module, x: Tensor, sigma: float | Tensor, cond: Cond, guidance: float = 1.0) -> Tensor:
        self._check_guidance(guidance)
        return guided_velocity(partial(flux2_forward, net), x, sigma, cond, guidance, embedded=self.guidance_embeds)

    def decode(self, latents: Tensor) -> Tensor:
        """Undo the batch norm with the VAE's running statistics, unpatchify, decode."""
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, torch.float32)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1).float() + self.vae.config.batch_norm_eps).to(latents.device)
        z = unpatchify_2x2(latents.float() * std + mean)
        return images_from_vae(self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0])

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = vae_scale_factor(self.vae) * 2
        check_resolution(height, width, f, self.name)
        return (self.transformer.config.in_channels, height // f, width // f)

    def schedule(self, num_steps: int, height: int, width: int, timesteps: Sequence[float] | None = None) -> Tensor:
        _, h, w = self.latent_shape(height, width)
        return self.time_shift.sigmas(timesteps or self.default_timesteps(num_steps), h * w)
