#!/usr/bin/env bash
# Regenerate the committed toy leaderboard, reports/toy/leaderboard.md (+ .json, .png): the full protocol
# (suite toy-geneval: 116 prompts x 12 images per method) with the toy claims, on DEVICE (default cuda; a
# CPU takes about an hour). `rtdmd-bench run` alone runs the quick profile (toy-geneval-quick) into its
# --out folder and leaves reports/ untouched. Extra arguments go to `rtdmd-bench run` (e.g. --out other_runs).
# Images, hence numbers, depend on the device's kernels: the report's header names the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
exec rtdmd-bench run --suite toy-geneval --claims toy --device "${DEVICE:-cuda}" --report reports/toy/leaderboard.md "$@"
