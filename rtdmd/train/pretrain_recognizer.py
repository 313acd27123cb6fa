"""``rtdmd-train pretrain-recognizer``: train the toy detector's recogniser (:mod:`rtdmd.toyworld.recognizer`).

* data: crops of ``num_scenes`` generated scenes (:func:`~rtdmd.toyworld.recognizer.training_set`,
  clean, degraded and malformed objects); the last ``calibration_fraction`` of the scenes is held out;
* training: cross-entropy, AdamW, linear warm-up then cosine decay, batches drawn from
  ``seed_for(seed, "recognizer-batch", epoch)`` permutations, float32 on the CPU (the model is small:
  minutes on two cores);
* calibration: the temperature that minimises the held-out negative log-likelihood (``fit_temperature``);
  the held-out accuracy and expected calibration error (15 bins) before and after go to ``summary.json``.

The run directory gets ``config.yaml``, ``env.json``, ``stats.jsonl``, ``summary.json`` and ``output``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from rtdmd import distributed, run_dir
from rtdmd.files import write_text_atomic
from rtdmd.seeding import seed_for
from rtdmd.toyworld.recognizer import CLASSES, Recognizer, RecognizerArch
from rtdmd.toyworld.recognizer_data import fit_temperature, training_set
from rtdmd.train.loop import LoopSession, Schedule, run_loop
from rtdmd.train.roles import EMA


@dataclass(frozen=True)
class RecognizerConfig:
    """Config schema of ``rtdmd-train pretrain-recognizer`` (packaged: ``rtdmd/configs/pretrain_recognizer/``)."""

    arch: RecognizerArch = field(default_factory=RecognizerArch)
    seed: int = 0
    num_scenes: int = 80_000
    calibration_fraction: float = 0.1
    workers: int = 0  # data processes (0 = all CPU cores)
    epochs: int = 5
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 200
    threads: int = 0  # torch CPU threads (0 = torch's default)
    run_dir: str = "runs/pretrain-recognizer-toy"
    output: str = "toy_recognizer.safetensors"

    def validate(self) -> None:
        if min(self.num_scenes, self.epochs, self.batch_size) < 1:
            raise ValueError("num_scenes, epochs and batch_size must be >= 1")
        if not 0 < self.calibration_fraction < 1:
            raise ValueError("calibration_fraction must lie in (0, 1)")


def expected_calibration_error(probabilities: Tensor, labels: Tensor, bins: int = 15) -> float:
    """``sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|`` over equal-width confidence bins."""
    confidence, predicted = probabilities.max(-1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            total += float(inside.double().mean() * (correct[inside].mean() - confidence[inside].mean()).abs())
    return total


def _learning_rate(step: int, total: int, cfg: RecognizerConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)))


@torch.no_grad()
def _logits(model: Recognizer, crops: Tensor) -> Tensor:
    return torch.cat([model(crops[i : i + 2048]) for i in range(0, len(crops), 2048)])


def train(cfg: RecognizerConfig) -> dict:
    """Train (or resume, epoch by epoch), calibrate and save the recogniser; returns (and writes) the
    summary. Each epoch's batch order is seeded by its number, so a resumed run equals a straight one."""
    root = Path(cfg.run_dir)
    run_dir.prepare(root, cfg)
    if (root / "summary.json").is_file():  # a finished run is kept, not retrained
        return json.loads((root / "summary.json").read_text())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    held = max(1, int(cfg.num_scenes * cfg.calibration_fraction))
    workers = cfg.workers or os.cpu_count() or 1
    crops, labels = training_set(cfg.seed, 0, cfg.num_scenes - held, workers)
    val_crops, val_labels = training_set(cfg.seed, cfg.num_scenes - held, held, workers)
    t_data = time.perf_counter() - t0
    torch.manual_seed(cfg.seed)
    model = Recognizer(cfg.arch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(crops) // cfg.batch_size
    total = cfg.epochs * steps_per_epoch

    def epoch_step(epoch: int) -> dict[str, float]:
        order = torch.randperm(
            len(crops), generator=torch.Generator().manual_seed(seed_for(cfg.seed, "recognizer-batch", epoch))
        )
        running = 0.0
        for k in range(steps_per_epoch):
            index = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(epoch * steps_per_epoch + k, total, cfg)
            loss = F.cross_entropy(model(crops[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item()
        model.eval()
        accuracy = float((_logits(model, val_crops).argmax(-1) == val_labels).double().mean())
        model.train()
        return {
            "train/steps": (epoch + 1) * steps_per_epoch,
            "loss": running / steps_per_epoch,
            "val/accuracy": accuracy,
        }

    world = distributed.init("cpu")  # a small CNN on CPU crops: one process
    sess = LoopSession(world, root, {"model": (model, optimizer)}, EMA({}, 0.0))
    schedule = Schedule(cfg.epochs, eval_every=0, log_every=1, checkpoint_every=1)
    run_loop(
        sess,
        schedule,
        epoch_step,
        lambda done: {},
        status="pretrain recognizer",
        status_keys=("loss",),
        time_key="time/epoch_s",
        show_progress=False,
    )
    model.eval()
    logits = _logits(model, val_crops)
    temperature = fit_temperature(logits, val_labels)
    model.temperature.fill_(temperature)
    raw, calibrated = torch.softmax(logits.double(), -1), torch.softmax(logits.double() / temperature, -1)
    target = Path(cfg.output) if Path(cfg.output).is_absolute() else root / cfg.output
    model.save(target, {"temperature": f"{temperature:.6f}", "seed": str(cfg.seed)})
    summary = {
        "output": str(target),
        "train_crops": len(crops),
        "calibration_crops": len(val_crops),
        "label_counts": dict(zip(CLASSES, labels.bincount(minlength=len(CLASSES)).tolist(), strict=True)),
        "temperature": temperature,
        "val_accuracy": float((logits.argmax(-1) == val_labels).double().mean()),
        "ece_before": expected_calibration_error(raw, val_labels),
        "ece_after": expected_calibration_error(calibrated, val_labels),
        "data_s": round(t_data, 1),
        "train_s": round(time.perf_counter() - t0 - t_data, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "arch": asdict(cfg.arch),
    }
    write_text_atomic(root / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
