#!/usr/bin/env bash
# Set up (once), then run the whole chain on the bundled LibriSpeech slice with configs/demo.yaml:
# partitions -> per-client k-means targets -> federated pretraining -> s3prl loads the best model ->
# federated distillation into a smaller student (configs/demo_distillation.yaml) -> s3prl loads it ->
# the evaluation table (federated, centralized, student, random-init, mfcc).
# Extra arguments (e.g. --set federation.num_rounds=3) go to every stage. Run again, it starts afresh:
# the federated stages get --overwrite, so the previous demo's checkpoints are moved aside to
# demo_output/checkpoints/<stage>.old-<time> (never deleted; remove them when no longer wanted).
set -euo pipefail
source "$(dirname "$0")/scripts/setup_env.sh"
CONFIG="${CONFIG:-configs/demo.yaml}"
DISTILLATION_CONFIG="${DISTILLATION_CONFIG:-configs/demo_distillation.yaml}"
set -x
python partition_data.py --config "$CONFIG" "$@"
python generate_kmeans_targets.py --config "$CONFIG" "$@"
python federated_hubert_pretraining.py --config "$CONFIG" --overwrite "$@"
python check_s3prl_load.py --config "$CONFIG" "$@"
python federated_distillation.py --config "$DISTILLATION_CONFIG" --overwrite "$@"
python check_s3prl_load.py --config "$DISTILLATION_CONFIG" "$@" --student
python evaluate.py --config "$DISTILLATION_CONFIG" "$@"
set +x
echo
echo "Outputs (under demo_output/):"
echo "  partitions/                         manifests, held-out utterances, per-client k-means targets"
echo "  checkpoints/pretraining/            best_global_model.pt (+ _hf/), round_<r>.pt, metrics.jsonl, curves.png"
echo "  checkpoints/distillation/           best_student_model.pt (+ _hf/), round_<r>.pt, metrics.jsonl, curves.png"
echo "  evaluation/                         evaluation.md (the table above), evaluation.json, evaluation.png"
