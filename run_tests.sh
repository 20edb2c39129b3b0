#!/usr/bin/env bash
# Set up (once) and run the whole test suite. Extra arguments go to pytest, e.g. ./run_tests.sh -k config
set -euo pipefail
source "$(dirname "$0")/scripts/setup_env.sh"
cd "$_FEDHUBERT_ROOT"  # the tests run from the repository root (this script's own process only)
exec python -m pytest -q "$@" tests
