"""s3prl downstream tasks on our checkpoints through run_s3prl_downstream.py: a tiny espeak-ng Speech
Commands set trained and evaluated end to end (subprocesses, as a user runs it), voxceleb1 on a tiny
fake layout (in-process), and each s3prl 0.4.18 quirk the wrapper handles."""

from __future__ import annotations

import fedhubert.compat  # noqa: F401  (before s3prl)

import itertools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from fedhubert import espeak, s3prl_runner
from fedhubert.checkpoint import save_checkpoint
from fedhubert.config import config_from_dict
from fedhubert.errors import ConfigError, DataError
from fedhubert.model import HubertBase
from fedhubert.speech_commands import CLASSES, FILE_NAME, KEYWORDS, OTHER_WORDS

ROOT = Path(__file__).resolve().parents[1]
SC_CONFIG = ROOT / "configs/s3prl/speech_commands.yaml"
VOX_CONFIG = ROOT / "configs/s3prl/voxceleb1.yaml"
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, conv_dim=32,
            final_dim=16, vocab_size=24, layerdrop=0.0)
N_OTHER = 3
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


def datarc(**values: object) -> str:
    """An s3prl -o string setting downstream_expert.datarc keys."""
    return ",,".join(f"config.downstream_expert.datarc.{k}={v}" for k, v in values.items())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    cfg = config_from_dict({"model": TINY, "kmeans": {"n_clusters": 20}})
    torch.manual_seed(0)
    save_checkpoint(path, HubertBase.from_config(cfg), cfg)
    return path


@pytest.fixture(scope="module")
def speech_commands(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """make_speech_commands.py: 3 training, 1 validation, 1 test voice; 10 keywords + 3 other words."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    base = tmp_path_factory.mktemp("sc")
    run = subprocess.run([sys.executable, "make_speech_commands.py", str(base / "sc"), "--train-voices", "3",
                          "--valid-voices", "1", "--test-voices", "1", "--other-words", str(N_OTHER),
                          "--repeats", "1", "--noise-seconds", "1.5", "--cache-dir", str(base / "cache")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "speech_commands_root=" in run.stdout
    return base / "sc"


@pytest.fixture(scope="module")
def s3prl_ready():
    """s3prl_runner.prepare() in this process; its stand-in modules are removed afterwards."""
    added = s3prl_runner.prepare()
    yield
    for name in added:
        sys.modules.pop(name, None)


def make_runner(monkeypatch: pytest.MonkeyPatch, *argv: str):
    """s3prl's Runner built from run_downstream.py arguments, as main() would (without main()'s global
    side effects such as replacing builtins.isinstance)."""
    from s3prl.downstream.runner import Runner
    from s3prl.run_downstream import get_downstream_args

    monkeypatch.setattr(sys, "argv", ["run_downstream.py", *argv])
    args, config, _ = get_downstream_args()
    return Runner(args, config)


def sc_runner(monkeypatch, sc: Path, ckpt: Path, expdir: Path, batch_size: int = 8):
    return make_runner(monkeypatch, "-m", "train", "-u", "hubert_local", "-k", str(ckpt), "-d", "speech_commands",
                       "-c", str(SC_CONFIG), "-p", str(expdir), "--device", "cpu", "-o",
                       datarc(speech_commands_root=sc / "train", speech_commands_test_root=sc / "test",
                              num_workers=0, batch_size=batch_size))


# --- espeak-ng and the Speech Commands layout ---------------------------------------------------------

@needs_espeak
def test_espeak_voices_are_distinct_deterministic_and_cached(tmp_path):
    voices = espeak.VOICES[:14]
    cached = espeak.synthesize_many([espeak.Utterance("yes", v) for v in voices], tmp_path)
    for a, b in itertools.combinations(cached, 2):
        assert a.shape != b.shape or not np.array_equal(a, b)  # every voice sounds different
    assert len(list(tmp_path.rglob("*.npy"))) == len(voices)
    again = espeak.synthesize("yes", voices[3], espeak.DEFAULT_RATE, tmp_path)     # from the cache
    fresh = espeak.synthesize("yes", voices[3], espeak.DEFAULT_RATE, None)         # a new espeak-ng run
    assert again.dtype == np.float32 and np.array_equal(again, cached[3]) and np.array_equal(fresh, cached[3])
    assert 0.2 < len(espeak.trim(fresh)) / espeak.SAMPLE_RATE < 1.0
    assert not np.array_equal(espeak.synthesize("yes", voices[3], 120), fresh)  # the rate matters
    with pytest.raises(espeak.EspeakError, match="en-gb\\+m3"):  # espeak-ng would silently drop the variant
        espeak.synthesize("yes", "en-gb+m3", 160, None)


def test_speech_commands_layout_is_what_s3prl_reads(speech_commands, s3prl_ready):
    from s3prl.downstream.speech_commands.expert import split_dataset

    train, test = speech_commands / "train", speech_commands / "test"
    words = set(KEYWORDS + OTHER_WORDS[:N_OTHER])
    assert {p.name for p in train.iterdir() if p.is_dir()} == words | {"_background_noise_"}
    assert {p.name for p in test.iterdir()} == set(CLASSES)  # as speech_commands_test_set_v0.01
    clips = [p for d in [*train.iterdir(), *test.iterdir()] if d.is_dir() and d.name != "_background_noise_"
             for p in d.glob("*.wav")]
    for path in clips:
        info = sf.info(path)
        assert FILE_NAME.match(path.name), path
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 1, 16000, "PCM_16"), path
    for noise in (train / "_background_noise_").glob("*.wav"):
        assert sf.info(noise).frames >= 16000
    assert all(any((test / c).iterdir()) for c in CLASSES)
    # s3prl's own split: validation = validation_list.txt, training = the 3 training voices, and the
    # testing-hash voice (the test set's) in neither.
    train_list, valid_list = split_dataset(train)
    listed = (train / "validation_list.txt").read_text().split()
    assert sorted(f"{w}/{Path(p).name}" for w, p in valid_list) == sorted(listed) and len(listed) == len(words)
    testing = {Path(p).name.split("_")[0] for p in (train / "testing_list.txt").read_text().split()}
    assert len({Path(p).name.split("_")[0] for _, p in train_list}) == 3 and len(train_list) == 3 * len(words)
    assert testing and testing.isdisjoint({Path(p).name.split("_")[0] for _, p in train_list + valid_list})
    assert testing == {p.name.split("_")[0] for p in (test / "yes").glob("*.wav")}


# --- end to end: the seed's command on CPU -----------------------------------------------------------

def test_speech_commands_train_then_evaluate(speech_commands, checkpoint, tmp_path):
    exp = tmp_path / "exp"
    overrides = datarc(speech_commands_root=speech_commands / "train", num_workers=0, batch_size=8,
                       speech_commands_test_root=speech_commands / "test") + (
        ",,config.runner.total_steps=4,,config.runner.log_step=2,,config.runner.eval_step=4,,"
        "config.runner.save_step=4,,config.runner.eval_dataloaders=['dev']")
    train = subprocess.run([sys.executable, str(ROOT / "run_s3prl_downstream.py"), "-m", "train", "-u", "hubert_local",
                            "-k", str(checkpoint), "-d", "speech_commands", "-c", str(SC_CONFIG), "-p", str(exp),
                            "--device", "cpu", "-o", overrides],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (exp / "states-4.ckpt").is_file() and "dev acc:" in train.stdout
    saved = next(exp.glob("config_*.yaml")).read_text()  # -o went through to s3prl's config
    assert "batch_size: 8" in saved and "total_steps: 4" in saved and str(speech_commands / "test") in saved

    # SUPERB's test step: the saved checkpoint, evaluated on the test split (s3prl's -m evaluate -e).
    test = subprocess.run([sys.executable, str(ROOT / "run_s3prl_downstream.py"), "-m", "evaluate",
                           "-e", str(exp / "states-4.ckpt"), "--device", "cpu"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert test.returncode == 0, test.stderr[-3000:]
    printed = float(re.search(r"^test acc: (\S+)$", test.stdout, re.M).group(1))
    logged = float(re.findall(r"^test at step \d+: (\S+)$", (exp / "log.log").read_text(), re.M)[-1])
    assert printed == logged and 0.0 <= printed <= 1.0
    n_test = len(list((speech_commands / "test").rglob("*.wav")))
    assert len((exp / "test_predict.txt").read_text().splitlines()) == n_test


# --- the quirks ---------------------------------------------------------------------------------------

def test_stand_ins_for_catalyst_and_librosa(s3prl_ready):
    import s3prl.downstream.speech_commands.expert as sc  # imports catalyst
    import s3prl.downstream.voxceleb1.dataset as vox       # imports librosa

    if sys.modules["catalyst"].__doc__.startswith("stand-in"):
        with pytest.raises(NotImplementedError, match="distributed speech_commands training"):
            sc.DistributedSamplerWrapper(None)
    if sys.modules["librosa"].__doc__.startswith("stand-in"):
        with pytest.raises(NotImplementedError, match="librosa"):
            vox.find_files("/")


def test_a_train_split_smaller_than_one_batch_is_an_error_not_an_endless_loop(
        speech_commands, checkpoint, tmp_path, monkeypatch, s3prl_ready):
    runner = sc_runner(monkeypatch, speech_commands, checkpoint, tmp_path / "exp", batch_size=1000)
    # s3prl's loader (drop_last=True) has no batch, so Runner.train would start epoch after epoch forever.
    with pytest.raises(DataError, match=r"'train' has \d+ examples.*datarc.batch_size=1000"):
        runner.downstream.model.get_dataloader("train")


def test_cpu_evaluation_on_a_machine_with_cuda(speech_commands, checkpoint, tmp_path, monkeypatch, s3prl_ready):
    from s3prl.downstream.runner import Runner

    runner = sc_runner(monkeypatch, speech_commands, checkpoint, tmp_path / "exp")

    class Logger:
        def add_scalar(self, *_, **__):
            pass

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine with --device cpu
    with pytest.raises(ValueError, match="Expected a cuda device, but got: cpu"):
        Runner._fedhubert_original["evaluate"](runner, "dev", Logger(), 1)  # s3prl's own evaluate
    assert isinstance(runner.evaluate("dev", Logger(), 1), list)
    assert "dev at step 1:" in (tmp_path / "exp" / "log.log").read_text()
    assert torch.cuda.is_available()  # restored afterwards


def test_arguments_are_checked_before_s3prl_starts(tmp_path, monkeypatch):
    assert s3prl_runner.check_overrides("config.a.b=1,,args.seed=3,,config.x=['dev', 'test']") == [
        ("config.a.b", "1"), ("args.seed", "3"), ("config.x", "['dev', 'test']")]
    for bad in ("config.a.b=1,config.c=2", "runner.total_steps=2", "config.a.b", "args.a.b=1"):
        with pytest.raises(ConfigError, match="-o"):
            s3prl_runner.check_overrides(bad)
    run = subprocess.run([sys.executable, str(ROOT / "run_s3prl_downstream.py"), "-m", "train", "-d",
                          "speech_commands", "-c", str(SC_CONFIG), "-o", "config.runner.total_steps=2,config.x=1"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith("error: -o item")
    with pytest.raises(ConfigError, match="-c config file not found: nope.yaml"):
        s3prl_runner.check_arguments(["-m", "train", "-d", "voxceleb1", "-c", "nope.yaml", "--device", "cpu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device cuda .* pass --device cpu"):  # s3prl's default device
        s3prl_runner.check_arguments(["-m", "evaluate", "-e", "exp/states-4.ckpt"])
    s3prl_runner.check_arguments(["-m", "evaluate", "-e", "exp/states-4.ckpt", "--device", "cpu"])


def test_missing_data_path_names_its_key(checkpoint, tmp_path, monkeypatch, s3prl_ready):
    with pytest.raises(DataError, match=r"downstream_expert\.datarc\.file_path: dir not found: /path/to/VoxCeleb1"):
        make_runner(monkeypatch, "-m", "train", "-u", "hubert_local", "-k", str(checkpoint), "-d", "voxceleb1",
                    "-c", str(VOX_CONFIG), "-p", str(tmp_path / "exp"), "--device", "cpu")


def fake_voxceleb1(root: Path) -> Path:
    """3 speakers (id10001..3) x 3 utterances of noise in VoxCeleb1's layout, and the split file."""
    rng = np.random.default_rng(0)
    lines = []
    for spk in range(3):
        for utt, split in enumerate((1, 2, 3)):
            rel = f"id1000{spk + 1}/vid{spk}/{utt + 1:05d}.wav"
            path = root / ("test" if split == 3 else "dev") / "wav" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, (0.1 * rng.standard_normal(8000 + 1000 * utt)).astype(np.float32), 16000)
            lines.append(f"{split} {rel}")
    (root / "iden_split.txt").write_text("\n".join(lines) + "\n")
    return root / "iden_split.txt"


def test_voxceleb1_trains_and_caches_outside_site_packages(checkpoint, tmp_path, monkeypatch, s3prl_ready):
    import s3prl.downstream.voxceleb1 as vox_pkg

    package = Path(vox_pkg.__file__).parent
    before = sorted(p.relative_to(package) for p in package.rglob("*") if "__pycache__" not in p.parts)
    meta = fake_voxceleb1(tmp_path / "vox")
    exp = tmp_path / "exp"
    runner = make_runner(
        monkeypatch, "-m", "train", "-u", "hubert_local", "-k", str(checkpoint), "-d", "voxceleb1",
        "-c", str(VOX_CONFIG), "-p", str(exp), "--device", "cpu", "-o",
        datarc(file_path=tmp_path / "vox", meta_data=meta, num_workers=0, train_batch_size=2)
        + ",,config.runner.total_steps=2,,config.runner.gradient_accumulate_steps=1,,config.runner.log_step=1,,"
          "config.runner.eval_step=2,,config.runner.save_step=2")
    runner.train()
    after = sorted(p.relative_to(package) for p in package.rglob("*") if "__pycache__" not in p.parts)
    assert after == before  # nothing written into site-packages
    caches = sorted(p.name for p in (exp / s3prl_runner.VOXCELEB1_CACHE).glob("*/*.pkl"))
    assert caches == ["dev.pkl", "test.pkl", "train.pkl"]
    log = (exp / "log.log").read_text()
    assert re.search(r"^dev at step 2: ", log, re.M) and re.search(r"^test at step 2: ", log, re.M)
    assert (exp / "states-2.ckpt").is_file()
