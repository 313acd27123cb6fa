"""Roles of the distillation: teacher (frozen), generator and fake score (LoRA or full), generator EMA.

Every role is a network of the backbone's transformer class; ``backbone.velocity(net, ...)`` runs
any of them. LoRAs go through peft (``add_adapter`` of diffusers models) on the family's target
modules (rtdmd_method.md §4.1).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rtdmd.distributed import World, wrap
from rtdmd.seeding import seed_for


@dataclass(frozen=True)
class LoraSpec:
    """peft LoRA: ``W + (alpha / rank) B A``. ``targets`` empty = the family's ``lora_targets``.
    ``init`` (always ``B = 0``): peft's ``"gaussian"`` (A ~ N(0, 1/rank^2); the official stage-1
    setting), peft's ``"default"`` (Kaiming-uniform A), or ``"normal"`` (A ~ N(0, 1): the official
    stage 2's fresh LoRA after merging stage 1's)."""

    rank: int = 32
    alpha: float = 64.0
    targets: tuple[str, ...] = ()
    init: Literal["gaussian", "default", "normal"] = "gaussian"
    # float32: the LoRA weights, their AdamW state and the EMA in float32 on any base (our default:
    # at learning rates of 1e-6 many bf16 updates would round away); base: in the base model's dtype
    # (bf16 for a bf16 backbone), the official code's numerics, which its learning rates were tuned under
    dtype: Literal["float32", "base"] = "float32"

    def validate(self) -> None:
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError("LoRA rank must be >= 1 and alpha > 0")


@dataclass(frozen=True)
class OptimSpec:
    """AdamW with a constant learning rate, and global-norm gradient clipping (0 = off)."""

    lr: float = 3e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass(frozen=True)
class RoleSpec:
    """A trainable role. ``source``: transformer weights to start from ("" = the backbone's own; else
    a hub id or a diffusers directory with a ``transformer/`` subfolder, e.g. the step-distilled
    FLUX.2-klein for the generator). ``lora: null`` trains every weight."""

    source: str = ""
    lora: LoraSpec | None = field(default_factory=LoraSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)


def frozen_copy(net: nn.Module) -> nn.Module:
    """A deep copy with every parameter frozen (the teacher keeps the backbone's module itself)."""
    clone = copy.deepcopy(net)
    clone.requires_grad_(False)
    return clone


def load_transformer_like(reference: nn.Module, source: str) -> nn.Module:
    """Load ``source``'s transformer with ``reference``'s class, dtype and device."""
    cls = type(reference)
    net = cls.from_pretrained(source, subfolder="transformer", dtype=next(reference.parameters()).dtype)
    return net.to(next(reference.parameters()).device)


def attach_lora(net: nn.Module, spec: LoraSpec, default_targets: tuple[str, ...], seed: int) -> nn.Module:
    """Freeze ``net`` and add a trainable LoRA (initialised from ``seed``); returns ``net``."""
    from peft import LoraConfig

    net.requires_grad_(False)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.targets or default_targets),
        init_lora_weights="gaussian" if spec.init in ("gaussian", "normal") else True,
        use_rslora=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net.add_adapter(config)
        if spec.init == "normal":
            for name, param in net.named_parameters():
                if "lora_A" in name:
                    torch.nn.init.normal_(param.data, 0.0, 1.0)
    if spec.dtype == "float32":  # peft creates the LoRA in the base's dtype
        for name, param in net.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
    return net


def merge_lora(net: nn.Module) -> nn.Module:
    """Fold every LoRA into its base weight (``W += (alpha / r) B A``) and remove the adapters."""
    net.fuse_lora(lora_scale=1.0)
    net.unload_lora()
    return net


def make_trainable(net: nn.Module, spec: RoleSpec, default_targets: tuple[str, ...], seed: int, role: str) -> nn.Module:
    """Turn a copy of the base into a trainable role: a LoRA, or every weight when ``spec.lora`` is None."""
    if spec.lora is None:
        net.requires_grad_(True)
        return net
    return attach_lora(net, spec.lora, default_targets, seed_for(seed, role, "lora-init"))


def trainable(net: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a role trains, by name (stable across processes, used as checkpoint keys)."""
    return {name: p for name, p in net.named_parameters() if p.requires_grad}


def ema_dtype(spec: RoleSpec) -> torch.dtype | None:
    """The EMA's dtype for a role: the parameters' own for a LoRA kept in the base's dtype, else float32."""
    return None if spec.lora is not None and spec.lora.dtype == "base" else torch.float32


def adamw(params: dict[str, nn.Parameter], spec: OptimSpec) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        list(params.values()), lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay, foreach=False
    )


def ema_update_(ema: Tensor, param: Tensor, decay: float) -> None:
    """In place ``e <- d e + (1 - d) p``."""
    ema.mul_(decay).add_(param.detach().to(ema.dtype), alpha=1 - decay)


def warmup_decay(num_updates: int, decay: float) -> float:
    """``min((1 + n) / (10 + n), d)``: a short memory early on, ``d`` after ~``9 d / (1 - d)`` updates."""
    return min((1 + num_updates) / (10 + num_updates), decay)


class EMA:
    """Exponential moving average of a role's trainable parameters, in float32 or (``dtype=None``) in
    the parameters' own dtype."""

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        decay: float,
        warmup: bool = False,
        dtype: torch.dtype | None = torch.float32,
    ) -> None:
        """The average is kept in ``dtype``, or in each parameter's own dtype with ``None`` (a LoRA in
        bf16, ``LoraSpec.dtype = "base"``, averages in bf16 as the official code does: :func:`ema_dtype`)."""
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {name: p.detach().to(dtype or p.dtype).clone() for name, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, nn.Parameter], decay: float | None = None) -> None:
        """One update with the configured decay (or ``decay``, e.g. a schedule kept by the caller)."""
        if decay is None:
            decay = warmup_decay(self.num_updates, self.decay) if self.warmup else self.decay
        for name, p in params.items():
            ema_update_(self.shadow[name], p, decay)
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped_in(self, params: dict[str, nn.Parameter]) -> Iterator[None]:
        """Temporarily load the averaged weights into ``params`` (for evaluation)."""
        backup = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(backup[name])

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, tensors: dict[str, Tensor], num_updates: int) -> None:
        for name in self.shadow:
            self.shadow[name] = tensors[name].to(dtype=self.shadow[name].dtype).clone()
        self.num_updates = num_updates


# ---------------------------------------------------------------- the roles of a stage, built


@dataclass
class Models:
    """What the update functions need; ``generator_run`` / ``fake_run`` are the (DDP-)wrapped
    modules used for training forwards."""

    backbone: object
    teacher: torch.nn.Module
    generator_run: torch.nn.Module
    fake_run: torch.nn.Module
    sigmas: torch.Tensor
    latent_shape: tuple[int, int, int]


@dataclass
class BuiltRoles:
    """The trainable roles of a stage (generator and fake score), their optimisers and the models
    the losses call; stage 1 and stage 2 build them with :func:`build_roles`."""

    models: Models
    generator: torch.nn.Module  # unwrapped
    gen_params: dict
    fake_params: dict
    optimizers: dict

    @property
    def roles(self) -> dict:
        return {
            "generator": (self.models.generator_run, self.optimizers["generator"]),
            "fake": (self.models.fake_run, self.optimizers["fake"]),
        }


@dataclass
class Session:
    """What a training stage builds once per process, stage 1 and stage 2 alike: its roles, the
    generator's EMA, where it runs (``world``) and writes (``root``), the evaluation suites, the
    training prompts (``records``: ``{"prompt": ..., **metadata}``) and, for stage 2, the reward
    scorers by name. The shared loop, the evaluation and both stages' steps read it."""

    cfg: Any
    world: World
    root: Path
    built: BuiltRoles
    ema: EMA
    records: list[dict]
    eval_tasks: list  # rtdmd.train.evaluation.EvalTask, loaded once
    rewards: dict = field(default_factory=dict)

    @property
    def models(self) -> Models:
        return self.built.models

    @property
    def generator(self) -> nn.Module:  # unwrapped, for evaluation and parameter names
        return self.built.generator

    @property
    def gen_params(self) -> dict:
        return self.built.gen_params

    @property
    def fake_params(self) -> dict:
        return self.built.fake_params

    @property
    def optimizers(self) -> dict:
        return self.built.optimizers

    @property
    def roles(self) -> dict:
        return self.built.roles


def build_roles(
    cfg, world, backbone, merges: dict[str, list[Callable]] | None = None, seed_scope: str = ""
) -> BuiltRoles:
    """The frozen teacher (the backbone's transformer), and the generator and fake score: each a copy
    of the teacher (or of its role's ``source``), each of ``merges[role]`` applied (stage 2 folds stage 1's
    LoRAs in), made trainable (LoRA seeded by ``seed_scope + role``), wrapped for DDP/FSDP, with AdamW.
    ``cfg`` carries ``generator``, ``fake``, ``seed``, ``gradient_checkpointing``, ``distributed``,
    ``sampler``, ``height`` and ``width``."""
    teacher = backbone.transformer.eval().requires_grad_(False)

    def role(name: str) -> torch.nn.Module:
        spec: RoleSpec = getattr(cfg, name)
        base = load_transformer_like(teacher, spec.source) if spec.source else copy.deepcopy(teacher)
        for merge in (merges or {}).get(name, []):
            merge(base)
        net = make_trainable(base, spec, backbone.lora_targets, cfg.seed, seed_scope + name).train()
        if cfg.gradient_checkpointing:
            net.enable_gradient_checkpointing()
        return net

    generator, fake = role("generator"), role("fake")
    generator_run, fake_run = wrap(generator, cfg.distributed, world), wrap(fake, cfg.distributed, world)
    compile_parts(cfg.compile, backbone, {"teacher": teacher, "generator": generator, "fake": fake})
    gen_params, fake_params = trainable(generator), trainable(fake)  # after wrapping: FSDP2 shards in place
    optimizers = {"generator": adamw(gen_params, cfg.generator.optim), "fake": adamw(fake_params, cfg.fake.optim)}
    sigmas = backbone.schedule(cfg.sampler.num_steps, cfg.height, cfg.width, cfg.sampler.timesteps)
    models = Models(backbone, teacher, generator_run, fake_run, sigmas, backbone.latent_shape(cfg.height, cfg.width))
    return BuiltRoles(models, generator, gen_params, fake_params, optimizers)


CompilePart = Literal["teacher", "generator", "fake", "vae"]
# Inductor options of the training graphs (torch 2.11, H200):
# - comprehensive_padding: it pads the strides of some saved activations (SD3's 205-token text norms,
#   4920 -> 4928); under gradient checkpointing the recomputed ones come back unpadded and the
#   backward's stride check fails;
# - triton.autotune_pointwise: benchmarking a pointwise backward kernel's configs at its first call
#   ended in an illegal memory access for FLUX.2-klein 4B at batch 9, with and without checkpointing;
#   without it the same graphs train (3.34 s per iteration, 40% MFU) and a batch that does not fit fails
#   as an out-of-memory error (bench/perf/results/README.md).
TRAINING_INDUCTOR = {"comprehensive_padding": False, "triton.autotune_pointwise": False}


def compile_parts(parts: tuple[str, ...], backbone, nets: dict[str, nn.Module]) -> None:
    """The training fast path (``compile:`` in the stage configs): regional ``torch.compile`` of the
    transformer blocks of each named role (:func:`rtdmd.backbones.base.compile_blocks`; after DDP/FSDP
    wrapping, as FSDP2 wants) and of the VAE decoder (``vae``: stage 2 decodes and back-propagates
    through it). Compiled kernels fuse and round differently from eager ones: losses agree within the
    autocast precision, not bit for bit."""
    from rtdmd.backbones.base import compile_blocks, compile_static

    for part in parts:
        if part == "vae":
            decoder = getattr(getattr(backbone, "vae", None), "decoder", None)
            if decoder is None:
                raise ValueError(f"compile: {type(backbone).__name__} has no VAE decoder to compile")
            compile_static(decoder)
        else:
            compile_blocks(nets[part], TRAINING_INDUCTOR)


def optimizer_step(loss: torch.Tensor, params: dict, optimizer: torch.optim.Optimizer, clip: float) -> float:
    """Backward, then :func:`clip_and_step`; returns the pre-clip gradient norm."""
    loss.backward()
    return clip_and_step(params, optimizer, clip)


def clip_and_step(params: dict, optimizer: torch.optim.Optimizer, clip: float) -> float:
    """Global-norm clipping of the accumulated gradients (0 = off), AdamW step, zeroed gradients;
    returns the pre-clip gradient norm."""
    grads = [p for p in params.values() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(grads, clip if clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)
