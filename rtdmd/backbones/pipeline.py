"""Plumbing shared by the adapters that wrap a diffusers pipeline's components (SD3, FLUX.1, FLUX.2).

A family adapter subclasses :class:`PipelineBackbone` once and supplies what differs: the pipeline
class, its text encoding, its transformer call, latent geometry and decoding. Loading, the
empty-prompt branch for CFG and the schedule plumbing live here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor

from rtdmd.backbones.base import (
    TORCH_DTYPES,
    BackboneConfig,
    Cond,
    encode_with_negative,
    images_from_vae,
    truncation_note,
)
from rtdmd.flow.schedules import TimeShift

CLIP_TOKENS = 77


class PipelineBackbone:
    """Base of the diffusers-pipeline adapters. Subclasses set the class attributes and implement
    ``_encode_texts``, ``velocity``, ``decode``, ``latent_shape`` and ``schedule``."""

    name: ClassVar[str]
    PIPELINE: ClassVar[str]  # diffusers pipeline class that loads the components
    DEFAULT_TEXT_LENGTH: ClassVar[int]  # the pipeline's default max_sequence_length
    MU_RULE: ClassVar[
        Literal["resolution", "empirical"]
    ]  # how mu follows resolution when the scheduler shifts dynamically
    guidance_embeds: bool = False

    def __init__(self, pipe, max_sequence_length: int | None = None) -> None:
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae.requires_grad_(False)  # frozen: reward back-propagation only passes through it
        self.max_sequence_length = max_sequence_length or self.DEFAULT_TEXT_LENGTH
        self.time_shift = TimeShift.from_scheduler_config(dict(pipe.scheduler.config), dynamic_mu_rule=self.MU_RULE)
        self._empty: dict[str, dict[str, Tensor]] = {}

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        max_sequence_length: int | None = None,
    ):
        """Load every component from a hub id or a local diffusers directory (``model_index.json``)."""
        import diffusers

        pipe = getattr(diffusers, cls.PIPELINE).from_pretrained(source, dtype=dtype).to(device)
        return cls(pipe, max_sequence_length=max_sequence_length)

    @classmethod
    def from_config(cls, cfg: BackboneConfig, device: torch.device):
        if not cfg.source:
            raise ValueError(f"backbone.source must name a hub id or a local directory for family {cls.name!r}")
        return cls.from_pretrained(cfg.source, TORCH_DTYPES[cfg.dtype], device, cfg.max_sequence_length or None)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def _encode_texts(self, prompts: list[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], guidance: float = 1.0) -> Cond:
        needs_negative = guidance != 1.0 and not self.guidance_embeds
        return encode_with_negative(self._encode_texts, prompts, needs_negative, self._empty)

    def truncation_notes(self, prompts: Sequence[str]) -> list[str]:
        """Each tokenizer of the pipeline with its limit: CLIP's own 77, else ``max_sequence_length``."""
        notes = []
        for attr in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            tokenizer = getattr(self.pipe, attr, None)
            if tokenizer is None:
                continue
            own = int(tokenizer.model_max_length)
            # CLIP encoders always take their own 77 tokens; max_sequence_length is the T5 / Qwen encoder's
            limit = own if own <= CLIP_TOKENS else min(own, self.max_sequence_length)
            lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=False)["input_ids"]]
            if note := truncation_note(type(tokenizer).__name__, lengths, limit):
                notes.append(note)
        return notes

    def default_timesteps(self, num_steps: int) -> tuple[float, ...]:
        return self.spacing(num_steps, self.time_shift)

    @staticmethod
    def spacing(num_steps: int, time_shift: TimeShift) -> tuple[float, ...]:
        raise NotImplementedError


def decode_scaled_vae(vae, latents: Tensor) -> Tensor:
    """SD3 / FLUX.1 decoding: ``vae.decode(x / scaling_factor + shift_factor)`` -> images in [0, 1]."""
    cfg = vae.config
    z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
    return images_from_vae(vae.decode(z.to(vae.dtype), return_dict=False)[0])
