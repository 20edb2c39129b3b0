#!/usr/bin/env bash
# Set up (once) and run the whole test suite in 2 processes (pytest-xdist, a test file at a time each).
# Extra arguments go to pytest, e.g. ./run_tests.sh -k config, or ./run_tests.sh -n 0 for one process.
set -euo pipefail
source "$(dirname "$0")/scripts/setup_env.sh"
cd "$_FEDHUBERT_ROOT"  # the tests run from the repository root (this script's own process only)
exec python -m pytest -q -n 2 --dist loadfile "$@" tests
