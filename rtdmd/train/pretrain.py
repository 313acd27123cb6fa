"""``rtdmd-train pretrain``: train the toy teacher by flow matching on the rendered toy world.

Objective (rectified flow): for an image latent ``x0``, noise ``eps`` and ``sigma``,
``x_sigma = (1 - sigma) x0 + sigma eps``; the toy network predicts ``x0`` (see
:mod:`rtdmd.toyworld.backbone`) and the loss is the velocity error with the denominator clipped, as in
JiT: ``v_hat = (x_sigma - x0_hat) / sigma``, so
``L = E || x0_hat - x0 ||^2 / max(sigma, sigma_floor)^2``  (``= E || v_hat - (eps - x0) ||^2`` above
the floor; the floor keeps the weight of nearly clean inputs finite).
``sigma`` is SD3's shifted logit-normal: ``u = sigmoid(m + s n)``, ``n ~ N(0, 1)``, then the static
shift ``sigma = k u / (1 + (k - 1) u)`` with ``model.shift`` ``k``, which the checkpoint keeps in its
spec and samples with, so training and sampling put their effort at the same noise levels. The caption is replaced by the empty prompt
with probability ``caption_dropout``, which teaches the unconditional branch classifier-free
guidance needs. Text encoder and transformer train together; an EMA of both is what ships.

The data are a pool of ``num_examples`` rendered training examples (rendered once, in parallel,
held on the device); the batch of step ``k`` is ``rtdmd.data.batch_indices`` of ``k`` and its
noise, sigmas and dropout come from a generator on the training device seeded by
``seed_for(seed, "pretrain", k)``, so a resumed run continues exactly. Unlike sampling, these draws
are per batch, not per sample: a run reproduces for the same batch size and device type (CPU and
CUDA generators differ). One process (the toy teacher trains in minutes on one GPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rtdmd import distributed, run_dir
from rtdmd.backbones.sd3 import sd3_forward
from rtdmd.data import batch_indices
from rtdmd.files import save_image_atomic, write_text_atomic
from rtdmd.flops import count_flops, peak_flops
from rtdmd.flow.path import noisy
from rtdmd.flow.schedules import shift_static
from rtdmd.images import grid, to_uint8
from rtdmd.loggers import JsonlLogger
from rtdmd.rewards import REWARDS
from rtdmd.rewards.base import require_per_image, score
from rtdmd.sampling import SamplerSpec, generate
from rtdmd.seeding import seed_for
from rtdmd.toyworld.backbone import ToyBackbone, ToySpec, build_toy, save_toy
from rtdmd.toyworld.data import eval_metadata, render_examples
from rtdmd.toyworld.text import token_ids
from rtdmd.train.loop import LoopSession, Schedule, run_loop
from rtdmd.train.roles import EMA, trainable


@dataclass(frozen=True)
class PretrainEval:
    """Sample the ``toy-geneval`` prompts with the EMA weights every ``every`` steps (0 = only at
    the end) and report the mean of each listed reward."""

    every: int = 0
    sampler: SamplerSpec = field(default_factory=lambda: SamplerSpec(num_steps=50, eta=0.0, guidance=4.5))
    num_prompts: int = 0  # the first N toy-geneval prompts (0 = all)
    images_per_prompt: int = 1  # the final evaluation's (12: the full toy-geneval protocol)
    rewards: tuple[str, ...] = ("toy-geneval",)
    compute_batch: int = 64


@dataclass(frozen=True)
class PretrainConfig:
    """Config schema of ``rtdmd-train pretrain`` (packaged: ``rtdmd/configs/pretrain/*.yaml``)."""

    model: ToySpec = field(default_factory=ToySpec)
    seed: int = 0
    num_examples: int = 200_000  # rendered training pool
    render_workers: int = 0  # 0 = all CPU cores
    batch_size: int = 256
    steps: int = 10_000
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    warmup_steps: int = 500
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    logit_normal: tuple[float, float] = (0.0, 1.0)  # (m, s) of sigma's logit before the shift
    sigma_floor: float = 0.05  # the loss divides by max(sigma, sigma_floor)^2
    ema_decay: float = 0.999
    precision: Literal["float32", "bfloat16"] = "bfloat16"
    compile: bool = False  # torch.compile the model (CUDA): fuses the many small kernels of a small network
    checkpoint_every: int = 1000
    log_every: int = 100
    eval: PretrainEval = field(default_factory=PretrainEval)
    device: str = "auto"
    run_dir: str = "runs/pretrain-toy"

    def validate(self) -> None:
        if min(self.steps, self.batch_size, self.num_examples, self.checkpoint_every, self.log_every) < 1:
            raise ValueError("steps, batch_size, num_examples, checkpoint_every and log_every must be >= 1")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError("caption_dropout must lie in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise ValueError("ema_decay must lie in [0, 1)")

        require_per_image(self.eval.rewards, "eval.rewards")


class ToyModel(nn.Module):
    """The trained pair as one module (one optimiser, one EMA, one checkpoint role); ``forward``
    returns the transformer's raw output, the ``x0`` prediction."""

    def __init__(self, spec: ToySpec, seed: int) -> None:
        super().__init__()
        self.transformer, self.text_encoder = build_toy(spec, seed)

    def forward(self, x: Tensor, sigma: Tensor, ids: Tensor) -> Tensor:
        hidden, pooled = self.text_encoder.forward_ids(ids)
        return sd3_forward(self.transformer, x, sigma, {"prompt_embeds": hidden, "pooled_prompt_embeds": pooled})


def training_sigmas(u_normal: Tensor, logit_normal: tuple[float, float], shift: float) -> Tensor:
    """``sigma = shift_k(sigmoid(m + s n))`` (SD3's shifted logit-normal density)."""
    m, s = logit_normal
    return shift_static(torch.sigmoid(m + s * u_normal), shift)


def learning_rate(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``lr / 10`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def x0_velocity_loss(x0_hat: Tensor, x0: Tensor, sigma: Tensor, sigma_floor: float) -> Tensor:
    """``mean || x0_hat - x0 ||^2 / max(sigma, floor)^2`` (per-sample weights, mean over all)."""
    weight = sigma.float().clamp(min=sigma_floor).reshape(-1, *[1] * (x0.dim() - 1)) ** -2
    return ((x0_hat.float() - x0.float()) ** 2 * weight).mean()


def flow_matching_loss(model: ToyModel, latents: Tensor, ids: Tensor, cfg: PretrainConfig, step: int) -> Tensor:
    """The clipped velocity loss of :func:`x0_velocity_loss` with this step's seeded draws."""
    gen = torch.Generator(latents.device).manual_seed(seed_for(cfg.seed, "pretrain", step))
    batch = latents.shape[0]
    eps = torch.randn(latents.shape, generator=gen, device=latents.device)
    sigma = training_sigmas(
        torch.randn(batch, generator=gen, device=latents.device),
        cfg.logit_normal,
        cfg.model.shift,
    )
    drop = torch.rand(batch, generator=gen, device=latents.device) < cfg.caption_dropout
    ids = torch.where(drop[:, None], torch.zeros_like(ids), ids)
    return x0_velocity_loss(model(noisy(latents, eps, sigma), sigma, ids), latents, sigma, cfg.sigma_floor)


def render_pool(cfg: PretrainConfig, device: torch.device) -> tuple[Tensor, Tensor]:
    """The training pool: uint8 images ``[N, 3, 64, 64]`` and word ids ``[N, 16]``, on ``device``."""
    import os

    import numpy as np

    images, prompts = render_examples(cfg.seed, 0, cfg.num_examples, cfg.render_workers or os.cpu_count() or 1)
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    return pixels.to(device), token_ids(prompts).to(device)


def evaluate(
    model: ToyModel, cfg: PretrainConfig, device: torch.device, root: Path, step: int, images_per_prompt: int = 1
) -> dict[str, float]:
    """Sample the toy-geneval prompts (``images_per_prompt`` each, sample indices 0, 1, ...) and
    score them with ``cfg.eval.rewards``; toy-geneval also per task."""

    metadata = [m for m in list(eval_metadata())[: cfg.eval.num_prompts or None] for _ in range(images_per_prompt)]
    prompts = [m["prompt"] for m in metadata]
    keys = [(f"toy-geneval/{i // images_per_prompt:05d}", i % images_per_prompt) for i in range(len(prompts))]
    backbone = ToyBackbone(model.transformer.eval(), model.text_encoder.eval(), cfg.model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bfloat16")
    with autocast:
        images = generate(
            backbone,
            model.transformer,
            prompts,
            keys,
            cfg.eval.sampler,
            run_seed=cfg.seed,
            height=64,
            width=64,
            compute_batch=cfg.eval.compute_batch,
        )
    model.train()
    pixels = list(to_uint8(images[:: max(1, images_per_prompt)][:64]))
    save_image_atomic(grid(pixels, 8), root / "eval" / f"step_{step:08d}.png")
    out = {}
    for name in cfg.eval.rewards:
        values = score(REWARDS.get(name)(), images, prompts, metadata)
        out[f"eval/{name}"] = float(values.mean())
        if name == "toy-geneval":  # GenEval's overall score is the mean of its task means
            tags = sorted({m["tag"] for m in metadata})
            per_task = {t: float(values[[m["tag"] == t for m in metadata]].mean()) for t in tags}
            out |= {f"eval/{name}/{t}": v for t, v in per_task.items()}
            out[f"eval/{name}/overall"] = sum(per_task.values()) / len(per_task)
    return out


def batch_latents(pixels: Tensor, index: Tensor) -> Tensor:
    """The training latents of pool rows ``index``: uint8 pixels to [-1, 1], 4x4 pixel-unshuffled."""
    return F.pixel_unshuffle(pixels[index].float() / 127.5 - 1, 4)


def step_flops(model: ToyModel, cfg: PretrainConfig, pixels: Tensor, ids: Tensor, device: torch.device) -> int:
    """Model FLOPs of one training step (forward and backward of one batch), counted on a copy-free
    pass whose gradients are discarded."""

    index = torch.arange(cfg.batch_size, device=device) % len(pixels)
    latents = batch_latents(pixels, index)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bfloat16")

    def one_step() -> None:
        with autocast:
            loss = flow_matching_loss(model, latents, ids[index], cfg, 0)
        loss.backward()

    flops = count_flops(one_step)
    model.zero_grad(set_to_none=True)
    return flops


def train(cfg: PretrainConfig, show_progress: bool = True, export: str | Path | None = None) -> dict:
    """Run (or resume) a pretraining in ``cfg.run_dir``; write the EMA weights (float16) to
    ``<run_dir>/toy_teacher.safetensors`` (or ``export``) at the end; return a summary."""

    world = distributed.init(cfg.device)
    if world.size != 1:
        raise ValueError("pretrain runs in one process (the toy teacher needs one GPU for minutes)")
    device, root = world.device, Path(cfg.run_dir)
    run_dir.prepare(root, cfg)  # `steps` is fixed too: the cosine schedule's horizon depends on it
    t_start = time.perf_counter()
    model = ToyModel(cfg.model, cfg.seed).to(device).train()
    params = trainable(model)
    optimizer = torch.optim.AdamW(
        params.values(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=device.type == "cuda"
    )
    ema = EMA(params, cfg.ema_decay, warmup=True)
    sess = LoopSession(world, root, {"model": (model, optimizer)}, ema)
    stats = root / "stats.jsonl"
    pixels, ids = render_pool(cfg, device)
    t_data = time.perf_counter() - t_start

    flops, peak = step_flops(model, cfg, pixels, ids, device), peak_flops(device)
    forward = torch.compile(model) if cfg.compile else model  # the same parameters: EMA and checkpoints unchanged
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bfloat16")
    step_times: list[float] = []  # of the logged steps, for the run's throughput

    def step(index: int) -> dict[str, float]:
        t0 = time.perf_counter()
        batch = torch.tensor(batch_indices(cfg.seed, index, cfg.batch_size, cfg.num_examples), device=device)
        latents = batch_latents(pixels, batch)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(index, cfg)
        with autocast:
            loss = flow_matching_loss(forward, latents, ids[batch], cfg, index)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(params)
        done = index + 1
        if done % cfg.log_every and done != cfg.steps:
            return {}
        logs = {"loss": loss.item(), "grad_norm": norm.item(), "lr": learning_rate(index, cfg)}
        step_s = time.perf_counter() - t0  # .item() above waited for the step's kernels
        step_times.append(step_s)
        logs["perf/tflops"] = flops / step_s / 1e12
        if peak:
            logs["perf/mfu"] = flops / step_s / peak
        return logs

    def evaluate_ema(done: int) -> dict[str, float]:
        if done == cfg.steps:  # the final evaluation follows the export, below
            return {}
        with ema.swapped_in(params):
            return evaluate(model, cfg, device, root, done)

    start, _ = run_loop(
        sess,
        Schedule(cfg.steps, cfg.eval.every, cfg.log_every, cfg.checkpoint_every),
        step,
        evaluate_ema,
        status="pretrain toy",
        status_keys=("loss",),
        time_key="time/step_s",
        show_progress=show_progress,
    )
    t_train = time.perf_counter() - t_start - t_data
    # the median logged step: the first ones hold compilation and warm-up
    step_s = sorted(step_times)[len(step_times) // 2] if step_times else None
    target = Path(export) if export else root / "toy_teacher.safetensors"
    with ema.swapped_in(params):  # export first: a failing evaluation must not lose the weights
        save_toy(target, model.transformer, model.text_encoder, cfg.model, steps=str(cfg.steps), seed=str(cfg.seed))
        final = evaluate(model, cfg, device, root, cfg.steps, cfg.eval.images_per_prompt)
    with contextlib.closing(JsonlLogger(stats)) as logger:
        logger.log(cfg.steps, final)
    summary = {
        "run_dir": str(root),
        "weights": str(target),
        "start_step": start,
        "steps": cfg.steps,
        "render_s": round(t_data, 1),
        "train_s": round(t_train, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "parameters": sum(p.numel() for p in params.values()),
        "flops_per_step": flops,
        "median_step_s": step_s,
        "tflops": flops / step_s / 1e12 if step_s else None,
        "mfu": flops / step_s / peak if step_s and peak else None,
        "final": final,
        "model": asdict(cfg.model),
    }
    write_text_atomic(root / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
