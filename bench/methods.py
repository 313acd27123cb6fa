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

from rtdmd.backbones.base import BackboneConfig, build_backbone
from rtdmd.config import ConfigError, from_dict, to_dict
from rtdmd.registry import did_you_mean
from rtdmd.sampling import SamplerSpec


class MethodError(ValueError):
    """A method card that cannot be resolved or built."""


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA of the stack. ``kind``: ``diffusers`` (a file loadable by the pipeline's
    ``load_lora_weights``: hub id or local path, ``weight_name`` inside it) or ``rtdmd`` (an
    ``rtdmd-train`` run directory: its latest checkpoint's EMA generator LoRA)."""

    source: str
    kind: Literal["diffusers", "rtdmd"] = "diffusers"
    weight_name: str = ""
    scale: float = 1.0


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

    @property
    def runnable(self) -> bool:
        return self.backbone is not None

    def fingerprint(self) -> str:
        """sha256 of everything that determines the images (not the display text or published scores)."""
        keys = ("backbone", "transformer", "loras", "sampler", "height", "width", "compute_batch")
        data = {k: v for k, v in to_dict(self).items() if k in keys}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def card_names() -> list[str]:
    root = resources.files("bench") / "cards" / "methods"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_method(name_or_path: str) -> MethodCard:
    """A packaged card by name, or a YAML file."""
    import yaml

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
        return from_dict(MethodCard, yaml.safe_load(text))
    except ConfigError as error:
        raise MethodError(f"method card {name_or_path}: {error}") from None


def build_method(card: MethodCard, device: torch.device):
    """Load the backbone and the network to sample with (replacement transformer, LoRAs merged in order)."""
    if not card.runnable:
        raise MethodError(f"method {card.name} has no weights (published numbers only)")
    try:
        backbone = build_backbone(card.backbone, device)
    except OSError as error:  # from_pretrained: missing files, offline, gated repo
        raise MethodError(missing_weights_message(card.backbone.source, error)) from None
    net = backbone.transformer
    if card.transformer:
        from rtdmd.train.roles import load_transformer_like

        try:
            net = load_transformer_like(net, card.transformer)
        except OSError as error:
            raise MethodError(missing_weights_message(card.transformer, error)) from None
        backbone.transformer = net
        if hasattr(backbone, "pipe"):
            backbone.pipe.transformer = net
    for entry in card.loras:
        merge_lora_entry(backbone, net, entry)
    return backbone, net.eval()


def missing_weights_message(source: str, error: Exception) -> str:
    return (
        f"weights not found for {source!r}: {str(error).splitlines()[0][:200]}. "
        f"Fetch them on a machine with network access (`huggingface-cli download {source}`, or `from_pretrained` once), "
        "or point the card's `source` at a local diffusers directory (model_index.json + component folders)."
    )


def merge_lora_entry(backbone, net: nn.Module, entry: LoraEntry) -> None:
    """Merge one LoRA into ``net``'s weights (``W += scale (alpha / r) B A``)."""
    if entry.kind == "rtdmd":
        merge_rtdmd_run(backbone, net, Path(entry.source), entry.scale)
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


def merge_rtdmd_run(backbone, net: nn.Module, run: Path, scale: float) -> None:
    """Merge the EMA generator LoRA of an ``rtdmd-train`` run (its latest checkpoint)."""
    import yaml

    from rtdmd.config import from_dict as config_from_dict
    from rtdmd.train import state
    from rtdmd.train.distill import DistillConfig
    from rtdmd.train.roles import attach_lora, merge_lora

    latest = state.latest_checkpoint(run)
    if latest is None or not (run / "config.yaml").is_file():
        raise MethodError(f"{run} is not an rtdmd-train run directory with a checkpoint")
    cfg = config_from_dict(DistillConfig, yaml.safe_load((run / "config.yaml").read_text()))
    if cfg.generator.lora is None:
        raise MethodError(f"{run} trained every weight; point the card's `transformer` at an export instead")
    tensors = {k[len("ema/") :]: v for k, v in state.load_tensors(latest[1]).items() if k.startswith("ema/")}
    attach_lora(net, cfg.generator.lora, backbone.lora_targets, seed=0)
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if name not in params:
                raise MethodError(f"{run}: checkpoint tensor {name} does not match this backbone")
            params[name].copy_(value.to(params[name].device) * (scale if "lora_B" in name else 1.0))
    merge_lora(net)
