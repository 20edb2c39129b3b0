"""Range reads and loader workers (issue 12): a crop decodes only its own frames, yet equals the whole
file's decode sliced, sample for sample; DataLoader workers give the very batches the training process
gives alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from fedhubert import audio
from fedhubert.audio import load_audio, load_crop, resampled_length
from fedhubert.data import ClientDataset, make_loader
from fedhubert.errors import DataError
from tests.test_data_loader import CORPUS, TRAIN_UTTS, build_client, tiny_config

CROP = 40000  # the default crop: 2.5 s at 16 kHz
FLAC_BLOCK = 4096  # libFLAC's block at 16 kHz: a seek lands inside a block and decodes it from its start


@pytest.fixture(scope="module")
def client_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_client(tmp_path_factory.mktemp("ranges"))


def offsets_to_try(total: int, seed: int) -> list[int]:
    """Block edges, stride multiples, the last full crop, the last sample, and random offsets."""
    edges = [0, 1, 319, 320, FLAC_BLOCK - 1, FLAC_BLOCK, FLAC_BLOCK + 1, 40960 - 320, 40960, 40960 + 320,
             total - CROP, total - CROP + 1, total - 320, total - 1]
    rng = np.random.default_rng(seed)
    return sorted({o for o in edges if 0 <= o < total} | set(rng.integers(0, total, 12).tolist()))


@pytest.fixture
def read_spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Frames asked of every SoundFile.read, and load_audio (the whole-file decode) made to fail."""
    asked: list[int] = []
    real_read = sf.SoundFile.read

    def read(self, frames=-1, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - soundfile's signature
        asked.append(frames)
        return real_read(self, frames, *args, **kwargs)

    def no_whole_decode(*_args, **_kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("a 16 kHz crop must not decode the whole file")

    monkeypatch.setattr(sf.SoundFile, "read", read)
    monkeypatch.setattr(audio, "load_audio", no_whole_decode)
    return asked


def test_flac_crops_are_the_whole_decode_sliced_and_read_only_their_frames(read_spy: list[int]) -> None:
    for n, utt in enumerate(TRAIN_UTTS[:3]):
        path = CORPUS / f"{utt}.flac"
        full, rate = sf.read(path, dtype="float32")
        assert rate == 16000
        for offset in offsets_to_try(len(full), seed=n):
            read_spy.clear()
            wav, total = load_crop(path, 16000, offset, CROP)
            assert total == len(full) and wav.dtype == torch.float32
            np.testing.assert_array_equal(wav.numpy(), full[offset:offset + CROP], err_msg=f"{utt} at {offset}")
            assert read_spy == [CROP], "only the crop's frames are read"
        assert load_crop(path, 16000, len(full), CROP)[0].numel() == 0  # past the end: empty, and the length


def test_stereo_and_wav_crops_match_the_whole_decode(tmp_path: Path, read_spy: list[int]) -> None:
    left, _ = sf.read(CORPUS / f"{TRAIN_UTTS[0]}.flac", dtype="float32")
    right, _ = sf.read(CORPUS / f"{TRAIN_UTTS[1]}.flac", dtype="float32")
    n = min(len(left), len(right))
    stereo = np.stack([left[:n], right[:n]], axis=1)
    for name, subtype in (("stereo.flac", "PCM_16"), ("stereo.wav", "PCM_16"), ("float.wav", "FLOAT")):
        sf.write(tmp_path / name, stereo, 16000, subtype=subtype)
        data, _ = sf.read(tmp_path / name, dtype="float32", always_2d=True)
        mono = data.mean(axis=1)  # what load_audio gives: the channels averaged
        for offset in offsets_to_try(n, seed=7):
            wav, total = load_crop(tmp_path / name, 16000, offset, CROP)
            assert total == n
            np.testing.assert_array_equal(wav.numpy(), mono[offset:offset + CROP], err_msg=f"{name} at {offset}")


def test_another_rate_is_decoded_whole_resampled_then_sliced(tmp_path: Path) -> None:
    full, _ = sf.read(CORPUS / f"{TRAIN_UTTS[0]}.flac", dtype="float32")
    path = tmp_path / "22k.flac"
    sf.write(path, np.interp(np.arange(0, len(full), 16000 / 22050), np.arange(len(full)), full), 22050)
    whole = load_audio(path, 16000)
    assert len(whole) == resampled_length(sf.info(path).frames, 22050, 16000)
    for offset in (0, 320, 16000, len(whole) - CROP):
        wav, total = load_crop(path, 16000, offset, CROP)
        assert total == len(whole)
        assert torch.equal(wav, whole[offset:offset + CROP])


def test_dataset_crops_need_no_whole_decode(client_dir: Path, read_spy: list[int]) -> None:
    cfg = tiny_config()  # 1 s crops
    for split, train in (("train", True), ("valid", False)):
        ds = ClientDataset(client_dir, split, cfg, train=train, seed=3)
        for epoch in range(2):
            for i in range(len(ds)):
                full, _ = sf.read(ds.root / ds.paths[i], dtype="float32")
                length = min(len(full), cfg.data.max_audio_length)
                read_spy.clear()
                item = ds[(i, epoch)]
                assert read_spy == [length]
                np.testing.assert_array_equal(item.waveform.numpy(), full[item.offset:item.offset + length])


def test_a_truncated_flac_is_a_data_error_naming_it(client_dir: Path, tmp_path: Path) -> None:
    ds = ClientDataset(client_dir, "train", tiny_config(), train=True, seed=0)
    longest = int(np.argmax(ds.sizes))
    source = ds.root / ds.paths[longest]
    cut = tmp_path / "cut.flac"  # the header still promises every sample
    cut.write_bytes(source.read_bytes()[:source.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.flac"):
        load_crop(cut, 16000, ds.sizes[longest] - CROP, CROP)


def _epochs(loader: torch.utils.data.DataLoader, epochs: int = 2) -> list[list[tuple]]:
    return [[(b.indices, b.offsets, b.waveforms, b.target_ids, b.padding_mask) for b in loader]
            for _ in range(epochs)]


def test_loader_workers_give_the_same_batches_and_draw_the_global_rng_alike(client_dir: Path) -> None:
    cfg = tiny_config("training.loader_workers=2")
    torch.manual_seed(5)
    alone = _epochs(make_loader(client_dir, "train", cfg, batch_size=3, seed=11, train=True, num_workers=0))
    after_alone = torch.get_rng_state()
    torch.manual_seed(5)
    loader = make_loader(client_dir, "train", cfg, batch_size=3, seed=11, train=True)  # the config's 2 workers
    assert loader.num_workers == 2
    with_workers = _epochs(loader)
    # The same draws on the global RNG, so the masks and dropout that follow are the same too.
    assert torch.equal(torch.get_rng_state(), after_alone), "workers must leave the global RNG as no workers do"
    assert len(alone) == len(with_workers) == 2
    for epoch_alone, epoch_workers in zip(alone, with_workers):
        assert len(epoch_alone) == len(epoch_workers) == 3
        for a, w in zip(epoch_alone, epoch_workers):
            assert a[:2] == w[:2] and all(torch.equal(x, y) for x, y in zip(a[2:], w[2:]))
    assert [b[1] for b in alone[0]] != [b[1] for b in alone[1]], "each epoch draws new crops"


def test_a_worker_error_reaches_the_caller_as_one_line(client_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "client_bad"
    bad.mkdir()
    lines = (client_dir / "train.tsv").read_text().splitlines()
    path, size = lines[1].split("\t")
    lines[1] = f"{path}\t{int(size) + 320}"  # one stride more than the file holds
    (bad / "train.tsv").write_text("\n".join(lines) + "\n")
    km = (client_dir / "train.km").read_text().splitlines()
    (bad / "train.km").write_text("\n".join([km[0] + " 0"] + km[1:]) + "\n")
    loader = make_loader(bad, "train", tiny_config(), batch_size=7, seed=0, train=False, num_workers=1)
    with pytest.raises(DataError) as caught:
        list(loader)
    message = str(caught.value)
    assert "\n" not in message and path in message and "stale" in message, message
