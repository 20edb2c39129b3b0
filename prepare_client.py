"""Make this machine's client folder from its own audio: manifests, train/valid split, k-means targets.

--audio AUDIO_DIR is a LibriSpeech root (it holds SPEAKERS.TXT) or any folder of .flac/.wav/.ogg files
(found recursively) whose speaker --speaker-rule takes from each file's path relative to AUDIO_DIR
(default: the first folder name, <speaker>/.../file.flac). --out CLIENT_DIR gets train/valid.tsv and .csv,
rejects.csv, summary.json and, with kmeans.codebook=local, train.km, valid.km, kmeans.joblib (with
federated: the federated k-means run labels it). The .tsv's audio root is relative to CLIENT_DIR, so the
folder can move with its audio; --out CLIENT_DIR --audio-root NEW_AUDIO_DIR (without --audio) points its
manifests at audio that moved on its own, or at a partition_data.py client folder's copied audio.
partition_data.py is the simulation's way to cut one corpus into clients; this is the deployment's.
"""

from fedhubert.cli import config_from_args, parser_with_config, run_main


def main() -> None:
    parser = parser_with_config(__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio", metavar="AUDIO_DIR",
                        help="this machine's audio: a LibriSpeech root (holds SPEAKERS.TXT) or a folder of "
                        ".flac/.wav/.ogg files")
    source.add_argument("--audio-root", metavar="NEW_AUDIO_DIR",
                        help="instead of --audio: rewrite the audio root of every .tsv in --out (written "
                        "relative to it) once every file they list is found under NEW_AUDIO_DIR")
    parser.add_argument("--out", required=True, metavar="CLIENT_DIR", help="the client folder to write")
    parser.add_argument("--speaker-rule", default=None, metavar="REGEX",
                        help="a folder of audio files: regular expression with one group, searched in each "
                        "file's path relative to AUDIO_DIR, that names its speaker (default: '^([^/]+)/', "
                        "the first folder name)")
    parser.add_argument("--overwrite", action="store_true",
                        help="CLIENT_DIR holds another client's manifests: replace them")
    args = parser.parse_args()
    if args.audio_root is not None and (args.speaker_rule is not None or args.overwrite):
        parser.error("--speaker-rule and --overwrite go with --audio, not --audio-root")
    cfg = config_from_args(args)
    from fedhubert.client_prep import prepare_client, rewrite_audio_root  # heavy imports after the checks

    if args.audio_root is not None:
        rewrite_audio_root(args.out, args.audio_root)
    else:
        prepare_client(cfg, args.audio, args.out, args.speaker_rule, args.overwrite)


if __name__ == "__main__":
    run_main(main)
