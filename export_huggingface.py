"""Exports a checkpoint to a Hugging Face folder (config.json + model.safetensors) that
``transformers.HubertModel.from_pretrained(folder)`` loads:

    python export_huggingface.py checkpoints/pretraining/server/best_global_model.pt best_global_model_hf
"""

import argparse

from fedhubert.cli import run_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint written by the pretraining (or any s3prl HuBERT checkpoint)")
    parser.add_argument("folder", help="output folder (replaced atomically if it exists)")
    args = parser.parse_args()
    from fedhubert.checkpoint import export_huggingface, load_checkpoint  # imports torch: not needed for --help
    model, cfg, _ = load_checkpoint(args.checkpoint)
    print(f"wrote {export_huggingface(model, cfg, args.folder)}")


if __name__ == "__main__":
    run_main(main)
