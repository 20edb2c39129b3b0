"""ClientDataset / collate / make_loader on a client folder built from real LibriSpeech utterances.

Labels follow a rule computed from the audio itself (the log-energy bucket of each 400-sample
frame), so a test can recompute a crop's labels from the crop's own samples: that proves the
audio-to-label alignment end to end, not just that two slices of one array agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from fedhubert.config import FRAME_LENGTH, FRAME_STRIDE, Config, load_config, num_frames
from fedhubert.data import IGNORE_INDEX, ClientDataset, derive_seed, make_loader
from fedhubert.errors import DataError

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "LibriSpeech" / "test-other"
TRAIN_UTTS = ["1688/142285/1688-142285-0002", "1688/142285/1688-142285-0003", "1688/142285/1688-142285-0004",
              "1688/142285/1688-142285-0008", "1688/142285/1688-142285-0009", "1998/15444/1998-15444-0001"]
VALID_UTTS = ["1688/142285/1688-142285-0005"]
SHORT_SAMPLES = 12345  # a trimmed utterance shorter than the crop (and not a whole number of strides)
NUM_CLUSTERS = 8
ENERGY_EDGES = np.linspace(-5.5, -2.0, NUM_CLUSTERS - 1)  # log10 mean power buckets


def tiny_config(*overrides: str) -> Config:
    """A tiny model and 1 s crops: fast enough for many fwd+bwd steps on 2 CPU cores."""
    base = ["data.max_audio_length=16000", f"kmeans.n_clusters={NUM_CLUSTERS}",
            f"model.vocab_size={NUM_CLUSTERS + 4}", "model.hidden_size=32", "model.num_hidden_layers=1",
            "model.num_attention_heads=2", "model.intermediate_size=64", "model.conv_dim=32",
            "model.final_dim=16", "model.conv_pos=16", "model.conv_pos_groups=4", "model.layerdrop=0.0",
            "training.batch_size=3"]
    return load_config(None, base + list(overrides))


def energy_labels(wav: np.ndarray) -> np.ndarray:
    """The label rule: bucket of each frame's log-energy (frames of 400 samples every 320)."""
    n = num_frames(len(wav))
    frames = np.stack([wav[k * FRAME_STRIDE:k * FRAME_STRIDE + FRAME_LENGTH] for k in range(n)])
    power = np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
    return np.digitize(power, ENERGY_EDGES).astype(np.int64)


def write_split(client: Path, split: str, root: Path, names: list[str]) -> None:
    tsv, km = [str(root)], []
    for name in names:
        wav, rate = sf.read(root / name, dtype="float32")
        assert rate == 16000
        tsv.append(f"{name}\t{len(wav)}")
        km.append(" ".join(map(str, energy_labels(wav))))
    (client / f"{split}.tsv").write_text("\n".join(tsv) + "\n")
    (client / f"{split}.km").write_text("\n".join(km) + "\n")


def build_client(base: Path) -> Path:
    """client_0/ with train (6 real utterances + 1 short) and valid (1 real + 1 short) splits."""
    root, client = base / "audio", base / "client_0"
    root.mkdir(parents=True)
    client.mkdir()
    for utt in TRAIN_UTTS + VALID_UTTS:
        wav, rate = sf.read(CORPUS / f"{utt}.flac", dtype="float32")
        sf.write(root / f"{Path(utt).name}.flac", wav, rate)
    short, rate = sf.read(CORPUS / f"{VALID_UTTS[0]}.flac", dtype="float32")
    sf.write(root / "short.flac", short[8000:8000 + SHORT_SAMPLES], rate)
    write_split(client, "train", root, [f"{Path(u).name}.flac" for u in TRAIN_UTTS] + ["short.flac"])
    write_split(client, "valid", root, [f"{Path(u).name}.flac" for u in VALID_UTTS] + ["short.flac"])
    return client


@pytest.fixture(scope="module")
def client_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_client(tmp_path_factory.mktemp("fed"))


@pytest.fixture(scope="module")
def full_audio(client_dir: Path) -> list[np.ndarray]:
    ds = ClientDataset(client_dir, "train", tiny_config(), train=True)
    return [sf.read(ds.root / p, dtype="float32")[0] for p in ds.paths]


def test_crops_start_on_stride_and_labels_match_the_audio(client_dir: Path, full_audio: list[np.ndarray]) -> None:
    cfg = tiny_config()
    ds = ClientDataset(client_dir, "train", cfg, train=True, seed=7)
    crop = cfg.data.max_audio_length
    offsets = set()
    for epoch in range(4):
        for i in range(len(ds)):
            item = ds[(i, epoch)]
            full = full_audio[i]
            n = min(len(full), crop)
            assert item.offset % FRAME_STRIDE == 0 and 0 <= item.offset <= len(full) - n
            np.testing.assert_array_equal(item.waveform.numpy(), full[item.offset:item.offset + n])
            full_labels = energy_labels(full)
            first = item.offset // FRAME_STRIDE
            assert item.labels.tolist() == full_labels[first:first + num_frames(n)].tolist()
            # The labels describe exactly the crop's own frames: recompute them from the crop.
            assert item.labels.tolist() == energy_labels(item.waveform.numpy()).tolist()
            offsets.add(item.offset)
    assert len(offsets) > 5, "training crops should start at many different offsets"


def test_validation_crops_start_at_zero_and_short_utterances_stay_whole(client_dir: Path) -> None:
    ds = ClientDataset(client_dir, "valid", tiny_config(), train=False, seed=3)
    for epoch in range(3):
        items = [ds[(i, epoch)] for i in range(len(ds))]
        assert [it.offset for it in items] == [0, 0]
        assert len(items[0].waveform) == 16000
        assert len(items[1].waveform) == SHORT_SAMPLES and len(items[1].labels) == num_frames(SHORT_SAMPLES)


def test_collate_pads_masks_and_ignores_frames_past_each_crop(client_dir: Path) -> None:
    loader = make_loader(client_dir, "valid", tiny_config(), batch_size=2, seed=0, train=False)
    (batch,) = list(loader)
    assert batch.waveforms.dtype == torch.float32 and batch.target_ids.dtype == torch.long
    assert batch.num_samples == [16000, SHORT_SAMPLES]
    assert batch.target_ids.shape == (2, num_frames(16000))
    for b, n in enumerate(batch.num_samples):
        assert not batch.padding_mask[b, :n].any() and batch.padding_mask[b, n:].all()
        assert (batch.waveforms[b, n:] == 0).all()
        own = num_frames(n)
        assert (batch.target_ids[b, :own] >= 4).all() and (batch.target_ids[b, :own] < 4 + NUM_CLUSTERS).all()
        assert (batch.target_ids[b, own:] == IGNORE_INDEX).all()
    ds = loader.dataset
    assert batch.target_ids[1, :num_frames(SHORT_SAMPLES)].tolist() == (ds[1].labels + 4).tolist()


def _crops(loader: torch.utils.data.DataLoader) -> list[tuple[int, int]]:
    return [(i, o) for batch in loader for i, o in zip(batch.indices, batch.offsets)]


def test_loader_is_seeded_keeps_every_item_and_ignores_global_rng(client_dir: Path) -> None:
    cfg = tiny_config()

    def two_epochs(seed: int, global_seed: int) -> list[list[tuple[int, int]]]:
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        loader = make_loader(client_dir, "train", cfg, batch_size=3, seed=seed, train=True)
        return [_crops(loader), _crops(loader)]

    first = two_epochs(seed=11, global_seed=0)
    assert first == two_epochs(seed=11, global_seed=123)  # reproducible, whatever the global RNG
    assert first != two_epochs(seed=12, global_seed=0)
    assert [i for i, _ in first[0]] != [i for i, _ in first[1]], "each epoch should shuffle anew"
    assert dict(first[0]) != dict(first[1]), "each epoch should draw new crop offsets"
    for epoch in first:  # nothing dropped: 7 items in batches of 3, 3, 1
        assert sorted(i for i, _ in epoch) == list(range(7))
    loader = make_loader(client_dir, "train", cfg, batch_size=3, seed=11, train=True)
    assert [len(b) for b in loader] == [3, 3, 1]
    valid = make_loader(client_dir, "valid", cfg, batch_size=1, seed=5, train=False)
    assert _crops(valid) == [(0, 0), (1, 0)]


def test_derive_seed_separates_streams() -> None:
    seeds = {derive_seed(42, r, c) for r in range(5) for c in range(5)}
    assert len(seeds) == 25 and derive_seed(1, 2) == derive_seed(1, 2) != derive_seed(2, 1)


def _corrupt_copy(client_dir: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "client_bad"
    bad.mkdir()
    for name in ("train.tsv", "train.km"):
        (bad / name).write_text((client_dir / name).read_text())
    return bad


def test_bad_files_raise_data_errors_naming_the_file(client_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config()
    with pytest.raises(DataError, match="valid.tsv"):
        ClientDataset(tmp_path, "valid", cfg, train=False)

    bad = _corrupt_copy(client_dir, tmp_path)
    km = (bad / "train.km").read_text().splitlines()
    (bad / "train.km").write_text("\n".join(km[:-1]) + "\n")  # one line short
    with pytest.raises(DataError, match=r"train\.km.*6 label lines.*7"):
        ClientDataset(bad, "train", cfg, train=True)

    (bad / "train.km").write_text("\n".join(km[:2] + [km[2] + " 0"] + km[3:]) + "\n")  # one label too many
    with pytest.raises(DataError, match=r"train\.km:3: .*expected num_frames"):
        ClientDataset(bad, "train", cfg, train=True)

    (bad / "train.km").write_text("\n".join([f"{NUM_CLUSTERS} " + km[0].split(" ", 1)[1]] + km[1:]) + "\n")
    with pytest.raises(DataError, match=r"train\.km:1: cluster id out of range"):
        ClientDataset(bad, "train", cfg, train=True)

    (bad / "train.km").unlink()
    with pytest.raises(DataError, match="label file not found.*train.km"):
        ClientDataset(bad, "train", cfg, train=True)


def test_stale_manifest_length_is_caught_on_load(client_dir: Path, tmp_path: Path) -> None:
    bad = _corrupt_copy(client_dir, tmp_path)
    lines = (bad / "train.tsv").read_text().splitlines()
    path, size = lines[1].split("\t")
    lines[1] = f"{path}\t{int(size) + FRAME_STRIDE}"  # 320 samples more than the file holds
    (bad / "train.tsv").write_text("\n".join(lines) + "\n")
    km = (bad / "train.km").read_text().splitlines()
    km[0] += " 0"  # keep the label count consistent with the (wrong) length
    (bad / "train.km").write_text("\n".join(km) + "\n")
    ds = ClientDataset(bad, "train", tiny_config(), train=True)
    with pytest.raises(DataError, match=path):
        ds[0]
