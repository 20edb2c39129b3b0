#!/usr/bin/env bash
# Set up (once), then run the whole chain on the bundled LibriSpeech slice with configs/demo.yaml:
# partitions -> per-client k-means targets -> federated pretraining -> s3prl loads the best model ->
# federated distillation into a smaller student (configs/demo_distillation.yaml) -> s3prl loads it ->
# the evaluation table (federated, centralized, student, random-init, mfcc).
# Extra arguments (e.g. --set federation.num_rounds=3) go to every stage. Run again, it starts afresh:
# the federated stages and the evaluation get --overwrite, so the previous demo's checkpoints are moved
# aside to demo_output/checkpoints/<stage>.old-<time>, and its evaluation folder (when it was made with
# another config) to demo_output/evaluation.old-<time> (never deleted; remove them when no longer wanted).
# It runs its stages in the repository root, whatever folder it is started from: the demo configs'
# paths (corpus/LibriSpeech, demo_output/) are relative to it, and so are paths in extra --set
# arguments. CONFIG and DISTILLATION_CONFIG (environment) replace the two configs; relative to the
# folder it is started from.
#   ./run_demo.sh [--set section.key=value ...]      ./run_demo.sh --help      ./run_demo.sh --help-config
set -euo pipefail
case " $* " in *" --help "* | *" -h "*)
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0;; esac
CONFIG="$(realpath -m -- "${CONFIG:-$(dirname "$0")/configs/demo.yaml}")"
DISTILLATION_CONFIG="$(realpath -m -- "${DISTILLATION_CONFIG:-$(dirname "$0")/configs/demo_distillation.yaml}")"
source "$(dirname "$0")/scripts/setup_env.sh"
cd "$_FEDHUBERT_ROOT"  # this script's own process only: the caller's shell stays where it is
case " $* " in *" --help-config "*) exec python partition_data.py --help-config;; esac  # not once per stage
set -x
python partition_data.py --config "$CONFIG" "$@"
python generate_kmeans_targets.py --config "$CONFIG" "$@"
python federated_hubert_pretraining.py --config "$CONFIG" --overwrite "$@"
python check_s3prl_load.py --config "$CONFIG" "$@"
python federated_distillation.py --config "$DISTILLATION_CONFIG" --overwrite "$@"
python check_s3prl_load.py --config "$DISTILLATION_CONFIG" "$@" --student
python evaluate.py --config "$DISTILLATION_CONFIG" --overwrite "$@"
set +x
echo
echo "Outputs (under demo_output/):"
echo "  partitions/                         manifests, held-out utterances, per-client k-means targets"
echo "  checkpoints/pretraining/            best_global_model.pt (+ _hf/), round_<r>.pt, metrics.jsonl, curves.png"
echo "  checkpoints/distillation/           best_student_model.pt (+ _hf/), round_<r>.pt, metrics.jsonl, curves.png"
echo "  evaluation/                         evaluation.md (the table above), evaluation.json, evaluation.png"
