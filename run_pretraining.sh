#!/usr/bin/env bash
# Federated pretraining (Flower simulation). Arguments go to federated_hubert_pretraining.py, e.g.
#   ./run_pretraining.sh --config configs/demo.yaml --set federation.num_rounds=5 [--resume]
set -euo pipefail
source "$(dirname "$0")/scripts/setup_env.sh"
exec python "$_FEDHUBERT_ROOT/federated_hubert_pretraining.py" "$@"  # from any folder: relative paths are the caller's
