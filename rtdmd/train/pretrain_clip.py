"""``rtdmd-train pretrain-clip``: contrastive training of :class:`~rtdmd.toyworld.clip.ToyClip` on the toy world.

* data: a pool of ``num_examples`` rendered training examples (``render_examples``; held-out from the
  evaluation prompts), kept as uint8 on the device; step ``k`` draws its batch (with replacement),
  its hard negatives and its pixel noise from ``seed_for(seed, "clip", k)``, so a run is a function
  of its config;
* loss: symmetric InfoNCE over the batch (pairs whose captions mean the same scene are not counted
  as negatives), plus ``hard_negatives`` x a cross-entropy of each image's true caption against
  ``negatives_per_caption`` captions that differ from it in one compositional detail (a colour, the
  colours' binding, a shape, the relation, the count): in-batch negatives alone rarely differ in one
  detail, and a scorer that misses details is a poor reward;
* learning rate: linear warm-up, then cosine decay to 0; AdamW (no decay on biases, norms, the scale);
* held-out evaluation on the ``toy-geneval`` prompts with ground-truth renders: retrieval top-1 and
  how often the true caption beats each of its one-detail negatives, per kind.

The run directory gets ``config.yaml``, ``env.json``, ``stats.jsonl``, ``summary.json`` and the
final checkpoint (``output``, relative to ``run_dir`` unless absolute). A finished run is skipped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rtdmd import distributed, run_dir
from rtdmd.config import to_dict
from rtdmd.files import write_text_atomic
from rtdmd.seeding import seed_for
from rtdmd.toyworld.clip import KINDS, ToyClip, ToyClipArch, canonical, caption_negatives
from rtdmd.toyworld.data import eval_metadata, render_examples
from rtdmd.toyworld.prompts import scene_for
from rtdmd.toyworld.text import token_ids
from rtdmd.toyworld.world import render
from rtdmd.train.loop import LoopSession, Schedule, run_loop
from rtdmd.train.roles import EMA


@dataclass(frozen=True)
class ToyClipConfig:
    """Config schema of ``rtdmd-train pretrain-clip`` (packaged YAMLs: ``rtdmd/configs/pretrain_clip/*.yaml``)."""

    arch: ToyClipArch = field(default_factory=ToyClipArch)
    seed: int = 0
    num_examples: int = 100_000  # size of the rendered training pool
    render_workers: int = 14
    batch_size: int = 512
    steps: int = 4000
    lr: float = 2e-3  # peak learning rate
    weight_decay: float = 0.05
    warmup: int = 200  # steps of linear warm-up
    grad_clip: float = 1.0  # global gradient norm (0 = off)
    # binding (which colour is on which shape) is learnt, and generalises to held-out compositions, only
    # with a strong hard-negative term: at weight 1 with 4 negatives it stayed at chance
    hard_negatives: float = 3.0  # weight of the hard-negative term
    negatives_per_caption: int = 8
    noise_std: float = 0.02  # pixel noise up to this std (images in [0, 1]): generated images are never exact renders
    device: str = "auto"
    precision: Literal["float32", "bfloat16"] = "bfloat16"  # autocast of the forward passes
    run_dir: str = "runs/pretrain-clip-toy"
    log_every: int = 50
    eval_every: int = 0  # held-out evaluation every N steps (0 = only at the end)
    checkpoint_every: int = 500  # a killed run resumes from the last one
    output: str = "toy_clip.safetensors"

    def validate(self) -> None:
        if (
            min(
                self.num_examples,
                self.batch_size,
                self.steps,
                self.log_every,
                self.negatives_per_caption,
                self.checkpoint_every,
            )
            < 1
        ):
            raise ValueError(
                "num_examples, batch_size, steps, log_every, negatives_per_caption and checkpoint_every must be >= 1"
            )
        if self.batch_size > self.num_examples:
            raise ValueError(f"batch_size {self.batch_size} exceeds the pool of {self.num_examples} examples")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup < 0 or self.hard_negatives < 0 or self.noise_std < 0:
            raise ValueError("lr must be > 0; weight_decay, warmup, hard_negatives and noise_std >= 0")


# ---------------------------------------------------------------- hard negatives


@dataclass
class NegativeTable:
    """Hard negatives of a list of captions, as token ids on the device. Caption ``u``'s negatives
    are grouped by kind; draw ``j`` of a caption with ``n`` kinds takes kind ``j`` if ``j < n`` (every
    kind the caption admits, every step: the one binding swap is as present as the sixteen colour
    replacements), else a kind uniformly; then a negative of that kind uniformly."""

    ids: Tensor  # [M, L] token ids of the distinct negative captions
    group_rows: Tensor  # [R] rows of ``ids``, grouped
    group_start: Tensor  # [G] start of each group in ``group_rows``
    group_size: Tensor  # [G]
    groups: Tensor  # [U, len(KINDS)] group ids of each caption's kinds (padded)
    num_groups: Tensor  # [U]

    @classmethod
    def build(cls, captions: list[str], device: str | torch.device = "cpu") -> NegativeTable:
        texts: dict[str, int] = {}
        rows, starts, sizes, groups, counts = [], [], [], [], []
        for caption in captions:
            kinds = []
            for negatives in caption_negatives(caption).values():
                kinds.append(len(starts))
                starts.append(len(rows))
                sizes.append(len(negatives))
                rows += [texts.setdefault(n, len(texts)) for n in negatives]
            if not kinds:
                raise ValueError(f"caption {caption!r} has no hard negatives")
            groups.append(kinds + [kinds[0]] * (len(KINDS) - len(kinds)))
            counts.append(len(kinds))
        as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        return cls(
            ids=token_ids(list(texts)).to(device),
            group_rows=as_long(rows),
            group_start=as_long(starts),
            group_size=as_long(sizes),
            groups=as_long(groups),
            num_groups=as_long(counts),
        )

    def sample(self, caption_index: Tensor, count: int, generator: torch.Generator) -> Tensor:
        """``[B, count, L]`` token ids: ``count`` negatives of each caption (draws from ``generator``, CPU)."""
        u = caption_index.to(self.groups.device)
        pick_kind, pick_row = torch.rand(2, len(u), count, generator=generator).to(u.device)
        slot = torch.arange(count, device=u.device).expand(len(u), count)
        n = self.num_groups[u, None]
        kind = torch.where(slot < n, slot, (pick_kind * n).long())
        group = self.groups[u[:, None], kind]
        offset = torch.minimum((pick_row * self.group_size[group]).long(), self.group_size[group] - 1)
        return self.ids[self.group_rows[self.group_start[group] + offset]]


# ---------------------------------------------------------------- losses and schedule


def contrastive_loss(image: Tensor, text: Tensor, scale: Tensor, same: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE ``(CE(s I T^T, diag) + CE(s T I^T, diag)) / 2`` of unit embeddings ``[B, D]``;
    ``same[i, j]`` (i != j) marks pairs whose captions mean the same, left out of the softmax."""
    logits = scale * image @ text.T
    if same is not None:
        logits = logits.masked_fill(same & ~torch.eye(len(image), dtype=torch.bool, device=image.device), -torch.inf)
    target = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def hard_negative_loss(image: Tensor, text: Tensor, negatives: Tensor, scale: Tensor) -> Tensor:
    """``mean_i CE([s <I_i, T_i>, s <I_i, N_i1>, ..., s <I_iK>], 0)`` with negatives ``[B, K, D]``."""
    positive = (image * text).sum(-1, keepdim=True)
    logits = scale * torch.cat([positive, torch.einsum("bd,bkd->bk", image, negatives)], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(image), dtype=torch.long, device=image.device))


def learning_rate(cfg: ToyClipConfig, step: int) -> float:
    """``lr min(1, (k+1)/warmup) (1 + cos(pi p)) / 2`` with ``p = max(0, k - warmup) / max(1, steps - warmup)``."""
    ramp = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    progress = max(0, step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * ramp * (1 + math.cos(math.pi * progress)) / 2


# ---------------------------------------------------------------- evaluation


@dataclass
class EvalSet:
    """Ground-truth renders of the evaluation prompts and every one-detail negative of each."""

    images: Tensor  # [N, 3, 64, 64] in [0, 1]
    prompts: list[str]
    negatives: list[str]
    owner: Tensor  # [M] index of the prompt each negative belongs to
    kind: list[str]


def eval_set(seed: int, device: torch.device) -> EvalSet:

    metadata = eval_metadata()
    pixels = np.stack([render(scene_for(m, seed_for(seed, "clip-eval", i))) for i, m in enumerate(metadata)])
    images = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float() / 255
    prompts = [m["prompt"] for m in metadata]
    negatives, owner, kind = [], [], []
    for i, prompt in enumerate(prompts):
        for k, texts in caption_negatives(prompt).items():
            negatives += texts
            owner += [i] * len(texts)
            kind += [k] * len(texts)
    return EvalSet(images, prompts, negatives, torch.tensor(owner, device=device), kind)


@torch.no_grad()
def evaluate(model: ToyClip, data: EvalSet) -> dict[str, float]:
    """Retrieval top-1 among the evaluation prompts (a caption of the same meaning counts as a hit)
    both ways, mean cosine of true and negative captions, and the fraction of (image, negative)
    pairs where the true caption scores higher, overall and per kind."""
    was_training = model.training
    model.eval()
    image = model.encode_image(data.images)
    text = model.encode_text(data.prompts)
    negative = model.encode_text(data.negatives)
    model.train(was_training)
    cos = image @ text.T
    meaning = [canonical(p) for p in data.prompts]
    same = torch.tensor([[a == b for b in meaning] for a in meaning], device=cos.device)
    true = cos.diagonal()
    neg = (image[data.owner] * negative).sum(-1)
    wins = (true[data.owner] > neg).float()
    out = {
        "eval/retrieval_i2t_top1": float(same[torch.arange(len(cos)), cos.argmax(1)].float().mean()),
        "eval/retrieval_t2i_top1": float(same[cos.argmax(0), torch.arange(len(cos))].float().mean()),
        "eval/cos_true": float(true.mean()),
        "eval/cos_negative": float(neg.mean()),
        "eval/true_beats_negative": float(wins.mean()),
    }
    for k in KINDS:
        rows = [j for j, kind in enumerate(data.kind) if kind == k]
        if rows:
            out[f"eval/true_beats_{k}"] = float(wins[rows].mean())
    return out


# ---------------------------------------------------------------- training


@dataclass
class Pool:
    images: Tensor  # [N, 64, 64, 3] uint8 on the device
    caption: Tensor  # [N] index into ``captions``
    captions: list[str]
    caption_ids: Tensor  # [U, L] token ids
    meaning: Tensor  # [U] canonical-meaning id of each caption


def build_pool(cfg: ToyClipConfig, device: torch.device) -> Pool:

    pixels, prompts = render_examples(cfg.seed, 0, cfg.num_examples, cfg.render_workers)
    index: dict[str, int] = {}
    caption = torch.tensor([index.setdefault(p, len(index)) for p in prompts], dtype=torch.long)
    captions = list(index)
    meanings: dict[str, int] = {}
    meaning = torch.tensor([meanings.setdefault(canonical(c), len(meanings)) for c in captions], dtype=torch.long)
    return Pool(
        images=torch.from_numpy(pixels).to(device),
        caption=caption.to(device),
        captions=captions,
        caption_ids=token_ids(captions).to(device),
        meaning=meaning.to(device),
    )


@dataclass
class Batch:
    images: Tensor  # [B, 3, 64, 64] in [0, 1]
    texts: Tensor  # [B, L] token ids
    negatives: Tensor  # [B, K, L] token ids
    meaning: Tensor  # [B]


def draw_batch(cfg: ToyClipConfig, pool: Pool, negatives: NegativeTable, step: int) -> Batch:
    """Step ``step``'s examples (with replacement), hard negatives and pixel noise, from
    ``seed_for(seed, "clip", step, ...)``."""
    device = pool.images.device
    gen = torch.Generator().manual_seed(seed_for(cfg.seed, "clip", step))
    index = torch.randint(len(pool.images), (cfg.batch_size,), generator=gen).to(device)
    u = pool.caption[index]
    images = pool.images[index].permute(0, 3, 1, 2).float() / 255
    # the pixel noise (millions of draws per step) comes from a generator on the device: on the CPU
    # it would take longer than the GPU step itself
    noise_gen = torch.Generator(device).manual_seed(seed_for(cfg.seed, "clip", step, "noise"))
    noise_std = torch.rand(cfg.batch_size, 1, 1, 1, generator=gen).to(device) * cfg.noise_std
    images = (images + torch.randn(images.shape, generator=noise_gen, device=device) * noise_std).clamp(0, 1)
    return Batch(images, pool.caption_ids[u], negatives.sample(u, cfg.negatives_per_caption, gen), pool.meaning[u])


def train_step(
    cfg: ToyClipConfig, model: ToyClip, pool: Pool, negatives: NegativeTable, step: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of step ``step`` and its diagnostics."""
    batch = draw_batch(cfg, pool, negatives, step)
    n, k = batch.negatives.shape[:2]
    with torch.autocast(batch.images.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bfloat16"):
        image = model.encode_image(batch.images)
        text = model.encode_text(torch.cat([batch.texts, batch.negatives.flatten(0, 1)]))
    image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    text, negative = text[:n], text[n:].view(n, k, -1)
    scale = model.scale()
    loss_batch = contrastive_loss(image, text, scale, same=batch.meaning[:, None] == batch.meaning[None, :])
    loss_hard = hard_negative_loss(image, text, negative, scale)
    with torch.no_grad():
        true = (image * text).sum(-1)
        batch_top1 = (batch.meaning[(image @ text.T).argmax(1)] == batch.meaning).float().mean()
        hard_top1 = (true > torch.einsum("bd,bkd->bk", image, negative).amax(1)).float().mean()
    logs = {
        "loss/contrastive": loss_batch.detach(),
        "loss/hard_negative": loss_hard.detach(),
        "train/batch_top1": batch_top1,
        "train/hard_top1": hard_top1,
        "train/logit_scale": scale.detach(),
    }
    return loss_batch + cfg.hard_negatives * loss_hard, logs


def _optimizer(cfg: ToyClipConfig, model: ToyClip) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def train(cfg: ToyClipConfig, show_progress: bool = True) -> dict:
    """Train (or resume) ToyClip in ``cfg.run_dir``; returns a summary (final held-out metrics, wall
    times, paths). Batches are drawn by step number, so a resumed run equals one that never stopped."""
    world = distributed.init(cfg.device)  # a bad device must not leave a run directory behind
    device = world.device
    root = run_dir.prepare(cfg.run_dir, cfg)
    output = Path(cfg.output) if Path(cfg.output).is_absolute() else root / cfg.output
    summary_file = root / "summary.json"
    if summary_file.is_file() and output.is_file():
        return json.loads(summary_file.read_text()) | {"skipped": True}
    t_start = time.perf_counter()
    pool = build_pool(cfg, device)
    negatives = NegativeTable.build(pool.captions, device=device)
    held_out = eval_set(cfg.seed, device)
    setup_seconds = time.perf_counter() - t_start  # mostly rendering the pool

    model = ToyClip(cfg.arch, seed=cfg.seed).to(device).train()
    optimizer = _optimizer(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad]
    sess = LoopSession(world, root, {"model": (model, optimizer)}, EMA({}, 0.0))
    evaluations: list[dict] = []

    def step(index: int) -> dict[str, float]:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, index)
        loss, logs = train_step(cfg, model, pool, negatives, index)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {k: float(v) for k, v in logs.items()} | {
            "train/lr": learning_rate(cfg, index),
            "train/grad_norm": float(grad_norm),
        }

    def held_out_metrics(done: int) -> dict[str, float]:
        evaluations.append(evaluate(model, held_out))
        return evaluations[-1]

    t_train = time.perf_counter()
    run_loop(
        sess,
        Schedule(cfg.steps, cfg.eval_every or cfg.steps, cfg.log_every, cfg.checkpoint_every),
        step,
        held_out_metrics,
        status="pretrain toy-clip",
        status_keys=("loss/contrastive", "loss/hard_negative"),
        time_key="time/step_s",
        show_progress=show_progress,
    )
    train_seconds = time.perf_counter() - t_train
    final = (
        evaluations[-1] if evaluations and cfg.steps % (cfg.eval_every or cfg.steps) == 0 else evaluate(model, held_out)
    )
    summary = {
        "run_dir": str(root),
        "checkpoint": str(output),
        "steps": cfg.steps,
        "examples": cfg.num_examples,
        "parameters": sum(p.numel() for p in model.parameters()),
        "setup_seconds": round(setup_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "seconds": round(time.perf_counter() - t_start, 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "final": final,
    }
    model.cpu().save(output, extra={"config": json.dumps(to_dict(cfg)), "metrics": json.dumps(final)})
    write_text_atomic(summary_file, json.dumps(summary, indent=2))
    return summary
