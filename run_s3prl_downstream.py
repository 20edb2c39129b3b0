"""s3prl's downstream runner (SUPERB tasks) with our checkpoints as upstream, on this stack:

    python run_s3prl_downstream.py -m train -u hubert_local -k checkpoints/pretraining/server/best_global_model.pt \
        -d speech_commands -c configs/s3prl/speech_commands.yaml -p result/speech_commands --device cpu \
        -o "config.downstream_expert.datarc.speech_commands_root=/data/sc/train,,config.downstream_expert.datarc.speech_commands_test_root=/data/sc/test"

All arguments are s3prl's run_downstream.py arguments; fedhubert/s3prl_runner.py lists what it fixes.
"""

import fedhubert.compat  # noqa: F401  (must come before anything imports s3prl or torchaudio's removed names)

from fedhubert.cli import run_main
from fedhubert.s3prl_runner import main

if __name__ == "__main__":
    run_main(main)
