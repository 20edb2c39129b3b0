"""Bad inputs, fuzzed (Hypothesis): config values (YAML files and ``--set``) and the files a stage reads
(client manifests and label files, config files, summary.json). Every script runs in this process, as
``__main__`` through ``run_main``, and must end in exactly one stderr line ``error: ...`` naming the key
or the file (and, for a file's content, its line), with exit status 2, no traceback and no output: the
partitions are unchanged byte for byte and no checkpoint, evaluation or partition folder appears.

The federated stages are stopped before Ray by their input checks (simulation.check_partitions); as a
safety net the simulation and the evaluation's keyword set (after its input checks) are replaced by an
AssertionError here, so a check that lets a bad input through fails the test at once instead of training.
README.md, "Bad inputs, tried", lists what is tried and what each gets."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
import runpy
import shutil
import sys
import typing
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import soundfile as sf
import yaml
from hypothesis import HealthCheck, event, example, given, settings, strategies as st

from conftest import BASE_CONFIG, REPO, TINY
from fedhubert.config import MAX_INT, Config, num_frames

SCRIPTS = ["partition_data.py", "generate_kmeans_targets.py", "federated_hubert_pretraining.py",
           "federated_distillation.py", "evaluate.py"]
LABEL_READERS = ["federated_hubert_pretraining.py", "federated_distillation.py", "evaluate.py"]
N_CLUSTERS = 20  # model.vocab_size 24 below: ids must be in [0, 20)
SIZES = {"client_0": {"train": [1600, 2000, 4000], "valid": [1200]},
         "client_1": {"train": [3200, 800], "valid": [2400, 960]}}
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Stop(AssertionError):
    """A stage went past its input checks on a bad input."""


def run_script(name: str, args: list[str]) -> tuple[object, str, str]:
    """(exit status, stdout, stderr) of ``name`` run as ``__main__`` in this process."""
    out, err = io.StringIO(), io.StringIO()
    code: object = 0
    with mock.patch.object(sys, "argv", [str(REPO / name), *args]), \
            mock.patch("fedhubert.federation.simulation.simulate", side_effect=Stop("the federation started")), \
            mock.patch("fedhubert.eval_rows.keyword_set", side_effect=Stop("the evaluation started")), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(str(REPO / name), run_name="__main__")
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: object, out: str, err: str, *names: str) -> str:
    """Exit 2, nothing on stdout, exactly one ``error:`` line on stderr holding every one of ``names``."""
    assert code == 2, (code, err)
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n") and "\r" not in err, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------
# Config values
# ---------------------------------------------------------------------------------------------------

def _fields() -> list[tuple[str, object, dict]]:
    """(dotted key, type, knob metadata) of every config key."""
    rows, hints = [], typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        if not dataclasses.is_dataclass(hints[section.name]):
            rows.append((section.name, hints[section.name], dict(section.metadata)))
            continue
        cls = hints[section.name]
        sub = typing.get_type_hints(cls)
        rows += [(f"{section.name}.{f.name}", sub[f.name], dict(f.metadata)) for f in dataclasses.fields(cls)]
    return rows


FIELDS = _fields()
SECTIONS = [f.name for f in dataclasses.fields(Config) if f.name != "seed"]
NUL_TEXT = st.builds(lambda a, b: f"{a}\0{b}", st.text(max_size=5), st.text(max_size=5))
NOT_A_NUMBER = st.text(max_size=12).filter(lambda t: not _is_float(t))
OTHER = st.one_of(st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf, "nan", "-inf", "1e999", 10**400])


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _ints(meta: dict) -> st.SearchStrategy:
    """Integers outside the key's range, and integers beyond int64."""
    low, high = meta.get("low"), meta.get("high")
    bad = [st.integers(min_value=MAX_INT + 1, max_value=10**30), st.integers(max_value=-MAX_INT - 1, min_value=-10**30)]
    if low is not None:
        bad.append(st.integers(max_value=math.ceil(low) - 1, min_value=-10**6))
    if high is not None:
        bad.append(st.integers(min_value=math.floor(high) + 1, max_value=10**12))
    return st.one_of(bad)


def _floats(meta: dict) -> st.SearchStrategy:
    low, high = meta.get("low"), meta.get("high")
    bad = [NON_FINITE]
    if low is not None:
        bad.append(FLOATS.filter(lambda v: v < low))
    if high is not None:
        bad.append(FLOATS.filter(lambda v: v > high))
    return st.one_of(bad)


def bad_value(tp: object, meta: dict) -> st.SearchStrategy:
    """Values the loader must refuse for a key of type ``tp`` with ``meta``'s range and choices."""
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        bad_item = bad_value(item, {"choices": meta.get("choices")})
        return st.one_of(st.text(max_size=8), st.integers(), st.builds(lambda v: [v], bad_item))
    if tp is bool:
        return st.one_of(st.integers(), FLOATS, st.text(max_size=8), OTHER)
    if tp is int:
        return st.one_of(_ints(meta), FLOATS.filter(lambda v: v != int(v)), st.booleans(), NOT_A_NUMBER, OTHER)
    if tp is float:
        return st.one_of(_floats(meta), st.booleans(), NOT_A_NUMBER, OTHER)
    if tp is str:
        choices = meta.get("choices")
        wrong = st.one_of(st.integers(), FLOATS, st.booleans(), OTHER, NUL_TEXT)
        return st.one_of(wrong, st.text(max_size=12).filter(lambda t: t not in choices)) if choices else wrong
    other_text = st.text(max_size=8).filter(lambda t: t not in meta["choices"] and not _reads_as_number(t))
    if float in typing.get_args(tp):  # float | str (federation.client_num_gpus): out of range, or another string
        return st.one_of(_floats(meta), st.booleans(), other_text)
    # int | str (training.batch_size): neither a positive integer nor one of the strings
    return st.one_of(_ints(meta), FLOATS, st.booleans(), other_text)


def _reads_as_number(text: str) -> bool:
    """Whether the config loader may read ``text`` as a number (Python's float(), or YAML's 0x1, 1_0, ...)."""
    with contextlib.suppress(ValueError):
        float(text)
        return True
    try:
        return isinstance(yaml.safe_load(text), (int, float))
    except yaml.YAMLError:
        return False


NAME = st.text(min_size=1, max_size=10).filter(lambda t: t == t.strip() and "." not in t and "=" not in t)


def family(tp: object) -> str:
    """The kind of a key's type: bool, int, float, str, list or int|str (a number or one of some strings)."""
    if typing.get_origin(tp) is list:
        return "list"
    return tp.__name__ if isinstance(tp, type) else "int|str"


CONFIG_KINDS = ["bool", "int", "float", "str", "list", "int|str", "unknown key", "not a mapping", "device"]


@st.composite
def bad_config(draw: st.DrawFn, kind: str) -> tuple[tuple[str, ...], object, str]:
    """(the key's path, its bad value, what the error must name) of one ``kind`` (CONFIG_KINDS)."""
    if kind == "unknown key":
        section = draw(st.sampled_from(SECTIONS + [None]))
        known = {key.split(".")[-1] for key, _, _ in FIELDS} | set(SECTIONS) | {"seed", "extends"}
        name = draw(NAME.filter(lambda t: t not in known))
        return ((section, name) if section else (name,)), 1, name
    if kind == "not a mapping":
        section = draw(st.sampled_from(SECTIONS))
        return (section,), draw(st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2))), section
    if kind == "device":  # a string the loader accepts; check_device refuses it, naming the key
        name = draw(st.text(max_size=12).filter(lambda t: not re.fullmatch(r"auto|cpu(:\d+)?|cuda(:\d+)?", t)
                                                and "\0" not in t))
        return ("training", "device"), name, "training.device"
    key, tp, meta = draw(st.sampled_from([f for f in FIELDS if family(f[1]) == kind]))
    return tuple(key.split(".")), draw(bad_value(tp, meta)), key


def _nested(parts: tuple[str, ...], value: object) -> dict:
    for part in reversed(parts):
        value = {part: value}
    return value


@pytest.mark.parametrize("kind", CONFIG_KINDS)
@settings(FUZZ, max_examples=6)
@given(data=st.data())
def test_bad_config_values_end_in_one_line_naming_the_key(tmp_path_factory, kind, data):
    parts, value, named = data.draw(bad_config(kind))
    via, script = data.draw(st.sampled_from(["--set", "yaml"])), data.draw(st.sampled_from(SCRIPTS))
    event(f"{via}: {script}")
    check_bad_config(tmp_path_factory, parts, value, named, via, script)


@pytest.mark.parametrize("parts, value, named, via, script", [
    (("training", "learning_rate"), math.nan, "training.learning_rate", "--set", "evaluate.py"),
    (("federation", "eta"), 10**400, "federation.eta", "--set", "generate_kmeans_targets.py"),
    (("seed",), 10**20, "seed", "yaml", "partition_data.py"),
    (("data", "partitions_dir"), "a\0b", "data.partitions_dir", "--set", "partition_data.py"),
    (("data", "line\nbreak"), 1, "line\nbreak", "yaml", "federated_hubert_pretraining.py"),
], ids=["NaN", "float overflow", "beyond int64", "NUL", "line break"])
def test_config_values_that_once_got_through_end_in_one_line(tmp_path_factory, parts, value, named, via, script):
    check_bad_config(tmp_path_factory, parts, value, named, via, script)


def check_bad_config(tmp_path_factory, parts: tuple[str, ...], value: object, named: str, via: str, script: str) -> None:
    """Runs ``script`` with ``value`` at key ``parts`` (by --set or a YAML file): one line naming ``named``."""
    work = tmp_path_factory.mktemp("cfg")
    guards = [f"data.partitions_dir={work / 'parts'}", f"data.librispeech_root={work / 'corpus'}",
              f"federation.checkpoint_dir={work / 'ckpt'}", f"evaluation.output_dir={work / 'eval'}"]
    args = ["--config", str(BASE_CONFIG), *[a for g in guards for a in ("--set", g)]]
    if via == "--set":  # after the guards: they are in place whatever the bad key would break
        text = yaml.safe_dump(value, default_flow_style=True, width=10**9).removesuffix("...\n").strip()
        args += ["--set", f"{'.'.join(parts)}={text}"]
    else:
        path = work / "bad.yaml"
        path.write_text(yaml.safe_dump({"extends": str(BASE_CONFIG), **_nested(parts, value)}, width=10**9))
        args[1] = str(path)
    err = assert_one_line_error(*run_script(script, args))
    assert named.replace("\r", "\\r").replace("\n", "\\n") in err, (named, err)
    assert sorted(p.name for p in work.iterdir()) == (["bad.yaml"] if via == "yaml" else [])


CONFIG_FILES = st.sampled_from([
    (b"model:\n  hidden_size: 8\n\xff\xfe\n", 3),          # not UTF-8, on line 3
    (b"\xc3\x28: 1\n", 1),
    (b"model: [unclosed\n", None),                         # not YAML
    (b"- a\n- b\n", None),                                 # not a mapping
    (b"extends: 3\n", None),
    (b"extends: [a.yaml]\n", None),
    (b"extends: no_such_base.yaml\n", None),
    (b"model:\n\thidden_size: 8\n", None),                 # a tab
    (b"model: " + b"[" * 5000 + b"]" * 5000 + b"\n", None),  # nested past the parser's recursion
])


@settings(FUZZ, max_examples=12)
@given(case=CONFIG_FILES, script=st.sampled_from(SCRIPTS))
def test_bad_config_files_end_in_one_line_naming_the_file(tmp_path_factory, case, script):
    data, line = case
    work = tmp_path_factory.mktemp("cfgfile")
    path = work / "bad.yaml"
    path.write_bytes(data)
    err = assert_one_line_error(*run_script(script, ["--config", str(path)]))
    assert str(path) in err or "no_such_base.yaml" in err
    if line is not None:
        assert f"{path}:{line}:" in err


# ---------------------------------------------------------------------------------------------------
# Manifests and label files
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clean_partitions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two clients' train/valid manifests and labels over short WAV files, all well formed."""
    base = tmp_path_factory.mktemp("clean")
    audio, parts = base / "audio", base / "parts"
    audio.mkdir()
    rng = np.random.default_rng(0)
    for client, splits in SIZES.items():
        (parts / client).mkdir(parents=True)
        for split, sizes in splits.items():
            tsv, km = [str(audio)], []
            for i, n in enumerate(sizes):
                name = f"{client}_{split}_{i}.wav"
                sf.write(audio / name, 0.1 * rng.standard_normal(n).astype(np.float32), 16000)
                tsv.append(f"{name}\t{n}")
                km.append(" ".join(str(v) for v in rng.integers(0, N_CLUSTERS, num_frames(n))))
            (parts / client / f"{split}.tsv").write_text("\n".join(tsv) + "\n")
            (parts / client / f"{split}.km").write_text("\n".join(km) + "\n")
    (parts / "summary.json").write_text(json.dumps({"num_clients": 2, "sample_rate": 16000}))
    return parts


def stage_args(work: Path, parts: Path, script: str) -> list[str]:
    config = REPO / "configs" / ("distillation_config.yaml" if script == "federated_distillation.py" else "pretraining_config.yaml")
    sets = [*[s for s in TINY if not s.startswith("partition.num_clients")], "partition.num_clients=2",
            f"model.vocab_size={N_CLUSTERS + 4}", f"data.partitions_dir={parts}",
            f"federation.checkpoint_dir={work / 'ckpt'}", f"distillation.checkpoint_dir={work / 'dckpt'}",
            f"distillation.teacher_model_path={work / 'teacher.pt'}", f"evaluation.output_dir={work / 'eval'}",
            "distillation.student_hidden_size=32", "distillation.student_num_attention_heads=2"]
    return ["--config", str(config), *[a for s in sets for a in ("--set", s)]]


BAD_BYTES = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80abc", b"\xf8\x88\x80\x80\x80"])
BAD_SIZES = st.one_of(st.integers(max_value=-1).map(str), st.integers(2**31, 10**30).map(str),
                      st.integers(0, 399).map(str), st.floats(400, 1e6).map(repr), st.sampled_from(["", "1e4", "²", "٣٣٣٣", "0x1000", "4_000", "abc"]))
BAD_IDS = st.one_of(st.integers(N_CLUSTERS, 2**62).map(str), st.integers(-2**62, -1).map(str),
                    st.integers(2**63, 10**30).map(str), st.sampled_from(["1.5", "x", "0x1", "nan", "²"]))


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _write(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


TSV_KINDS = ["truncated line", "bad length", "non-UTF-8", "missing audio", "empty", "missing file"]
KM_KINDS = ["label line dropped", "label line added", "label count", "bad id", "label non-UTF-8", "labels empty",
            "labels missing"]


@st.composite
def bad_client_file(draw: st.DrawFn, kind: str) -> tuple[str, str, dict]:
    """One way (``kind``) to break one client file, applied by :func:`apply`: (kind, "client_<k>/<split>",
    the drawn details)."""
    client = draw(st.sampled_from(sorted(SIZES)))
    split = draw(st.sampled_from(["train", "valid"]))
    n = len(SIZES[client][split])
    return kind, f"{client}/{split}", {"entry": draw(st.integers(0, n - 1)), "n": n, "bad_size": draw(BAD_SIZES),
                                       "bad_id": draw(BAD_IDS), "bad_bytes": draw(BAD_BYTES), "cut": draw(st.floats(0, 1)),
                                       "delta": draw(st.integers(1, 5)), "fewer": draw(st.booleans()),
                                       "blank": draw(st.integers(0, 2)), "at": draw(st.floats(0, 1))}


def apply(parts: Path, kind: str, stem: str, a: dict) -> tuple[Path, int | None]:
    """Breaks one file under ``parts``; returns (the file the error must name, its line or None)."""
    tsv, km = parts / f"{stem}.tsv", parts / f"{stem}.km"
    t_line = a["entry"] + 2  # line 1 is the audio root
    if kind == "truncated line":  # cut before the number: no tab, or nothing after it
        line = _lines(tsv)[t_line - 1]
        keep = 1 + int(a["cut"] * (line.index(b"\t") - 1))  # never the whole line: a blank line is no line
        lines = _lines(tsv)
        lines[t_line - 1] = line[:keep] + (b"\t" if a["fewer"] else b"")
        _write(tsv, lines)
        return tsv, t_line
    if kind == "bad length":
        lines = _lines(tsv)
        lines[t_line - 1] = lines[t_line - 1].split(b"\t")[0] + b"\t" + a["bad_size"].encode()
        _write(tsv, lines)
        return tsv, t_line
    if kind in ("non-UTF-8", "label non-UTF-8"):
        path, line = (tsv, t_line) if kind == "non-UTF-8" else (km, a["entry"] + 1)
        lines = _lines(path)
        text = lines[line - 1]
        pos = int(a["at"] * len(text))
        lines[line - 1] = text[:pos] + a["bad_bytes"] + text[pos:]
        _write(path, lines)
        return path, line
    if kind == "missing audio":
        lines = _lines(tsv)
        lines[t_line - 1] = b"gone/" + lines[t_line - 1]
        _write(tsv, lines)
        return tsv, t_line
    if kind in ("empty", "labels empty"):
        path = tsv if kind == "empty" else km
        path.write_bytes(b"")
        return path, 1
    if kind in ("missing file", "labels missing"):
        path = tsv if kind == "missing file" else km
        path.unlink()
        return path, None
    # label files: optional blank lines first, so the line numbers must be the file's, not the labels'
    lines = [b""] * a["blank"] + _lines(km)
    row = a["blank"] + a["entry"]  # 0-based index of the utterance's label line
    if kind == "label line dropped":
        del lines[row]
        expect = a["blank"] + a["n"] if a["n"] > 1 else 1  # the line after the last label line
    elif kind == "label line added":
        lines.insert(row, lines[row])
        expect = a["blank"] + a["n"] + 1
    elif kind == "label count":
        ids = lines[row].split()
        ids = ids[:max(1, len(ids) - a["delta"])] if a["fewer"] else ids + ids[:1] * a["delta"]  # every line has 2+
        lines[row] = b" ".join(ids)
        expect = row + 1
    else:  # bad id
        ids = lines[row].split()
        ids[int(a["at"] * (len(ids) - 1))] = a["bad_id"].encode()
        lines[row] = b" ".join(ids)
        expect = row + 1
    _write(km, lines)
    return km, expect


def check_bad_files(work: Path, clean: Path, script: str, mutation: tuple) -> None:
    kind, stem, a = mutation
    parts = work / "parts"
    shutil.copytree(clean, parts)
    path, line = apply(parts, kind, stem, a)
    before = snapshot(parts)
    err = assert_one_line_error(*run_script(script, stage_args(work, parts, script)), str(path))
    if line is not None:
        assert f"{path}:{line}:" in err, (kind, line, err)
    assert snapshot(parts) == before
    assert sorted(p.name for p in work.iterdir()) == ["parts"]  # no checkpoint or evaluation folder


@pytest.mark.parametrize("kind", TSV_KINDS + KM_KINDS)
@settings(FUZZ, max_examples=4)
@given(data=st.data())
def test_bad_manifests_and_labels_stop_the_training_stages_in_one_line(tmp_path_factory, clean_partitions, kind, data):
    script = data.draw(st.sampled_from(LABEL_READERS))
    event(script)
    check_bad_files(tmp_path_factory.mktemp("stage"), clean_partitions, script, data.draw(bad_client_file(kind)))


@pytest.mark.parametrize("kind", TSV_KINDS)
@settings(FUZZ, max_examples=3)
@given(data=st.data())
def test_bad_manifests_stop_the_targets_before_anything_is_fitted(tmp_path_factory, clean_partitions, kind, data):
    check_bad_files(tmp_path_factory.mktemp("targets"), clean_partitions, "generate_kmeans_targets.py",
                    data.draw(bad_client_file(kind)))


BAD_JSON = pytest.mark.parametrize("text", [b"[1, 2]", b"\xff\xfe", b"{", b"[" * 5000],
                                   ids=["list", "non-UTF-8", "not JSON", "deep"])


@BAD_JSON
@pytest.mark.parametrize("name, script", [("summary.json", "generate_kmeans_targets.py"),
                                          ("targets.json", "federated_hubert_pretraining.py")])
def test_a_bad_json_record_stops_the_stage_that_reads_it_in_one_line(tmp_path, clean_partitions, text, name, script):
    parts = tmp_path / "parts"
    shutil.copytree(clean_partitions, parts)
    (parts / name).write_bytes(text)
    before = snapshot(parts)
    assert_one_line_error(*run_script(script, stage_args(tmp_path, parts, script)), str(parts / name), "JSON object")
    assert snapshot(parts) == before and sorted(p.name for p in tmp_path.iterdir()) == ["parts"]


HELDOUT = "utt_id,speaker,chapter,path\n1-1-0001,1,1,a.flac\n2-1-0001,2,1,b.flac\n"


@pytest.mark.parametrize("text, line", [
    (HELDOUT.encode().replace(b"b.flac", b"b\xff.flac"), 3),       # not UTF-8
    (HELDOUT.replace("speaker,", "spk,").encode(), 2),              # a column missing
    (HELDOUT.replace("2,1,b.flac", "2,1,").encode(), 3),            # an empty path
    (HELDOUT.replace(",1,a.flac", "").encode(), 2),                 # a truncated row
], ids=["non-UTF-8", "column missing", "empty path", "truncated row"])
def test_a_bad_heldout_csv_stops_the_evaluation_in_one_line(tmp_path, clean_partitions, text, line):
    parts = tmp_path / "parts"
    shutil.copytree(clean_partitions, parts)
    (parts / "heldout.csv").write_bytes(text)
    before = snapshot(parts)
    err = assert_one_line_error(*run_script("evaluate.py", stage_args(tmp_path, parts, "evaluate.py")))
    assert f"{parts / 'heldout.csv'}:{line}:" in err
    assert snapshot(parts) == before and sorted(p.name for p in tmp_path.iterdir()) == ["parts"]


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


CODEBOOK = _npy(np.zeros((N_CLUSTERS, 39), dtype=np.float32))


@pytest.mark.parametrize("data, words", [
    (b"", "not a readable codebook"),
    (CODEBOOK[:30], "not a readable codebook"),                       # the header cut short
    (CODEBOOK[:200], "not a readable codebook"),                      # the data cut short
    (bytes(range(256)), "not a readable codebook"),
    (_npy(np.array([{"a": 1}], dtype=object)), "not a readable codebook"),
    (_npy(np.zeros(N_CLUSTERS, dtype=np.float32)), "is not a [K, D] codebook"),
    (_npy(np.zeros((N_CLUSTERS + 1, 39), dtype=np.float32)), "model.vocab_size"),  # more clusters than labels
], ids=["empty", "header cut", "data cut", "random bytes", "objects", "1-D", "too many clusters"])
def test_a_bad_codebook_stops_the_pretraining_in_one_line(tmp_path, clean_partitions, data, words):
    parts = tmp_path / "parts"
    shutil.copytree(clean_partitions, parts)
    (parts / "codebook.npy").write_bytes(data)
    before = snapshot(parts)
    args = stage_args(tmp_path, parts, "federated_hubert_pretraining.py") + ["--set", "kmeans.codebook=federated"]
    assert_one_line_error(*run_script("federated_hubert_pretraining.py", args), str(parts / "codebook.npy"), words)
    assert snapshot(parts) == before and sorted(p.name for p in tmp_path.iterdir()) == ["parts"]
