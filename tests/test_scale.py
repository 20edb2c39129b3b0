"""Scale: the LibriSpeech-960-shaped test corpus (scripts/make_scale_corpus.py), small per-node state in
the simulation, and per-client k-means targets in parallel processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import REPO
from fedhubert.librispeech import read_speakers, scan_corpus

SCRIPT = REPO / "scripts" / "make_scale_corpus.py"
sys.path.insert(0, str(SCRIPT.parent))


def test_the_scale_corpus_is_a_librispeech_root_of_training_readers(tmp_path):
    from make_scale_corpus import build

    from fedhubert.errors import ConfigError

    root = tmp_path / "ls"
    info = build(root, speakers=6, utterances=5, per_chapter=2)
    assert info["utterances"] == 30 and info["hard_links"]
    rows, rejects = scan_corpus(root, [], 16000, 0, 2)
    assert not rejects and len(rows) == 30
    assert len({r.speaker for r in rows}) == 6 and len({(r.speaker, r.chapter) for r in rows}) == 18
    sexes = read_speakers(root)
    assert all(sexes[r.speaker] == r.sex in ("F", "M") for r in rows)  # every reader in SPEAKERS.TXT
    assert {r.subset for r in rows} <= {"train-clean-100", "train-clean-360", "train-other-500"}
    assert all(r.transcript for r in rows)
    assert (root / "LICENSE.TXT").is_file() and not list(tmp_path.glob(".ls.*"))  # no temp folder left
    with pytest.raises(ConfigError, match="already exists"):  # never written over
        build(root, speakers=1, utterances=1, per_chapter=1)


def test_more_speakers_than_librispeech_960_get_made_up_readers():
    from make_scale_corpus import BUNDLED, choose_readers, training_readers

    real = training_readers(BUNDLED / "SPEAKERS.TXT")
    assert len(real) == 2338  # LibriSpeech-960's readers: 251 + 921 + 1166
    assert choose_readers(real, 2338) == real
    some = choose_readers(real, 40)  # evenly spaced: every training subset keeps a share
    assert len(set(some)) == 40 and {r[2] for r in some} == {"train-clean-100", "train-clean-360", "train-other-500"}
    more = choose_readers(real, 2341)
    assert more[:2338] == real and len({r[0] for r in more}) == 2341
    assert all(int(r[0]) > int(real[-1][0]) and r[1] in "FM" for r in more[2338:])


def test_a_clients_node_state_holds_no_head_after_training(federated_partitions, tmp_path):
    # A simulation keeps every virtual node's context.state in its own process for the whole run and ships
    # it to the actor and back on every call: the local head must live in its file only (HeadStore).
    import pickle

    import torch
    from flwr.app import ArrayRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from conftest import fed_config
    from fedhubert.federation.client_app import app
    from fedhubert.federation.server_app import shared_record
    from fedhubert.federation.task import BEST_ROUND_KEY, TASK_KEY, absolutize_paths, build_model, config_record
    from fedhubert.federation.tasks import get_task

    if TaskIdentity._run_id is None:  # what Flower's runtime sets before messages are built
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    cfg = absolutize_paths(fed_config(federated_partitions, tmp_path / "ckpt"))
    task = get_task("pretraining")
    arrays = shared_record(build_model(cfg), task, cfg)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 3}, state=RecordDict(),
                      run_config={})
    for rnd in (1, 2):
        config = config_record(cfg, **{TASK_KEY: task.name, BEST_ROUND_KEY: -1, "server-round": rnd})
        msg = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=7, message_type="train")
        msg.metadata.__dict__["_message_id"] = f"m{rnd}"
        reply = app(msg, context)
        assert not reply.has_error(), reply.error
        assert not [v for v in context.state.values() if isinstance(v, ArrayRecord)]
        assert len(pickle.dumps(context.state)) < 2048  # a few small records, whatever the model's size
    heads = task.client_dir(cfg, 1, {})  # ... and on disk, where round 2 read round 1's
    assert sorted(p.name for p in heads.glob("head_round_*.pt")) == ["head_round_1.pt", "head_round_2.pt"]
    assert torch.load(heads / "head_round_2.pt", weights_only=True)["round"] == 2


@pytest.fixture
def three_clients(tmp_path, config_for):
    """3 real speakers x 4 utterances, one client each; returns a function (overrides...) -> cfg."""
    from conftest import copy_corpus
    from fedhubert.partition import partition_corpus

    root = copy_corpus(tmp_path, speakers=["1688", "2033", "3005"], utts_per_speaker=4)
    make = lambda *more: config_for(root, tmp_path / "parts", "partition.num_clients=3", "kmeans.codebook=local",  # noqa: E731
                                    "kmeans.n_clusters=16", "kmeans.batch_size=1500", *more)
    partition_corpus(make())
    return make


def _outputs(cfg) -> dict[str, bytes]:
    import joblib

    parts = Path(cfg.data.partitions_dir)
    found = {str(p.relative_to(parts)): p.read_bytes() for p in sorted(parts.glob("client_*/*.km"))}
    for p in sorted(parts.glob("client_*/kmeans.joblib")):
        found[str(p.relative_to(parts))] = joblib.load(p).cluster_centers_.tobytes()
    return found


def test_parallel_targets_equal_one_process_targets(three_clients):
    from fedhubert.targets import generate_targets

    generate_targets(three_clients("kmeans.workers=1"))
    alone = _outputs(three_clients())
    assert len(alone) == 9
    generate_targets(three_clients("kmeans.workers=2"))
    assert _outputs(three_clients()) == alone


def test_a_bad_file_in_a_worker_is_the_same_one_line_error(three_clients):
    from fedhubert.errors import DataError
    from fedhubert.targets import generate_targets

    cfg = three_clients("kmeans.workers=2")
    parts = Path(cfg.data.partitions_dir)
    rel = (parts / "client_2" / "train.tsv").read_text().splitlines()[1].split("\t")[0]
    path = Path(cfg.data.librispeech_root) / rel
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # the header still promises it all
    with pytest.raises(DataError, match=path.name) as err:
        generate_targets(cfg)
    assert "client_2/train.tsv" in str(err.value) and "\n" not in str(err.value)
    assert not list((parts / "client_2").glob("*.km")) and not list(parts.glob("client_*/.features.*"))


def test_each_training_utterance_is_decoded_once_whatever_the_passes(three_clients, monkeypatch):
    import fedhubert.targets as targets

    decoded: list[str] = []
    real = targets.load_audio
    monkeypatch.setattr(targets, "load_audio", lambda path, rate: decoded.append(Path(path).name) or real(path, rate))
    cfg = three_clients("kmeans.workers=1", "kmeans.fit_passes=3")
    targets.generate_targets(cfg)
    listed = [line.split("\t")[0].rsplit("/", 1)[-1] for p in sorted(Path(cfg.data.partitions_dir).glob("client_*/*.tsv"))
              for line in p.read_text().splitlines()[1:]]
    assert sorted(decoded) == sorted(listed)  # fitting (3 passes) and labelling read the feature cache
    assert not list(Path(cfg.data.partitions_dir).glob("client_*/.features.*"))  # the cache is gone


def test_the_partition_plot_stays_small_with_thousands_of_clients(tmp_path):
    from fedhubert.partition import plot_summary

    clients = [{"client": k, "hours": 0.4, "speakers": 1, "hours_by_sex": {"FM"[k % 2]: 0.4}} for k in range(2338)]
    plot_summary(tmp_path / "summary.png", clients, "2,338 clients")
    head = (tmp_path / "summary.png").read_bytes()[:24]
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert width <= 1600 and height <= 400, (width, height)  # was 281,000 x 350 pixels


def test_flac_lengths_from_streaminfo_match_libsndfile(tmp_path):
    import numpy as np
    import soundfile as sf

    from conftest import BUNDLED
    from fedhubert.audio import parse_flac_head, probe_audio, read_head

    made = []
    for rate, channels, subtype in ((8000, 2, "PCM_16"), (44100, 1, "PCM_24"), (22050, 6, "PCM_S8")):
        made.append(tmp_path / f"{rate}.flac")
        sf.write(made[-1], np.zeros((12345, channels), np.float32), rate, format="FLAC", subtype=subtype)
    for path in [*sorted(BUNDLED.glob("*/*/*/*.flac"))[:20], *made]:
        info = sf.info(str(path))
        assert parse_flac_head(read_head(path)) == probe_audio(path)
        assert (probe_audio(path).sample_rate, probe_audio(path).num_frames, probe_audio(path).channels) == \
            (info.samplerate, info.frames, info.channels)
    sf.write(tmp_path / "x.wav", np.zeros((100, 1), np.float32), 16000)
    (tmp_path / "id3.flac").write_bytes(b"ID3" + made[0].read_bytes())  # a tag first: libsndfile decides
    assert parse_flac_head(read_head(tmp_path / "x.wav")) is None
    assert parse_flac_head(read_head(tmp_path / "id3.flac")) is None
    assert probe_audio(tmp_path / "x.wav").num_frames == 100


def test_workers_0_starts_processes_only_for_hours_of_audio(three_clients, monkeypatch):
    import os

    import fedhubert.target_pool as pool
    from fedhubert.features import MfccFeatures

    cfg = three_clients()  # kmeans.workers 0 (the default); 3 clients of 4 utterances: a pool would not pay
    features = MfccFeatures(cfg)
    assert pool.target_workers(cfg, features, [0, 1, 2]) == 1
    monkeypatch.setattr(pool, "POOL_MIN_AUDIO_S", 60.0)  # ~90 s of audio here
    assert pool.target_workers(cfg, features, [0, 1, 2]) == min(os.cpu_count() or 1, 3)
    assert pool.target_workers(three_clients("kmeans.workers=2"), features, [0]) == 1  # one per client at most


def test_speaker_based_greedy_by_heap_equals_the_scan_over_clients():
    import numpy as np

    from fedhubert.librispeech import Utterance
    from fedhubert.partition import speaker_based

    rng = np.random.default_rng(0)
    rows = [Utterance(f"{s}-1-{i}", str(s), "F", "1", "train-clean-100", f"{s}/{i}.flac", 16000, n, 1, 16000, n,
                      n / 16000, "") for s in range(300) for i, n in enumerate(rng.integers(16000, 400000, 3))]
    rows += [Utterance(f"{s}-1-0", str(s), "M", "1", "train-clean-100", f"{s}/0.flac", 16000, 32000, 1, 16000, 32000,
                       2.0, "") for s in range(300, 340)]  # equal hours: ties broken by client id
    for num_clients in (1, 7, 64, 340):
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.speaker, []).append(i)
        hours = {s: sum(rows[i].duration for i in idx) / 3600 for s, idx in groups.items()}
        load, expected = [0.0] * num_clients, [[] for _ in range(num_clients)]
        for spk in sorted(groups, key=lambda s: (-hours[s], s)):  # the former scan over every client
            k = min(range(num_clients), key=lambda c: (load[c], c))
            expected[k].extend(groups[spk])
            load[k] += hours[spk]
        assert speaker_based(rows, num_clients) == expected
