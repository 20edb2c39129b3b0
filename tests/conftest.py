"""Shared fixtures: copies of the bundled LibriSpeech slice, planted bad files, synthetic speakers
(espeak-ng) and configs pointing at them. Everything written goes under pytest's tmp folders."""

from __future__ import annotations

import importlib
import math
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf
import torch
import scipy.signal
import torchaudio.functional as AF

from fedhubert.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "corpus" / "LibriSpeech"
BASE_CONFIG = REPO / "configs" / "pretraining_config.yaml"
SUBSET = "test-other"


# A tiny HuBERT (same architecture, small sizes) and a short federated schedule for the federation tests.
TINY = ["model.hidden_size=32", "model.num_hidden_layers=1", "model.num_attention_heads=2",
        "model.intermediate_size=64", "model.conv_dim=32", "model.final_dim=16", "model.layerdrop=0.0",
        "kmeans.n_clusters=20", "data.max_audio_length=16000", "training.batch_size=4",
        "training.max_local_steps=3", "training.learning_rate=1e-3", "federation.eta=0.01",
        "partition.num_clients=3", "federation.client_num_cpus=1",
        "kmeans.codebook=local"]  # per-client k-means: the shared fixtures need no k-means simulation


def make_config(root: Path, out: Path, *overrides: str) -> Config:
    """The project config pointed at ``root`` (LibriSpeech) and ``out`` (partitions_dir), scanning the
    bundled slice's subset (an evaluation set: the default leaves it out) unless overridden."""
    return load_config(BASE_CONFIG, [f"data.librispeech_root={root}", f"data.partitions_dir={out}",
                                     f"data.subsets=[{SUBSET}]", *overrides])


def copy_corpus(dest: Path, speakers: list[str] | None = None, utts_per_speaker: int | None = None) -> Path:
    """A writable copy of the bundled corpus (optionally only some speakers / utterances)."""
    root = dest / "LibriSpeech"
    root.mkdir(parents=True)
    shutil.copy(BUNDLED / "SPEAKERS.TXT", root)
    for spk_dir in sorted((BUNDLED / SUBSET).iterdir()):
        if speakers is not None and spk_dir.name not in speakers:
            continue
        for chapter in sorted(spk_dir.iterdir()):
            target = root / SUBSET / spk_dir.name / chapter.name
            target.mkdir(parents=True)
            flacs = sorted(chapter.glob("*.flac"))[:utts_per_speaker]
            for f in flacs:
                shutil.copy(f, target)
            trans = next(chapter.glob("*.trans.txt"))
            keep = {f.stem for f in flacs}
            lines = [l for l in trans.read_text().splitlines() if l.split(" ", 1)[0] in keep]
            (target / trans.name).write_text("\n".join(lines) + "\n")
    return root


def add_utterance(root: Path, utt_id: str, audio: np.ndarray | bytes | None, sample_rate: int = 16000,
                  transcript: str | None = "A PLANTED UTTERANCE", subset: str = SUBSET) -> Path:
    """Writes ``<spk>-<chapter>-<utt>.flac`` (audio array, raw bytes, or None for a 0-byte file) and,
    unless ``transcript`` is None, its line in the chapter's trans.txt."""
    spk, chapter, _ = utt_id.split("-")
    folder = root / subset / spk / chapter
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{utt_id}.flac"
    if audio is None:
        path.write_bytes(b"")
    elif isinstance(audio, bytes):
        path.write_bytes(audio)
    else:
        sf.write(path, audio, sample_rate, format="FLAC")
    if transcript is not None:
        with open(folder / f"{spk}-{chapter}.trans.txt", "a") as handle:
            handle.write(f"{utt_id} {transcript}\n")
    return path


# The planted files of ``dirty_corpus`` and the reject reason each must get.
BAD_FILES = {"corrupt": "1688-142285-0901", "empty": "1688-142285-0902", "untranscribed": "1998-15444-0903",
             "short": "1998-15444-0904"}
STEREO_8K = "2033-164914-0905"


@pytest.fixture
def dirty_corpus(tmp_path: Path) -> Path:
    """Four speakers x 4 utterances plus: a corrupt file (random bytes), a 0-byte file, an utterance
    without transcript line, a too-short file, and an 8 kHz stereo file that must be accepted."""
    root = copy_corpus(tmp_path, speakers=["1688", "1998", "2033", "2414"], utts_per_speaker=4)
    rng = np.random.default_rng(0)
    add_utterance(root, BAD_FILES["corrupt"], rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    add_utterance(root, BAD_FILES["empty"], None)
    src, _ = sf.read(BUNDLED / SUBSET / "1998/15444/1998-15444-0000.flac", dtype="float32")
    add_utterance(root, BAD_FILES["untranscribed"], src, transcript=None)
    add_utterance(root, BAD_FILES["short"], src[:300])
    src, _ = sf.read(BUNDLED / SUBSET / "2033/164914/2033-164914-0000.flac", dtype="float32")
    mono8k = AF.resample(torch.from_numpy(src), 16000, 8000).numpy()
    add_utterance(root, STEREO_8K, np.stack([mono8k, 0.5 * mono8k], axis=1), sample_rate=8000)
    return root


@pytest.fixture(scope="session")
def bundled_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One read-only-by-convention copy of the whole bundled corpus for the session."""
    return copy_corpus(tmp_path_factory.mktemp("bundled"))


# espeak-ng voices: (variant, sex). Different variants give audibly different synthetic speakers.
ESPEAK_VOICES = [("en+f1", "F"), ("en+f2", "F"), ("en+f3", "F"), ("en+f4", "F"), ("en-us+f5", "F"),
                 ("en-us+f2", "F"), ("en+m1", "M"), ("en+m2", "M"), ("en+m3", "M"), ("en+m4", "M"),
                 ("en-us+m5", "M"), ("en-gb+m6", "M"), ("en-gb+m7", "M"), ("en-us+m3", "M")]
ESPEAK_SENTENCES = ["THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
                    "FEDERATED LEARNING KEEPS EVERY SPEAKER ON ONE DEVICE",
                    "A HIDDEN UNIT MODEL PREDICTS CLUSTERS OF MASKED FRAMES",
                    "SHE SELLS SEA SHELLS BY THE SEA SHORE IN THE MORNING"]


def synthesize_speakers(root: Path, voices: list[tuple[str, str]], sentences: list[str],
                        first_id: int = 9000, subset: str = "synth-espeak") -> list[str]:
    """Adds one LibriSpeech-layout speaker per espeak-ng voice (16 kHz FLAC, trans.txt, SPEAKERS.TXT
    line); speaker s speaks at a rate of its own, so durations differ. Returns the speaker ids."""
    jobs = [(s, j) for s in range(len(voices)) for j in range(len(sentences))]

    def speak(job: tuple[int, int]) -> np.ndarray:
        s, j = job
        wav = root / f".espeak-{s}-{j}.wav"
        subprocess.run(["espeak-ng", "-v", voices[s][0], "-s", str(130 + 12 * s), "-w", str(wav),
                        sentences[j].lower()], check=True, capture_output=True)
        data, rate = sf.read(wav, dtype="float32")
        wav.unlink()
        g = math.gcd(rate, 16000)  # polyphase resampling: fast, and test audio needs no more
        return scipy.signal.resample_poly(data, 16000 // g, rate // g).astype(np.float32)

    with ThreadPoolExecutor(4) as pool:  # espeak-ng runs as a subprocess: threads overlap them
        audio = dict(zip(jobs, pool.map(speak, jobs)))
    ids, lines = [], []
    for s, (voice, sex) in enumerate(voices):
        spk, chapter = str(first_id + s), str(100 + s)
        for j, text in enumerate(sentences):
            add_utterance(root, f"{spk}-{chapter}-{j:04d}", audio[s, j], transcript=text, subset=subset)
        ids.append(spk)
        lines.append(f"{spk:<5}| {sex} | {subset:<16} | 0.10 | espeak-ng {voice}")
    with open(root / "SPEAKERS.TXT", "a") as handle:
        handle.write("\n".join(lines) + "\n")
    return ids


@pytest.fixture(scope="session")
def espeak_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A LibriSpeech root holding only synthetic espeak-ng speakers (14 speakers x 4 utterances)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    root = tmp_path_factory.mktemp("espeak") / "LibriSpeech"
    root.mkdir()
    shutil.copy(BUNDLED / "SPEAKERS.TXT", root)
    return root, synthesize_speakers(root, ESPEAK_VOICES, ESPEAK_SENTENCES)


@pytest.fixture
def config_for() -> Callable[..., Config]:
    """``config_for(root, out, "k=v", ...)``: the project config pointed at a corpus and output dir."""
    return make_config


# --- a tiny federation on the bundled corpus, shared by the federation and distillation tests ------------

FEDERATION_SPEAKERS = ["1688", "1998", "2033", "2414", "2609", "3005"]


@pytest.fixture(scope="session")
def federated_partitions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(corpus root, partitions dir): 6 real speakers x 4 utterances, 2 of each held out for the
    evaluation, the rest in 3 clients, with k-means targets."""
    from fedhubert.partition import partition_corpus
    from fedhubert.targets import generate_targets

    work = tmp_path_factory.mktemp("federation")
    root = copy_corpus(work, speakers=FEDERATION_SPEAKERS, utts_per_speaker=4)
    cfg = make_config(root, work / "partitions", *TINY, "partition.heldout_per_speaker=2")
    partition_corpus(cfg)
    generate_targets(cfg)
    return root, work / "partitions"


def fed_config(partitions: tuple[Path, Path], checkpoint_dir: Path, *overrides: str) -> Config:
    """The tiny federation's config with its own checkpoint folder."""
    root, parts = partitions
    return make_config(root, parts, *TINY, f"federation.checkpoint_dir={checkpoint_dir}", *overrides)


@pytest.fixture(scope="session")
def tiny_pretraining(federated_partitions, tmp_path_factory) -> tuple[Config, dict]:
    """A 2-round federated pretraining of the tiny HuBERT (read-only by convention: copy to change)."""
    from fedhubert.federation.simulation import run_federated_pretraining

    cfg = fed_config(federated_partitions, tmp_path_factory.mktemp("run2") / "ckpt", "federation.num_rounds=2")
    return cfg, run_federated_pretraining(cfg)


DISTILL_STUDENT = ["distillation.student_hidden_size=16", "distillation.student_num_layers=1",
                   "distillation.student_num_attention_heads=2", "distillation.student_intermediate_size=32"]


def teacher_path(tiny_pretraining) -> Path:
    return Path(tiny_pretraining[0].federation.checkpoint_dir) / "server" / "best_global_model.pt"


def distill_config(federated_partitions, tiny_pretraining, checkpoint_dir: Path, *overrides: str) -> Config:
    """The tiny federation's distillation config: a 16-wide student of the tiny pretraining's best model."""
    return fed_config(federated_partitions, tiny_pretraining[0].federation.checkpoint_dir, *DISTILL_STUDENT,
                      f"distillation.teacher_model_path={teacher_path(tiny_pretraining)}",
                      f"distillation.checkpoint_dir={checkpoint_dir}", *overrides)


@pytest.fixture(scope="session")
def tiny_distillation(federated_partitions, tiny_pretraining, tmp_path_factory):
    """(config, result, (teacher sha1, teacher weights) before the run) of a 2-round distillation."""
    import hashlib

    from fedhubert.federation.simulation import run_federated_distillation

    cfg = distill_config(federated_partitions, tiny_pretraining, tmp_path_factory.mktemp("distill") / "ckpt")
    teacher = teacher_path(tiny_pretraining)
    before = hashlib.sha1(teacher.read_bytes()).hexdigest(), torch.load(teacher, weights_only=True)["model_weight"]
    return cfg, run_federated_distillation(cfg), before


@pytest.fixture
def processes():
    """Processes of a deployment test (deployment_helpers.start): every group is stopped at the end,
    also when the test fails."""
    from deployment_helpers import stop_all

    started: list[subprocess.Popen] = []
    yield started
    stop_all(started)


def app_for_ray_workers(monkeypatch, module: str):
    """``tests/<module>.py``'s ClientApp ``app``, importable by Ray's worker processes too (PYTHONPATH)."""
    tests_dir = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]))
    return importlib.import_module(module).app
