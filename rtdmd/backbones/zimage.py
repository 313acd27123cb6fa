"""Z-Image (6B; base and Turbo): ``ZImageTransformer2DModel``, Qwen3 text encoder, ``AutoencoderKL``.

Conventions that differ from the other families, all contained here:

* the model's time input is ``1 - sigma`` (1 = clean) and it predicts ``x0 - eps``: the velocity
  ``eps - x0`` is the negated output;
* inputs are lists: one ``[C, 1, h, w]`` latent and one variable-length ``[L_i, D]`` text embedding per
  sample (the text is the second-to-last hidden state of the Qwen3 chat-templated prompt, padding
  removed). The adapter keeps embeddings padded to ``max_sequence_length`` with their lengths, so a
  :class:`Cond` stays a batch of tensors;
* ``guidance`` is the standard CFG weight ``w``: the pipeline's ``pred = pos + g (pos - neg)`` is
  ``w = 1 + g`` (Z-Image-Turbo's ``guidance_scale = 0`` is ``w = 1``). The pipeline's optional CFG
  truncation and normalisation are not supported (both are off by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

from rtdmd.backbones.base import BACKBONES, Cond, check_resolution, guided_velocity, net_dtype, vae_scale_factor
from rtdmd.backbones.pipeline import PipelineBackbone, decode_scaled_vae
from rtdmd.flow.schedules import TimeShift, flux_default_timesteps


def zimage_forward(
    net: nn.Module, x: Tensor, sigma: Tensor, tensors: dict[str, Tensor], guidance: float | None = None
) -> Tensor:
    """One ``ZImageTransformer2DModel`` call on ``[B, C, h, w]`` latents; returns the velocity ``eps - x0``."""
    if guidance is not None:
        raise ValueError("Z-Image has no guidance embedding")
    dtype = net_dtype(net)
    embeds, lengths = tensors["prompt_embeds"].to(dtype), tensors["prompt_lengths"].tolist()
    out = net(
        list(x.to(dtype).unsqueeze(2).unbind(0)),
        1 - sigma.float(),
        [embeds[i, :n] for i, n in enumerate(lengths)],
        return_dict=False,
    )[0]
    return -torch.stack([o.float() for o in out]).squeeze(2)


@BACKBONES.register("zimage")
class ZImageBackbone(PipelineBackbone):
    """Z-Image / Z-Image-Turbo through diffusers' ``ZImagePipeline`` components."""

    name = "zimage"
    PIPELINE = "ZImagePipeline"
    DEFAULT_TEXT_LENGTH = 512
    MU_RULE = "resolution"
    lora_targets = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
    # Z-Image-Turbo's scheduler: static shift 3; 16 pixels per token (VAE 8 x patch 2)
    REFERENCE_TIME_SHIFT = TimeShift(mu_rule="none", shift=3.0)
    REFERENCE_PIXELS_PER_TOKEN = 16
    spacing = staticmethod(flux_default_timesteps)  # the pipeline's default raw times (num_steps, time_shift)

    def _encode_texts(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        dim = embeds[0].shape[-1]
        padded = embeds[0].new_zeros(len(embeds), self.max_sequence_length, dim)
        for i, e in enumerate(embeds):
            padded[i, : e.shape[0]] = e
        return {
            "prompt_embeds": padded,
            "prompt_lengths": torch.tensor([e.shape[0] for e in embeds], device=padded.device),
        }

    def velocity(self, net: nn.Module, x: Tensor, sigma: float | Tensor, cond: Cond, guidance: float = 1.0) -> Tensor:
        return guided_velocity(partial(zimage_forward, net), x, sigma, cond, guidance)

    def decode(self, latents: Tensor) -> Tensor:
        return decode_scaled_vae(self.vae, latents)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = vae_scale_factor(self.vae)
        check_resolution(height, width, f * 2, self.name)
        return (self.transformer.in_channels, height // f, width // f)

    def schedule(self, num_steps: int, height: int, width: int, timesteps: Sequence[float] | None = None) -> Tensor:
        _, h, w = self.latent_shape(height, width)
        return self.time_shift.sigmas(timesteps or self.default_timesteps(num_steps), (h // 2) * (w // 2))
