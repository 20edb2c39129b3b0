"""The evaluation table's measurement primitives (fedhubert.probes) on constructed data whose right
answer is known: perfect, constant and random features, hand-computed joint distributions."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedhubert.errors import DataError
from fedhubert.probes import (equal_error_rate, effective_rank, joint_quality, label_perplexity,
                              layerwise_probe, linear_probe, mean_cosine_similarity, read_alignments,
                              unit_quality, verification_eer)


def speakers(n_speakers: int, per_speaker: int) -> np.ndarray:
    return np.repeat(np.arange(n_speakers), per_speaker)


def speaker_coded(y: np.ndarray, dim: int, rng: np.random.Generator, noise: float = 0.05) -> np.ndarray:
    """Features that encode the speaker perfectly: a one-hot speaker code plus small noise."""
    x = noise * rng.normal(size=(len(y), dim))
    x[np.arange(len(y)), y] += 1.0
    return x


# ----------------------------------------------------------------------------- probes

def test_perfect_feature_gives_accuracy_one_and_eer_zero():
    rng = np.random.default_rng(0)
    ytr, yte = speakers(5, 12), speakers(5, 6)
    xtr, xte = speaker_coded(ytr, 16, rng), speaker_coded(yte, 16, rng)
    assert linear_probe(xtr, ytr, xte, yte) == 1.0
    result = layerwise_probe(np.stack([xtr, xtr * 3]), ytr, np.stack([xte, xte * 3]), yte)
    assert result.per_layer == [1.0, 1.0]
    assert result.best_layer == 0 and result.best_accuracy == 1.0
    assert result.weighted_accuracy == 1.0
    assert sum(result.layer_weights) == pytest.approx(1.0)
    assert layerwise_probe(np.stack([xtr, xtr * 3]), ytr, np.stack([xte, xte * 3]), yte) == result  # seeded
    assert verification_eer(xte, yte) == 0.0


def test_constant_feature_gives_majority_accuracy_and_eer_half():
    ytr = np.array([0] * 30 + [1] * 20 + [2] * 10)  # unbalanced: majority class 0
    yte = np.array([0] * 12 + [1] * 5 + [2] * 3)
    xtr, xte = np.ones((len(ytr), 8)), np.ones((len(yte), 8))
    assert linear_probe(xtr, ytr, xte, yte) == pytest.approx(12 / 20)
    result = layerwise_probe(np.stack([xtr, 2 * xtr]), ytr, np.stack([xte, 2 * xte]), yte)
    assert result.per_layer == pytest.approx([0.6, 0.6])
    assert result.weighted_accuracy == pytest.approx(0.6)
    assert verification_eer(xte, yte) == 0.5
    assert verification_eer(np.zeros_like(xte), yte) == 0.5
    # Constant but not identical in memory layout or scale: still no information.
    direction = np.linspace(0.1, 0.7, 33)
    assert verification_eer(np.tile(direction, (40, 1)), speakers(8, 5)) == 0.5
    # Same direction, different lengths: cosines equal up to rounding, which must not rank the pairs.
    scaled = np.outer(np.random.default_rng(9).uniform(0.1, 10, size=40), direction)
    assert verification_eer(scaled, speakers(8, 5)) == 0.5


def test_random_features_give_eer_near_half():
    rng = np.random.default_rng(1)
    eer = verification_eer(rng.normal(size=(200, 32)), speakers(10, 20))
    assert 0.45 < eer < 0.55


def test_weighted_sum_finds_the_informative_layer():
    rng = np.random.default_rng(2)
    ytr, yte = speakers(6, 20), speakers(6, 10)
    num_layers, dim, informative = 5, 64, 3
    centers = rng.normal(size=(6, dim))
    train = rng.normal(size=(num_layers, len(ytr), dim))
    test = rng.normal(size=(num_layers, len(yte), dim))
    train[informative] += centers[ytr]
    test[informative] += centers[yte]
    result = layerwise_probe(train, ytr, test, yte, seed=0)
    assert result.best_layer == informative and result.best_accuracy > 0.9
    assert int(np.argmax(result.layer_weights)) == informative
    assert result.layer_weights[informative] > 0.7
    assert result.weighted_accuracy > 0.9
    assert sum(result.layer_weights) == pytest.approx(1.0)


def test_unseen_test_label_counts_as_error():
    rng = np.random.default_rng(3)
    ytr, yte = speakers(3, 10), np.array([0, 1, 2, 7])
    assert linear_probe(speaker_coded(ytr, 8, rng), ytr, speaker_coded(yte, 8, rng), yte) == 0.75


# ----------------------------------------------------------------------------- EER

def test_equal_error_rate_hand_computed():
    # Scores 0.9 0.8 0.7 0.3 0.1 with targets T N T N N (2 targets, 3 non-targets). Sweeping the
    # threshold down gives (false-alarm, miss) = (0, 1), (0, 1/2), (1/3, 1/2), (1/3, 0), ...; the
    # curves cross on the segment (1/3, 1/2) -> (1/3, 0), so EER = 1/3.
    assert equal_error_rate([0.9, 0.8, 0.7, 0.3, 0.1], [1, 0, 1, 0, 0]) == pytest.approx(1 / 3)
    # Ties: scores 3 2 2 1, targets T T N N. The tied pair is one ROC step (0, 1/2) -> (1/2, 0),
    # crossed halfway: EER = 1/4.
    assert equal_error_rate([3, 2, 2, 1], [1, 1, 0, 0]) == pytest.approx(0.25)
    assert equal_error_rate([4, 3, 2, 1], [1, 1, 0, 0]) == 0.0
    assert equal_error_rate([1, 2, 3, 4], [1, 1, 0, 0]) == 1.0
    assert equal_error_rate([5, 5, 5, 5], [1, 0, 1, 0]) == 0.5
    with pytest.raises(ValueError):
        equal_error_rate([1, 2], [1, 1])


def test_mean_cosine_similarity():
    assert mean_cosine_similarity(np.ones((5, 3))) == pytest.approx(1.0)
    assert mean_cosine_similarity(np.eye(4)) == pytest.approx(0.0)
    assert mean_cosine_similarity(np.array([[1.0, 0], [-2.0, 0]])) == pytest.approx(-1.0)
    # Pairs of different items only: [[1,0],[1,0],[0,1]] has pairs 1, 0, 0.
    assert mean_cosine_similarity(np.array([[1.0, 0], [1, 0], [0, 1]])) == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- collapse figures

def test_effective_rank():
    rng = np.random.default_rng(4)
    k, dim = 4, 48
    low_rank = rng.normal(size=(500, k)) @ rng.normal(size=(k, dim))
    assert 0.75 * k < effective_rank(low_rank) <= k + 1e-6
    # Equal singular values: exactly k.
    basis = np.linalg.qr(rng.normal(size=(dim, k)))[0].T
    equal = np.concatenate([basis, -basis]) * 3.0
    assert effective_rank(equal) == pytest.approx(k)
    assert effective_rank(rng.normal(size=(2000, 32))) > 0.95 * 32
    assert effective_rank(np.tile(rng.normal(size=dim), (50, 1))) == 0.0  # fully collapsed


def test_label_perplexity():
    assert label_perplexity(np.repeat(np.arange(7), 5)) == pytest.approx(7)
    assert label_perplexity(np.repeat(np.arange(7), 5), num_clusters=20) == pytest.approx(7)
    assert label_perplexity(np.zeros(10, dtype=int)) == pytest.approx(1)
    # Usage 1/2, 1/4, 1/4: entropy 1.5 bits, perplexity 2 ** 1.5.
    assert label_perplexity(np.array([0, 0, 1, 2])) == pytest.approx(2 ** 1.5)
    with pytest.raises(ValueError):
        label_perplexity(np.array([0, 5]), num_clusters=5)


# ----------------------------------------------------------------------------- unit quality

# Counts of (phone, unit) frames, rows = phones a b c, columns = units 0 1 2; 20 frames:
#        0  1  2
#   a    6  3  1      p(y) = (.5, .2, .3), p(z) = (.4, .25, .35)
#   b    0  2  2
#   c    2  0  4
# phone purity   = sum_z max_y p(y, z) = (6 + 3 + 4) / 20 = 0.65
# cluster purity = sum_y max_z p(y, z) = (6 + 2 + 4) / 20 = 0.60
# I(y; z) = .30 ln(.30/.20) + .15 ln(.15/.125) + .05 ln(.05/.175) + .10 ln(.10/.05)
#         + .10 ln(.10/.07) + .10 ln(.10/.12) + .20 ln(.20/.105)               = 0.301971
# H(y) = -(.5 ln .5 + .2 ln .2 + .3 ln .3)                                     = 1.029653
# PNMI = 0.301971 / 1.029653                                                    = 0.293275
# unit perplexity = exp(-(.4 ln .4 + .25 ln .25 + .35 ln .35))                  = 2.946234
HAND_COUNTS = np.array([[6, 3, 1], [0, 2, 2], [2, 0, 4]])
HAND = {"phone_purity": 0.65, "cluster_purity": 0.60, "pnmi": 0.293275, "unit_perplexity": 2.946234}


def frames_from_counts(counts: np.ndarray, phone_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(phone_names[y], z) for y in range(counts.shape[0]) for z in range(counts.shape[1])
             for _ in range(counts[y, z])]
    return np.array([p for p, _ in pairs]), np.array([z for _, z in pairs])


def test_joint_quality_hand_computed():
    scores = joint_quality(HAND_COUNTS)
    for key, value in HAND.items():
        assert scores[key] == pytest.approx(value, abs=1e-6), key


def test_unit_quality_hand_computed_through_frames():
    phones, units = frames_from_counts(HAND_COUNTS, ["a", "b", "c"])
    # Split over two utterances, in a shuffled order: only the joint counts matter.
    order = np.random.default_rng(5).permutation(20)
    phones, units = phones[order], units[order]
    scores = unit_quality({"u1": phones[:8], "u2": phones[8:]}, {"u1": units[:8], "u2": units[8:]},
                          phone_rate=50.0, unit_rate=50.0)
    assert scores["frames"] == 20
    for key, value in HAND.items():
        assert scores[key] == pytest.approx(value, abs=1e-6), key


def test_pnmi_one_for_relabeling_and_zero_for_independent():
    rng = np.random.default_rng(6)
    names = np.array(["AA", "B", "K", "S", "SIL"])
    phones = names[rng.integers(0, 5, size=3000)]
    relabel = {name: code for name, code in zip(names, [17, 3, 42, 0, 8])}
    units = np.array([relabel[p] for p in phones])
    perfect = unit_quality({"x": phones}, {"x": units}, phone_rate=50.0)
    assert perfect["pnmi"] == pytest.approx(1.0)
    assert perfect["phone_purity"] == pytest.approx(1.0)
    assert perfect["cluster_purity"] == pytest.approx(1.0)
    phones = names[rng.integers(0, 5, size=20000)]
    units = rng.integers(0, 10, size=20000)
    independent = unit_quality({"x": phones}, {"x": units}, phone_rate=50.0)
    assert independent["pnmi"] < 0.01
    assert independent["unit_perplexity"] == pytest.approx(10, rel=0.01)


def test_rate_alignment_100hz_phones_50hz_units():
    phones = {"utt": np.array(list("aabbccdd")), "only_phones": np.array(list("aa"))}
    units = {"utt": np.array([1, 2, 3, 4]), "only_units": np.array([9])}
    scores = unit_quality(phones, units)  # 100 Hz phones, 50 Hz units: each unit covers 2 phone frames
    assert scores["frames"] == 8
    assert scores["phone_purity"] == 1.0 and scores["cluster_purity"] == 1.0
    assert scores["pnmi"] == pytest.approx(1.0)
    # Without upsampling, units 1 2 3 4 would meet phones a a b b: cluster purity 0.5, not 1.
    # A frame or two of length difference (edge conventions) is cut off, not an error.
    longer = unit_quality({"utt": np.array(list("aabbccddd"))}, units)
    assert longer["frames"] == 8 and longer["pnmi"] == pytest.approx(1.0)
    assert unit_quality({"utt": np.array(list("aabbcc"))}, units)["frames"] == 6
    with pytest.raises(DataError, match="'utt'"):
        unit_quality({"utt": np.array(list("aabbccdd") * 2)}, units)
    with pytest.raises(DataError):
        unit_quality({"other": np.array(list("aa"))}, units)


# ----------------------------------------------------------------------------- alignment files

def test_read_alignments_good_file(tmp_path: Path):
    path = tmp_path / "dev.tsv"
    path.write_text("1272-128104-0000\tSIL,SIL,AH0,AH1,B\n1272-128104-0001\tK,AE1,T\n\n")
    align = read_alignments(path)
    assert list(align) == ["1272-128104-0000", "1272-128104-0001"]
    assert align["1272-128104-0000"].tolist() == ["SIL", "SIL", "AH", "AH", "B"]  # stress stripped
    assert align["1272-128104-0001"].tolist() == ["K", "AE", "T"]
    ids = tmp_path / "ids.tsv"
    ids.write_text("a\t3,3,12,0\nb\t7\n")
    align = read_alignments(ids)
    assert align["a"].dtype == np.int64 and align["a"].tolist() == [3, 3, 12, 0]


@pytest.mark.parametrize("bad_line", ["no-tab-here", "uid\t", "\tA,B", "uid\tA,,B", "uid\tA\tB", "u1\tX"])
def test_read_alignments_malformed_line_names_file_and_line(tmp_path: Path, bad_line: str):
    path = tmp_path / "bad.tsv"
    path.write_text(f"u1\tA,B\nu2\tC\n{bad_line}\nu3\tD\n")
    with pytest.raises(DataError, match=r"bad\.tsv:3:"):
        read_alignments(path)


def test_read_alignments_missing_file(tmp_path: Path):
    with pytest.raises(DataError, match="nope.tsv"):
        read_alignments(tmp_path / "nope.tsv")


def test_alignments_file_to_unit_quality(tmp_path: Path):
    path = tmp_path / "phones.tsv"
    path.write_text("u\tSIL,SIL,AH0,AH0,T,T\n")
    scores = unit_quality(read_alignments(path), {"u": np.array([5, 6, 7])})
    assert scores["pnmi"] == pytest.approx(1.0) and scores["frames"] == 6
    assert math.isclose(scores["unit_perplexity"], 3.0)
