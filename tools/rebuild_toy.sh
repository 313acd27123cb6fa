#!/usr/bin/env bash
# Rebuild the shipped toy checkpoints from scratch, stage by stage, into OUT:
#   recognizer  the detector's recogniser (CPU, ~12 min on 2 cores, ~3 min on 16)
#   teacher     the teacher and ToyClip side by side on one GPU (~6 min on an H200)
#   students    the AC-DMD and DMD students of OUT's (else the shipped) teacher, side by side (~6 min on an H200)
#   rl          the RTDMD student and its five ablation arms from OUT's (else the shipped) AC-DMD student, side
#               by side (~7.5 min on an H200 with 16 CPU cores: the toy detector scores the rollouts on the CPU)
# STAGES picks them (default: all, in this order), so a rebuild can span several GPU calls of 10 minutes.
# The GPU stages took 20 minutes in all (teacher 5.3, students 6.2, rl 7.5; toy_*.md say how each was run).
# Ship the results with `python -c "from pathlib import Path; from rtdmd.weights import register;
# [register(p) for p in Path('OUT').glob('*.safetensors')]"`, update the model cards and the metric
# versions (rtdmd/toyworld/rewards.py), then rerun tools/toy_leaderboard.sh. The teacher's evaluation and the
# RL rewards use the *shipped* recogniser and ToyClip: ship those before the later stages when they changed.
# Extra arguments go to every `rtdmd-train` call of the GPU stages (e.g. device=cuda:1).
set -euo pipefail
OUT=${OUT:-toy_rebuild}
RUNS=${RUNS:-runs/toy_rebuild}
STAGES=${STAGES:-recognizer teacher students rl}
ARMS=(grpo-all-steps no-bp no-dm bp-only dmd-only)
mkdir -p "$OUT"

fresh() {  # the trainers resume or skip existing runs: a rebuild must start from nothing
  for run in "$@"; do
    if [ -e "$RUNS/$run" ]; then
      echo "error: $RUNS/$run exists; pick a fresh RUNS=... or remove it" >&2
      exit 2
    fi
  done
}

input() {  # OUT's file when this rebuild made it, else the shipped one
  if [ -f "$OUT/$1.safetensors" ]; then echo "$OUT/$1.safetensors"; else echo "rtdmd/toyworld/weights/$1.safetensors"; fi
}

for stage in $STAGES; do
  case "$stage" in
    recognizer)
      fresh pretrain-recognizer-toy
      rtdmd-train pretrain-recognizer --config toy run_dir="$RUNS/pretrain-recognizer-toy"
      cp "$RUNS/pretrain-recognizer-toy/toy_recognizer.safetensors" "$OUT/"
      ;;
    teacher)
      fresh pretrain-toy pretrain-clip-toy
      rtdmd-train pretrain-clip --config toy run_dir="$RUNS/pretrain-clip-toy" "$@" &
      clip=$!
      rtdmd-train pretrain --config toy run_dir="$RUNS/pretrain-toy" --export "$OUT/toy_teacher.safetensors" "$@"
      wait "$clip"
      cp "$RUNS/pretrain-clip-toy/toy_clip.safetensors" "$OUT/"
      ;;
    students)
      fresh distill-toy distill-toy-dmd
      teacher="backbone.source=$(input toy_teacher)"
      rtdmd-train distill --config toy "$teacher" run_dir="$RUNS/distill-toy" "$@" &
      acdmd=$!
      rtdmd-train distill --config toy_dmd "$teacher" run_dir="$RUNS/distill-toy-dmd" "$@" &
      dmd=$!
      # both share the GPU; either failing stops the script (set -e ignores the left of `&&`)
      wait "$acdmd" || { kill "$dmd" 2>/dev/null; exit 1; }
      wait "$dmd"
      rtdmd-train export-lora "$RUNS/distill-toy" --out "$OUT/toy_acdmd.safetensors"
      rtdmd-train export-lora "$RUNS/distill-toy-dmd" --out "$OUT/toy_dmd.safetensors"
      ;;
    rl)
      fresh rl-toy-rtdmd "${ARMS[@]/#/rl-toy-}"
      teacher="backbone.source=$(input toy_teacher)"
      pids=()
      for arm in rtdmd "${ARMS[@]}"; do
        rtdmd-train rl --config toy "$teacher" stage1.generator_lora="$(input toy_acdmd)" arm="$arm" \
          run_dir="$RUNS/rl-toy-$arm" "$@" &
        pids+=($!)
      done
      for pid in "${pids[@]}"; do wait "$pid"; done
      rtdmd-train export-lora "$RUNS/rl-toy-rtdmd" --out "$OUT/toy_rtdmd.safetensors"
      for arm in "${ARMS[@]}"; do
        rtdmd-train export-lora "$RUNS/rl-toy-$arm" --out "$OUT/toy_rtdmd_${arm//-/_}.safetensors"
      done
      ;;
    *)
      echo "error: unknown stage $stage (recognizer, teacher, students, rl)" >&2
      exit 2
      ;;
  esac
done
sha256sum "$OUT"/*.safetensors
