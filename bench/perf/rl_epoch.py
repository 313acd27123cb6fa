"""Seconds per stage-2 (RTDMD) epoch and peak memory, one GPU's share, at real model size with random weights.

One GPU's share of an official epoch: ``iterations_per_epoch`` (16) sampler iterations of the
packaged config's per-GPU batch (SD3.5-M 9, FLUX.2-klein 4B 6 images), each rolled out over 4 CPS
steps, decoded and scored; the fake-score step; the generator's 16 x 3 micro-steps (PPO on 2
SubGRPO steps, AC-DMD and reward back-propagation through the VAE on the final step); one
optimiser step. Exactly ``rtdmd-train rl``'s ``run_epoch`` with the packaged config's values
(LoRA rank 32, bf16 autocast, gradient checkpointing, BP/fake chunks), the released checkpoints'
component sizes (``bench/perf/real_sizes.py``) and the real reward architectures with random
weights: CLIPScore (CLIP ViT-L/14), PickScore (CLIP ViT-H/14), HPSv2.1 (open_clip ViT-H-14).
GenEval's partial score (the fourth training reward) joins with ``--geneval``: the ported detector
in this process and the colour CLIP, random at released size, on the config's GenEval prompts. The
group size is set to the per-GPU batch (one prompt per GPU and iteration; ``--group``): it changes
only the advantages' grouping, not the work.

    python bench/perf/rl_epoch.py --family sd35m --out rl_epoch_sd35m.json [--epochs 2]
        [--variant NAME:OVERRIDES ...]
    torchrun --nproc_per_node 8 bench/perf/rl_epoch.py --family sd35m --variant fsdp:distributed=fsdp

Under ``torchrun`` every process takes ``--batch`` images per iteration (the global batch is ``batch
x processes``, split by the training code's seeding contract) and a variant's ``distributed=ddp|fsdp``
wraps the trainable roles (the packaged configs' default is DDP; one process wraps nothing). Rank 0
prints and writes; losses are means over the ranks, the peak memory the fullest GPU's.

Each ``--variant`` (``key=value`` overrides separated by ``;``) is measured on the same backbone and
reward models in the same process, eager ones first (a compiled teacher stays compiled): by default
the packaged config (``plain``) and the fast path (``fast``: teacher, fake score and VAE decoder
compiled, no gradient checkpointing, smaller fake and reward-BP chunks, which change only the
memory). Each epoch's time is split into its phases: rollouts (sampling, decoding, scoring), the
fake-score step and the generator update.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import rtdmd.train.rl_step as rl_step  # noqa: E402
from bench.perf.distill_step import (  # noqa: E402
    PROMPTS,
    build_backbone,
    parse_variants,
    peak_memory_gib,
    release_memory,
)
from rtdmd import distributed  # noqa: E402
from rtdmd.config import load  # noqa: E402
from rtdmd.train.rl_config import RLConfig  # noqa: E402

BATCH = {"sd35m": 9, "sd3m": 2, "flux2_4b": 6, "flux2_9b": 3, "flux1_dev": 3}  # per GPU, rtdmd_method.md §6.2
FAST = "compile=[teacher,fake,vae];gradient_checkpointing=false;fake_chunk=4;bp.chunk=3"
VARIANTS = ("plain:", f"fast:{FAST}")
PHASES = ("rollout_batch", "fake_update", "generator_update")


def random_geneval(device: torch.device) -> dict:
    """GenEval's partial score (the official training reward) on the ported detector (Mask2Former
    Swin-S, in this process) and the colour CLIP (ViT-L/14 QuickGELU), both random at released size."""
    import open_clip

    from rtdmd.geneval.colour import ClipColorClassifier
    from rtdmd.geneval.m2f.detector import PortDetector
    from rtdmd.geneval.m2f.model import Mask2Former
    from rtdmd.rewards.geneval_real import MIN_SCORE, GenEvalPartial, GenEvalScorer

    arch = "ViT-L-14-quickgelu"
    colour = ClipColorClassifier(open_clip.create_model(arch), open_clip.get_tokenizer(arch), device=device)
    detector = PortDetector(Mask2Former(), device, batch_size=16, min_score=MIN_SCORE)
    return {
        "geneval-partial": GenEvalPartial(scorer=GenEvalScorer(detector, colour, batch_colours=True))
    }  # as packaged


def write_random_rewards(root: Path, tiny: bool) -> dict:
    """Random weights of CLIPScore, PickScore and HPSv2.1 at released sizes, written under ``root``
    (before the process group exists: transformers then saves model files on rank 0 only); returns
    HPSv2.1's architecture."""
    from bench.perf.rewards import CLIP_H14, CLIP_L14
    from rtdmd.rewards import clip as clip_rewards
    from rtdmd.rewards import hps
    from rtdmd.testing import save_tiny_clip

    l14, h14 = ({}, {}) if tiny else ({"sizes": CLIP_L14}, {"sizes": CLIP_H14})
    save_tiny_clip(root / clip_rewards.CLIP_L14.repo, projection_dim=768, **l14)
    save_tiny_clip(
        root / clip_rewards.PICKSCORE_V1.repo,
        root / clip_rewards.CLIP_H14_PROCESSOR.repo,
        projection_dim=1024,
        logit_scale=4.6052,
        **h14,
    )
    model_cfg = hps.VIT_H_14
    if tiny:
        model_cfg = {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
        }
    path = root / hps.HPS_REPO / hps.HPS_V21_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": hps.build_clip(model_cfg).half().state_dict()}, path)
    return model_cfg


def random_rewards(root: Path, hps_cfg: dict) -> dict:
    """CLIPScore, PickScore (/26) and HPSv2.1 on the weights :func:`write_random_rewards` wrote."""
    from rtdmd.rewards import clip as clip_rewards
    from rtdmd.rewards import hps

    return {
        "clipscore": clip_rewards.ClipScore(root, dtype="bfloat16"),
        "pickscore": clip_rewards.PickScore(root, dtype="bfloat16", scale="div26"),
        "hpsv21": hps.HpsV21(root, dtype="bfloat16", model_cfg=hps_cfg),
    }


def variant_config(
    overrides: list[str], family: str, tiny: bool, iterations: int, geneval: bool, batch: int, group: int
) -> RLConfig:
    """The packaged config with ``overrides``, ``batch`` images per iteration (all processes together)
    in groups of ``group``; without ``geneval`` the GenEval reward is dropped and the prompts are plain
    (GenEval's need the training file's metadata)."""
    cfg = load(RLConfig, family, overrides, group="rl")
    prompts = {} if geneval else {"prompt_file": "", "prompts": PROMPTS}
    return dataclasses.replace(
        cfg,
        **prompts,
        stage1=dataclasses.replace(cfg.stage1, run=""),  # random weights: no stage-1 LoRAs
        generator=dataclasses.replace(cfg.generator, source=""),
        rewards=tuple(t for t in cfg.rewards if geneval or t.name != "geneval-partial"),
        grpo=dataclasses.replace(cfg.grpo, group_size=group),
        batch_size=batch,
        iterations_per_epoch=iterations or cfg.iterations_per_epoch,
        eval=dataclasses.replace(cfg.eval, every=0),
        height=64 if tiny else cfg.height,
        width=64 if tiny else cfg.width,
    )


class PhaseTimer:
    """Wall time of each phase of ``run_epoch`` (synchronised), by wrapping the module's functions."""

    def __init__(self, sync) -> None:
        self.sync, self.seconds = sync, dict.fromkeys(PHASES, 0.0)
        for name in PHASES:
            setattr(rl_step, name, self._timed(name, getattr(rl_step, name)))

    def _timed(self, name, fn):
        def run(*args, **kwargs):
            self.sync()
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.seconds[name] += time.perf_counter() - t
            return out

        return run

    def take(self) -> dict[str, float]:
        taken, self.seconds = self.seconds, dict.fromkeys(PHASES, 0.0)
        return taken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=sorted(BATCH))
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs after the warm-up")
    parser.add_argument("--warmup-iterations", type=int, default=2, help="sampler iterations of the warm-up epoch")
    parser.add_argument(
        "--iterations", type=int, default=0, help="sampler iterations per epoch (default: the config's 16)"
    )
    parser.add_argument("--variant", action="append", help=f"NAME:OVERRIDES (repeatable; default: {VARIANTS})")
    parser.add_argument(
        "--geneval",
        action="store_true",
        help="keep the config's GenEval partial reward (ported detector, random weights) and its GenEval prompts",
    )
    parser.add_argument("--batch", type=int, default=0, help="images per GPU per iteration (default: the official)")
    parser.add_argument("--group", type=int, default=0, help="GRPO group size (default: the per-GPU batch)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU smoke test of this script")
    parser.add_argument("--out", default="rl_epoch.json")
    args = parser.parse_args()
    variants = parse_variants(parser, args.variant or VARIANTS)

    # each process writes and loads its own copy (about 7.6 GB at released sizes), deleted once loaded
    with tempfile.TemporaryDirectory() as folder:
        hps_cfg = write_random_rewards(Path(folder), args.tiny)
        t0 = time.perf_counter()
        rewards = random_rewards(Path(folder), hps_cfg)
        rewards_s = time.perf_counter() - t0
    world = distributed.init("auto")
    device = world.device
    console = Console(quiet=not world.is_main)  # rank 0 reports
    per_gpu = args.batch or BATCH[args.family]
    t0 = time.perf_counter() - rewards_s
    backbone = build_backbone(args.family, args.tiny, device)
    if args.geneval:
        rewards |= random_geneval(device)
    build_s = time.perf_counter() - t0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timer = PhaseTimer(sync)
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {p: metadata.version(p) for p in ("torch", "diffusers", "transformers", "peft", "open_clip_torch")},
        "family": args.family,
        "processes": world.size,
        "sizes": "tiny" if args.tiny else "released",
        "build_seconds": build_s,
        "variants": [],
    }
    table = Table(title=f"RTDMD epoch · {args.family} · {world.size} x {record['device']}")
    for col in ("variant", "warm-up s", "s / epoch", "rollouts", "fake", "generator", "peak GiB", "max |ratio-1|"):
        table.add_column(col, justify="right")
    for name, overrides in variants:
        cfg = variant_config(
            overrides,
            args.family,
            args.tiny,
            args.iterations,
            args.geneval,
            per_gpu * world.size,
            args.group or per_gpu,
        )
        record |= {
            "resolution": cfg.height,
            "batch_per_gpu": per_gpu,
            "group_size": cfg.grpo.group_size,
            "iterations_per_epoch": cfg.iterations_per_epoch,
            "images_per_gpu_per_epoch": per_gpu * cfg.iterations_per_epoch,
            "rewards": [t.name for t in cfg.rewards],
        }
        try:
            sess = rl_step.build_session(cfg, world, Path(tempfile.mkdtemp()), backbone=backbone, rewards=rewards)
            sess.cfg = dataclasses.replace(cfg, iterations_per_epoch=args.warmup_iterations)
            t = time.perf_counter()
            rl_step.run_epoch(sess, 0)  # warm-up: compilation, kernels, allocator, cuDNN/cuBLAS choices
            sync()
            warmup_s = time.perf_counter() - t
            sess.cfg = cfg
            timer.take()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            rows = []
            for epoch in range(1, args.epochs + 1):
                t = time.perf_counter()
                logs = distributed.reduce_logs(rl_step.run_epoch(sess, epoch))  # means over the ranks
                sync()
                rows.append(
                    {
                        "epoch": epoch,
                        "seconds": time.perf_counter() - t,
                        "phase_seconds": timer.take(),
                        "trained_steps": [k for k in range(3) if int(logs["train/trained_steps"]) >> k & 1],
                        "ppo_ratio_deviation_max": logs.get("ppo/ratio_deviation_max"),
                        "loss_fake": logs.get("loss/fake"),
                        "loss_dm": logs.get("loss/dm"),
                        "loss_bp": logs.get("loss/bp"),
                    }
                )
        except torch.OutOfMemoryError as err:  # a variant that does not fit is a result, not a crash
            if world.size > 1:  # the other ranks wait in a collective: stop them all
                raise
            record["variants"].append({"name": name, "overrides": overrides, "error": str(err).splitlines()[0]})
            table.add_row(name, "", "out of memory", "", "", "", "", "")
            sess = None
            release_memory(device)
            continue
        peak_gib = peak_memory_gib(device)
        mean_s = sum(r["seconds"] for r in rows) / len(rows)
        phases = {k: sum(r["phase_seconds"][k] for r in rows) / len(rows) for k in PHASES}
        record["variants"].append(
            {
                "name": name,
                "overrides": overrides,
                "gradient_checkpointing": cfg.gradient_checkpointing,
                "compile": list(cfg.compile),
                "distributed": cfg.distributed if world.size > 1 else "none",
                "warmup_seconds": warmup_s,
                "epochs": rows,
                "seconds_per_epoch": mean_s,
                "phase_seconds": phases,
                "peak_memory_gib": peak_gib,
            }
        )
        deviation = max((r["ppo_ratio_deviation_max"] or 0.0) for r in rows)
        table.add_row(
            name,
            f"{warmup_s:.1f}",
            f"{mean_s:.1f}",
            *(f"{phases[k]:.1f}" for k in PHASES),
            "-" if peak_gib is None else f"{peak_gib:.1f}",
            f"{deviation:.2g}",
        )
        if world.is_main:  # each variant kept if a later one is cut off
            Path(args.out).write_text(json.dumps(record, indent=2))
        del sess
        release_memory(device)
    console.print(table)
    if world.is_main:
        Path(args.out).write_text(json.dumps(record, indent=2))
    distributed.shutdown()


if __name__ == "__main__":
    main()
