#!/usr/bin/env bash
# Federated distillation (Flower simulation) of the model ./run_pretraining.sh wrote. Arguments go to
# federated_distillation.py (default config: configs/distillation_config.yaml), e.g.
#   ./run_distillation.sh --config configs/demo_distillation.yaml --set distillation.num_rounds=4 [--resume]
set -euo pipefail
source "$(dirname "$0")/scripts/setup_env.sh"
exec python "$_FEDHUBERT_ROOT/federated_distillation.py" "$@"  # from any folder: relative paths are the caller's
