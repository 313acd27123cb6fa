"""The Backbone contract: one adapter per model family; nothing else branches on the model type.

Conventions stated once:

* ``sigma`` is the noise level in [0, 1] everywhere outside the adapters; the model's own timestep
  (``1000 sigma`` for SD3, ``sigma`` for FLUX) exists only inside an adapter.
* latents are 4-D ``[B, C, h, w]`` float32 tensors in the space the sampler works in (FLUX.1:
  unpacked VAE latents; FLUX.2: patchified, batch-norm-normalised latents); packing to tokens
  happens inside ``velocity``.
* ``velocity(net, ...)`` runs any network of the family's transformer class (teacher, generator,
  fake score, with or without LoRA) and returns float32.
* ``decode`` returns images ``[B, 3, H, W]`` in [0, 1], differentiable.
* ``guidance`` is the family's guidance knob: classical two-branch CFG with the empty prompt as the
  unconditional branch (SD3, FLUX.2-klein-base, FLUX.1 without guidance embedding), or the embedded
  guidance scalar (FLUX.1-dev). ``guidance = 1`` is the plain conditional prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from rtdmd.flow.path import as_sigma_batch, classifier_free_guidance
from rtdmd.registry import Registry


@dataclass(frozen=True)
class Cond:
    """Text conditioning of a batch: batch-first tensors keyed by the family's argument names.

    ``negative`` holds the unconditional (empty-prompt) branch for classical CFG, with the same keys
    and batch size, or ``None`` when the guidance in use needs none.
    """

    tensors: dict[str, Tensor]
    negative: dict[str, Tensor] | None = None

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def select(self, index: Tensor | Sequence[int] | slice) -> Cond:
        pick = (
            (lambda d: {k: v[index] for k, v in d.items()})
            if isinstance(index, slice)
            else (lambda d: {k: v[torch.as_tensor(index, device=v.device)] for k, v in d.items()})
        )
        return Cond(pick(self.tensors), pick(self.negative) if self.negative is not None else None)

    def to(self, device: torch.device | str) -> Cond:
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return Cond(move(self.tensors), move(self.negative) if self.negative is not None else None)


@runtime_checkable
class Backbone(Protocol):
    """What the trainer, the samplers and the benchmark need from a model family."""

    name: str
    transformer: nn.Module  # the loaded base weights; teacher, generator and fake score start from copies
    lora_targets: tuple[str, ...]  # peft ``target_modules`` for the RTDMD LoRAs (rtdmd_method.md §4.1)

    @property
    def device(self) -> torch.device: ...

    def encode(self, prompts: Sequence[str], guidance: float = 1.0) -> Cond:
        """Encode prompts; adds the empty-prompt branch when ``guidance`` needs classical CFG."""
        ...

    def velocity(self, net: nn.Module, x: Tensor, sigma: float | Tensor, cond: Cond, guidance: float = 1.0) -> Tensor:
        """Velocity ``v ~ eps - x0`` of ``net`` at ``(x, sigma)``, float32, shape of ``x``."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images ``[B, 3, H, W]`` in [0, 1] (float32, differentiable)."""
        ...

    def truncation_notes(self, prompts: Sequence[str]) -> list[str]:
        """One line per text encoder that cuts some of ``prompts`` (see :func:`truncation_note`)."""
        ...

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the sampler's latent for an image of ``height x width`` pixels."""
        ...

    def default_timesteps(self, num_steps: int) -> tuple[float, ...]:
        """The family pipeline's default raw times ``u`` (before the shift) for ``num_steps``."""
        ...

    def schedule(self, num_steps: int, height: int, width: int, timesteps: Sequence[float] | None = None) -> Tensor:
        """``[num_steps + 1]`` float32 sigmas, terminal 0 included, at this resolution."""
        ...


BACKBONES: Registry[type] = Registry("backbone family", lazy={"toy": "rtdmd.toyworld.backbone"})

Dtype = Literal["float32", "float64", "bfloat16", "float16"]
TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class BackboneConfig:
    """Which family, which weights, which precision.

    ``source`` is a hub id or a local directory in diffusers layout (``model_index.json``);
    ``max_sequence_length`` of 0 keeps the family's default text length (SD3: 256 T5 tokens, the
    official RTDMD code uses 128; FLUX.1 and FLUX.2: 512).
    """

    family: str = "tiny"
    source: str = ""
    dtype: Dtype = "float32"
    max_sequence_length: int = 0

    def validate(self) -> None:
        if self.family not in BACKBONES:
            BACKBONES.get(self.family)  # raises with a did-you-mean
        if self.max_sequence_length < 0:
            raise ValueError("max_sequence_length must be >= 0")


def build_backbone(cfg: BackboneConfig, device: torch.device | str = "cpu") -> Backbone:
    """Instantiate the configured family (downloads happen here, through ``from_pretrained``)."""
    family = BACKBONES.get(cfg.family)
    return family.from_config(cfg, torch.device(device))


def net_dtype(net: nn.Module) -> torch.dtype:
    return next(net.parameters()).dtype


def truncation_note(encoder: str, lengths: Sequence[int], limit: int) -> str | None:
    """``"k of n prompts exceed <encoder>'s <limit> tokens ..."`` when some ``lengths`` pass ``limit``
    (the encoders cut them there, silently), else None."""
    over = [n for n in lengths if n > limit]
    if not over:
        return None
    return (
        f"{len(over)} of {len(lengths)} prompts exceed {encoder}'s {limit} tokens (the longest has {max(over)}): "
        "the encoder sees only their beginning"
    )


def encode_with_negative(
    encode_texts: Callable[[list[str]], dict[str, Tensor]],
    prompts: Sequence[str],
    with_negative: bool,
    empty_cache: dict[str, dict[str, Tensor]],
) -> Cond:
    """Build a :class:`Cond`; the empty-prompt branch is encoded once, cached and expanded to the batch."""
    tensors = encode_texts(list(prompts))
    if not with_negative:
        return Cond(tensors)
    if "empty" not in empty_cache:
        empty_cache["empty"] = encode_texts([""])
    batch = len(prompts)
    negative = {k: v.expand(batch, *v.shape[1:]).contiguous() for k, v in empty_cache["empty"].items()}
    return Cond(tensors, negative)


def guided_velocity(
    forward: Callable[[Tensor, Tensor, dict[str, Tensor], float | None], Tensor],
    x: Tensor,
    sigma: float | Tensor,
    cond: Cond,
    guidance: float,
    embedded: bool = False,
) -> Tensor:
    """Apply the family's guidance around ``forward(x, sigma[B], tensors, embedded_guidance) -> v``.

    ``embedded``: the scalar goes into the model (guidance-distilled FLUX), one pass. Otherwise
    classical CFG: ``guidance = 1`` evaluates the conditional branch only; else ``cond.negative``
    must be set (encode with the same guidance) and both branches run in one batch, giving
    ``v_u + w (v_c - v_u)``. Returns float32.
    """
    sigma_b = as_sigma_batch(sigma, x.shape[0], x.device)
    if embedded:
        return forward(x, sigma_b, cond.tensors, guidance).float()
    if guidance == 1.0:
        return forward(x, sigma_b, cond.tensors, None).float()
    if cond.negative is None:
        raise ValueError(
            f"guidance {guidance} needs the unconditional branch: encode the prompts with guidance={guidance}"
        )
    both = {k: torch.cat([cond.negative[k], v]) for k, v in cond.tensors.items()}
    v_uncond, v_cond = forward(torch.cat([x, x]), torch.cat([sigma_b, sigma_b]), both, None).float().chunk(2)
    return classifier_free_guidance(v_uncond, v_cond, guidance)


def reference_schedule(
    family: type, num_steps: int, height: int, width: int, timesteps: Sequence[float] | None = None
) -> Tensor:
    """The schedule a family's released scheduler config gives, without loading any weights.

    Uses the class attributes ``REFERENCE_TIME_SHIFT``, ``REFERENCE_PIXELS_PER_TOKEN`` and the
    static ``spacing(num_steps, time_shift)`` of the family's default raw times.
    """
    cell = family.REFERENCE_PIXELS_PER_TOKEN
    check_resolution(height, width, cell, family.name)
    shift = family.REFERENCE_TIME_SHIFT
    return shift.sigmas(timesteps or family.spacing(num_steps, shift), (height // cell) * (width // cell))


def vae_scale_factor(vae: nn.Module) -> int:
    """Pixels per VAE latent cell: ``2 ** (len(block_out_channels) - 1)`` (8 for the real VAEs)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_resolution(height: int, width: int, multiple: int, family: str) -> None:
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"{family}: height and width must be positive multiples of {multiple}, got {height}x{width}")


def images_from_vae(decoded: Tensor) -> Tensor:
    """VAE output in [-1, 1] -> float32 images in [0, 1] (as diffusers' image processor does)."""
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


def compile_static(module: nn.Module, inductor: dict | None = None) -> None:
    """``torch.compile`` (default mode) with one static graph per input shape. Dynamo's default turns a
    dimension dynamic at its first new size, and later calls of every size then run that one symbolic
    graph: a short last chunk would change the kernels, and so the bits, of every chunk after it."""
    module.compile(dynamic=False, options=inductor)


def compile_blocks(net: nn.Module, inductor: dict | None = None) -> int:
    """Regional compilation: ``torch.compile`` (default mode) on every repeated transformer block of ``net``
    (diffusers' ``_repeated_blocks`` class names, else the classes in ``net.transformer_blocks``), so each
    block type compiles once per input shape (:func:`compile_static`) and the rest of the model stays eager. ``inductor``:
    inductor options for these blocks. Returns how many blocks were wrapped."""
    import torch._dynamo

    # every role, grad mode and batch size is its own guard set of the one block class: room for all of
    # them, or dynamo would silently fall back to eager after the default 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    names = set(getattr(net, "_repeated_blocks", None) or ())
    names |= {type(block).__name__ for block in getattr(net, "transformer_blocks", ())}
    compiled = 0
    for module in net.modules():
        if type(module).__name__ in names:
            compile_static(module, inductor)
            compiled += 1
    if not compiled:
        raise ValueError(f"{type(net).__name__} has no repeated transformer blocks to compile")
    return compiled


def compile_for_sampling(backbone, net: nn.Module) -> None:
    """The ``compile: true`` path of a method card: :func:`compile_blocks` on the network it samples with,
    and ``torch.compile`` on the VAE decoder (on an H200 it halves decoding a 1024 px image, 71 -> 37 ms;
    ``bench/perf/results/README.md``). Both change the last bits of the images, which stay repeatable."""
    compile_blocks(net)
    decoder = getattr(getattr(backbone, "vae", None), "decoder", None)
    if decoder is not None:
        compile_static(decoder)
