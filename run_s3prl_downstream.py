"""s3prl's downstream runner (SUPERB tasks) on torchaudio >= 2.9, with our checkpoints as upstream:

    python run_s3prl_downstream.py -m train -u hubert_local -k checkpoints/pretraining/server/best_global_model.pt \
        -d asr -c path/to/s3prl/downstream/asr/config.yaml -p result/asr --device cpu

All arguments are s3prl's run_downstream.py arguments. The pip package of s3prl ships no downstream
configs: pass -c with the task's config.yaml from the s3prl repository.
"""

import fedhubert.compat  # noqa: F401  (must come before anything imports s3prl or torchaudio's removed names)

import sys
from pathlib import Path

from s3prl import run_downstream


def _check_config_arg(argv: list[str]) -> None:
    """s3prl defaults -c to ./downstream/<task>/config.yaml, which a pip install does not have."""
    if "-c" in argv or "--config" in argv or "-e" in argv or "--past_exp" in argv or "-a" in argv:
        return
    task = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-d", "--downstream")), None)
    if task and not Path(f"downstream/{task}/config.yaml").is_file():
        sys.exit(f"error: no -c/--config given and ./downstream/{task}/config.yaml does not exist; "
                 "pass the task's config.yaml from the s3prl repository")


if __name__ == "__main__":
    _check_config_arg(sys.argv[1:])
    run_downstream.main()
