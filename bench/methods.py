"""Method cards: what to sample with (``bench/cards/methods/*.yaml``, or any YAML path).

A card gives the backbone family and weights, an optional replacement transformer, a LoRA stack
merged in order, the sampler spec, the resolution, the licence, the rewards the method was trained
on (their cells are marked in reports) and published scores where known. A card without a
``backbone`` is a published-numbers-only row (a method without public weights). NFE is never taken
from a card: the harness counts transformer forward passes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from rtdmd.backbones.base import BackboneConfig, build_backbone, compile_for_sampling
from rtdmd.config import ConfigError, from_dict, to_dict, yaml_mapping
from rtdmd.errors import RtdmdError
from rtdmd.lora import (
    SHIPPED_PREFIX,
    LoraError,
    merge_lora_file,
    merge_lora_state_dict,
    metadata_alpha_over_rank,
    read_state_dict,
)
from rtdmd.registry import did_you_mean
from rtdmd.sampling import SamplerSpec
from rtdmd.train import run_lora
from rtdmd.train.roles import load_transformer_like


class MethodError(RtdmdError, ValueError):
    """A method card that cannot be resolved or built."""


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA of the stack, merged as ``W += scale * (alpha / rank) * B A``. ``kind``:

    * ``diffusers``: a file the pipeline's ``load_lora_weights`` reads (Hyper-SD3, TDM); hub id or
      local path, ``weight_name`` inside it;
    * ``state_dict``: a peft-named LoRA state dict (``.pt`` or ``.safetensors``; keys
      ``<module>.lora_A[.<adapter>].weight``, prefixes ``base_model.model.``/``module.``/``transformer.``
      stripped) as the official RTDMD and Flow-GRPO releases ship; ``source`` is a hub repo or a local
      directory/file, ``weight_name`` the file inside it; ``alpha / rank``: the card's
      ``alpha_over_rank`` if set, else ``adapter_config.json`` beside the file, else the file's
      ``lora_alpha``/``lora_rank`` metadata (``rtdmd-train export-lora`` writes them);
    * ``rtdmd``: an ``rtdmd-train`` run directory: its latest checkpoint's EMA generator LoRA;
    * ``shipped``: a LoRA shipped with rtdmd (``source`` = its name in ``rtdmd/toyworld/weights``,
      sha256-verified; rank and alpha from the file's metadata), e.g. the toy students.
    """

    source: str
    kind: Literal["diffusers", "state_dict", "rtdmd", "shipped"] = "diffusers"
    weight_name: str = ""
    scale: float = 1.0
    alpha_over_rank: float = 0.0  # state_dict only; 0 = read adapter_config.json


@dataclass(frozen=True)
class Published:
    """Scores reported elsewhere, for the report's "published" annotation."""

    source: str
    suite: str
    scores: dict[str, float] = field(default_factory=dict)
    nfe: int = 0  # as the source states it (0 = not stated)
    resolution: int = 0


@dataclass(frozen=True)
class MethodCard:
    name: str
    display: str = ""
    description: str = ""
    backbone: BackboneConfig | None = None  # None: published numbers only
    transformer: str = ""  # replacement transformer weights (hub id or diffusers dir), e.g. a distilled klein
    loras: tuple[LoraEntry, ...] = ()
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    height: int = 1024
    width: int = 1024
    licence: str = ""
    trained_on: tuple[str, ...] = ()
    published: tuple[Published, ...] = ()
    compute_batch: int = 4
    # torch.compile each repeated transformer block (regional compilation: seconds to compile per block
    # type and shape, not minutes for the whole model). Compiled kernels round differently from eager ones,
    # so compiled images are another set (their own fingerprint), bit-identical among themselves.
    compile: bool = False

    @property
    def runnable(self) -> bool:
        return self.backbone is not None

    def fingerprint(self) -> str:
        """sha256 of everything that determines the images (not the display text or published scores);
        ``compile`` enters only when set, so the fingerprints of eager cards are those they always had."""
        keys = ("backbone", "transformer", "loras", "sampler", "height", "width", "compute_batch")
        data = {k: v for k, v in to_dict(self).items() if k in keys}
        if self.compile:
            data["compile"] = True
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def card_names() -> list[str]:
    root = resources.files("bench") / "cards" / "methods"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_method(name_or_path: str) -> MethodCard:
    """A packaged card by name, or a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise MethodError(f"method card {path} does not exist")
        text = path.read_text()
    else:
        packaged = resources.files("bench") / "cards" / "methods" / f"{name_or_path}.yaml"
        if not packaged.is_file():
            raise MethodError(
                f"unknown method {name_or_path!r}{did_you_mean(name_or_path, card_names())}; known: {', '.join(card_names())}"
            )
        text = packaged.read_text()
    try:
        return from_dict(MethodCard, yaml_mapping(text, "the file"))
    except ConfigError as error:
        raise MethodError(f"method card {name_or_path}: {error}") from None


def build_method(card: MethodCard, device: torch.device):
    """Load the backbone and the network to sample with (replacement transformer, LoRAs merged in order)."""
    if not card.runnable:
        raise MethodError(f"method {card.name} has no weights (published numbers only)")
    try:
        backbone = build_backbone(card.backbone, device)
    except (OSError, ValueError) as error:  # from_pretrained: missing files or path, offline, gated repo
        raise MethodError(missing_weights_message(card.backbone.source, error)) from None
    net = backbone.transformer
    if card.transformer:
        try:
            net = load_transformer_like(net, card.transformer)
        except (OSError, ValueError) as error:
            raise MethodError(missing_weights_message(card.transformer, error)) from None
        backbone.transformer = net
        if hasattr(backbone, "pipe"):
            backbone.pipe.transformer = net
    for entry in card.loras:
        merge_lora_entry(backbone, net, entry)
    if card.compile:
        compile_for_sampling(backbone, net)
    return backbone, net.eval()


def missing_weights_message(source: str, error: Exception) -> str:
    return (
        f"weights not found for {source!r}: {str(error).splitlines()[0][:200]}. "
        f"Fetch them on a machine with network access (`huggingface-cli download {source}`, or `from_pretrained` once), "
        "or point the card's `source` at a local diffusers directory (model_index.json + component folders)."
    )


def merge_lora_entry(backbone, net: nn.Module, entry: LoraEntry) -> None:
    """Merge one LoRA into ``net``'s weights (``W += scale (alpha / r) B A``)."""
    try:
        _merge_lora_entry(backbone, net, entry)
    except LoraError as error:
        raise MethodError(str(error)) from None


def _merge_lora_entry(backbone, net: nn.Module, entry: LoraEntry) -> None:
    if entry.kind == "rtdmd":
        merge_rtdmd_run(net, Path(entry.source), entry.scale)
        return
    if entry.kind == "shipped":
        merge_shipped(net, entry.source, entry.scale)
        return
    if entry.kind == "state_dict":
        path = resolve_file(entry.source, entry.weight_name)
        merge_lora_state_dict(net, read_state_dict(path), entry.scale * lora_alpha_over_rank(path, entry))
        return
    pipe = getattr(backbone, "pipe", None)
    if pipe is None:
        raise MethodError(f"backbone family {backbone.name!r} loads no diffusers LoRAs (use kind: rtdmd)")
    kwargs = {"weight_name": entry.weight_name} if entry.weight_name else {}
    try:
        pipe.load_lora_weights(entry.source, adapter_name="bench", **kwargs)
    except OSError as error:
        raise MethodError(missing_weights_message(entry.source, error)) from None
    pipe.fuse_lora(lora_scale=entry.scale, components=["transformer"])
    pipe.unload_lora_weights()


def resolve_file(source: str, weight_name: str) -> Path:
    """A local file, a file inside a local directory, or a file of a hub repo (downloaded once)."""
    local = Path(source)
    if local.is_file():
        return local
    if local.is_dir():
        path = local / weight_name
        if not path.is_file():
            raise MethodError(f"{path} does not exist")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, weight_name))
    except Exception as error:  # noqa: BLE001 - offline, gated, missing: one message for all
        raise MethodError(missing_weights_message(f"{source}/{weight_name}", error)) from None


def lora_alpha_over_rank(path: Path, entry: LoraEntry) -> float:
    """``alpha / rank``: the card's value, else ``adapter_config.json`` beside the file, else the
    ``lora_alpha``/``lora_rank`` metadata ``rtdmd-train export-lora`` writes."""
    if entry.alpha_over_rank > 0:
        return entry.alpha_over_rank
    config = path.parent / "adapter_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        return float(data["lora_alpha"]) / float(data["r"])
    if (ratio := metadata_alpha_over_rank(path)) is not None:
        return ratio
    raise MethodError(f"{path}: no adapter_config.json beside it and no rank in its metadata; set alpha_over_rank")


def merge_rtdmd_run(net: nn.Module, run: Path, scale: float) -> None:
    """Merge the generator of an ``rtdmd-train`` run (its latest checkpoint): a distill run's EMA
    LoRA, or a stage-2 run's stage 1 and then its own EMA LoRA (:mod:`rtdmd.train.run_lora`);
    ``scale`` applies to the run's own LoRA."""
    try:
        run_lora.merge_all(net, run_lora.role_merges(run, "generator", scale))
    except run_lora.RunError as error:
        raise MethodError(f"{error}; for full weights point the card's `transformer` at an export") from None


def merge_shipped(net: nn.Module, name: str, scale: float) -> None:
    """Merge a LoRA shipped in rtdmd's package data (written by ``export_generator_lora``)."""
    merge_lora_file(net, SHIPPED_PREFIX + name, scale)
