#!/usr/bin/env bash
# The HTML gallery's browser test needs Debian's chromium and chromium-driver: install them where they are
# missing and this user may (root with apt-get, as on CI); otherwise say what to install and fail.
# With an argument, first check that it is an interpreter (tox's browser env runs with py's environment).
set -euo pipefail
if [ $# -gt 0 ] && [ ! -x "$1" ]; then
  echo "$1 is missing: the browser test runs with py's environment, make it first (tox -e py)" >&2
  exit 1
fi
if command -v chromium > /dev/null && command -v chromedriver > /dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
  apt-get install -y -q chromium chromium-driver > /dev/null 2>&1 || { apt-get update -q > /dev/null && apt-get install -y -q chromium chromium-driver > /dev/null; }
  exit 0
fi
echo "tox -e browser needs chromium and chromedriver: sudo apt-get install chromium chromium-driver (Debian/Ubuntu)" >&2
exit 1
