#!/usr/bin/env bash
# Regenerate the committed toy leaderboard, reports/toy/leaderboard.md (+ .json, .png), from the
# default toy run on this machine's CPU. `rtdmd-bench run` alone writes to its --out folder and leaves
# reports/ untouched. Extra arguments go to `rtdmd-bench run` (e.g. --seeds 0,1,2 or --out other_runs).
# The committed report was made on the CPU: a GPU gives other images (other kernels), hence other numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
exec rtdmd-bench run --device cpu --report reports/toy/leaderboard.md "$@"
