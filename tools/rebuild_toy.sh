#!/usr/bin/env bash
# Rebuild every shipped toy checkpoint from scratch: the detector's recogniser (CPU), then on one GPU the
# teacher and ToyClip side by side, the AC-DMD and DMD students of that teacher, then the RTDMD student
# and its five ablation arms (stage 2 from the new AC-DMD student), each exported into OUT.
# Ship them with `python -c "from pathlib import Path; from rtdmd.toyworld.weights import register;
# [register(p) for p in Path('OUT').glob('*.safetensors')]"`, update the model cards, rerun
# `rtdmd-bench run`. Extra arguments go to every `rtdmd-train` call (e.g. device=cuda:1).
set -euo pipefail
OUT=${OUT:-toy_rebuild}
RUNS=${RUNS:-runs/toy_rebuild}
for run in pretrain-recognizer-toy pretrain-toy pretrain-clip-toy distill-toy distill-toy-dmd rl-toy-rtdmd; do
  if [ -e "$RUNS/$run" ]; then  # the trainers resume or skip existing runs: not "from scratch"
    echo "error: $RUNS/$run exists; pick a fresh RUNS=... or remove it" >&2
    exit 2
  fi
done
mkdir -p "$OUT"
# the recogniser runs on the CPU (its config has no device); the teacher's evaluation and the RL rewards use
# the shipped one, so ship it (rtdmd.toyworld.weights.register) before the GPU stages when it changed
rtdmd-train pretrain-recognizer --config toy run_dir="$RUNS/pretrain-recognizer-toy"
cp "$RUNS/pretrain-recognizer-toy/toy_recognizer.safetensors" "$OUT/"
rtdmd-train pretrain-clip --config toy run_dir="$RUNS/pretrain-clip-toy" "$@" &
clip=$!
rtdmd-train pretrain --config toy run_dir="$RUNS/pretrain-toy" --export "$OUT/toy_teacher.safetensors" "$@"
wait "$clip"
cp "$RUNS/pretrain-clip-toy/toy_clip.safetensors" "$OUT/"
TEACHER="backbone.source=$OUT/toy_teacher.safetensors"
rtdmd-train distill --config toy "$TEACHER" run_dir="$RUNS/distill-toy" "$@" &
acdmd=$!
rtdmd-train distill --config toy_dmd "$TEACHER" run_dir="$RUNS/distill-toy-dmd" "$@" &
dmd=$!
# both students share the GPU; either failing stops the script (set -e ignores the left of `&&`)
wait "$acdmd" || { kill "$dmd" 2>/dev/null; exit 1; }
wait "$dmd"
rtdmd-train export-lora "$RUNS/distill-toy" --out "$OUT/toy_acdmd.safetensors"
rtdmd-train export-lora "$RUNS/distill-toy-dmd" --out "$OUT/toy_dmd.safetensors"
# stage 2 from the new AC-DMD student: RTDMD and its five ablation arms side by side
pids=()
for arm in rtdmd grpo-all-steps no-bp no-dm bp-only dmd-only; do
  rtdmd-train rl --config toy "$TEACHER" stage1.generator_lora="$OUT/toy_acdmd.safetensors" arm="$arm" \
    run_dir="$RUNS/rl-toy-$arm" "$@" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
rtdmd-train export-lora "$RUNS/rl-toy-rtdmd" --out "$OUT/toy_rtdmd.safetensors"
for arm in grpo-all-steps no-bp no-dm bp-only dmd-only; do
  rtdmd-train export-lora "$RUNS/rl-toy-$arm" --out "$OUT/toy_rtdmd_${arm//-/_}.safetensors"
done
sha256sum "$OUT"/*.safetensors
