#!/usr/bin/env bash
# Rewrites the project's prompts/ folder: one Hugging Face dataset folder per packaged suite (the card alone
# where the licence forbids redistribution), from the upstream files in $1 (default ../shared/prompts).
# tests/test_prompt_folders.py checks that the committed folders equal what this writes.
set -euo pipefail
upstream=${1:-../shared/prompts}
for name in $(python -c "from rtdmd.suites import card_names; print(' '.join(card_names()))"); do
  rtdmd-bench suites export "$name" "prompts/$name" --prompts-dir "$upstream" > /dev/null
done
echo "prompts/: $(ls prompts | wc -l) suites"
