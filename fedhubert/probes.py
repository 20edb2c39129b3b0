"""Measurement primitives of the evaluation table: linear and layer-wise probes (speaker ID, keyword),
speaker-verification EER, representation-collapse figures and the HuBERT unit-quality metrics
(phone purity, cluster purity, PNMI). Pure functions on numpy arrays; the only file I/O is
:func:`read_alignments`. Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from fedhubert.errors import DataError

# The SUPERB-style weighted-sum probe: a fixed full-batch schedule, so its cost and result do not
# depend on early-stopping heuristics (about 0.8 s for L=13, N=200, D=768 on one CPU core). With
# N < D every layer mix can fit the training set; the weight decay is what makes the mix prefer the
# layers with real class structure (lr 0.05 / decay 1e-3 picked noise layers on weak signals).
WEIGHTED_STEPS = 200
WEIGHTED_LR = 0.1
WEIGHTED_DECAY = 1e-2
# Scores closer than this are ties: identical embeddings must give identical cosine scores even when
# BLAS sums them in a different order for different pairs (a constant embedding must give EER 0.5).
SCORE_RESOLUTION = 1e-9
# ARPAbet stress markers (AH0, AH1, AH2): fairseq's read_phn strips them by default.
_STRESS = re.compile(r"(?<=[A-Za-z])[0-9]+$")


@dataclass
class LayerProbeResult:
    per_layer: list[float]        # accuracy of a linear classifier on each layer's features
    best_layer: int               # index into per_layer (0 = CNN/projection output, as s3prl's hidden_states)
    best_accuracy: float
    weighted_accuracy: float      # SUPERB-style learned weighted sum of layers
    layer_weights: list[float]    # the learned softmax weights, sum to 1


# ----------------------------------------------------------------------------- probes

def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score both sets with the train statistics; constant features become 0 (not NaN)."""
    train = np.asarray(train, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    mean = train.mean(axis=-2, keepdims=True)
    std = train.std(axis=-2, keepdims=True)
    std[std < 1e-12] = 1.0
    return (train - mean) / std, (test - mean) / std


def _encode_labels(train_y: np.ndarray, test_y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Class indices 0..C-1 from the train labels; a test label never seen in training gets -1 (which
    no classifier predicts, so it counts as an error instead of silently matching another class)."""
    classes, train_idx = np.unique(np.asarray(train_y), return_inverse=True)
    test_y = np.asarray(test_y)
    pos = np.clip(np.searchsorted(classes, test_y), 0, len(classes) - 1)
    test_idx = np.where(classes[pos] == test_y, pos, -1)
    return train_idx, test_idx, len(classes)


def _check_xy(x: np.ndarray, y: np.ndarray, what: str) -> None:
    if x.ndim != 2 or len(x) != len(y) or len(y) == 0:
        raise ValueError(f"{what}: expected features [N, D] and N labels, got {x.shape} and {np.shape(y)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: features contain NaN or Inf")


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 *, seed: int = 0) -> float:
    """Test accuracy of multinomial logistic regression on train-standardized features."""
    train_x, test_x = np.asarray(train_x), np.asarray(test_x)
    _check_xy(train_x, train_y, "train"), _check_xy(test_x, test_y, "test")
    ytr, yte, num_classes = _encode_labels(train_y, test_y)
    if num_classes == 1:  # scikit-learn refuses one class; the only sensible prediction is that class
        return float(np.mean(yte == 0))
    xtr, xte = _standardize(train_x, test_x)
    clf = LogisticRegression(max_iter=1000, random_state=seed)  # lbfgs: multinomial for C > 2
    with warnings.catch_warnings():
        # Reaching max_iter still gives a usable classifier; a warning per layer would only be noise.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(xtr, ytr)
    return float(np.mean(clf.predict(xte) == yte))


def layerwise_probe(train_layers: np.ndarray, train_y: np.ndarray, test_layers: np.ndarray,
                    test_y: np.ndarray, *, seed: int = 0) -> LayerProbeResult:
    """A linear probe per layer, plus a SUPERB-style probe on softmax(w)-weighted layers.

    ``train_layers`` is [L, N, D] and ``test_layers`` [L, M, D] (utterance-level features)."""
    train_layers, test_layers = np.asarray(train_layers), np.asarray(test_layers)
    if train_layers.ndim != 3 or test_layers.ndim != 3 or train_layers.shape[0] != test_layers.shape[0] \
            or train_layers.shape[2] != test_layers.shape[2]:
        raise ValueError(f"expected [L, N, D] and [L, M, D], got {train_layers.shape} and {test_layers.shape}")
    per_layer = [linear_probe(tr, train_y, te, test_y, seed=seed) for tr, te in zip(train_layers, test_layers)]
    best = int(np.argmax(per_layer))  # the first (lowest) layer on ties
    weighted, weights = _weighted_sum_probe(train_layers, train_y, test_layers, test_y, seed=seed)
    return LayerProbeResult(per_layer=per_layer, best_layer=best, best_accuracy=per_layer[best],
                            weighted_accuracy=weighted, layer_weights=weights)


def _weighted_sum_probe(train_layers: np.ndarray, train_y: np.ndarray, test_layers: np.ndarray,
                        test_y: np.ndarray, *, seed: int) -> tuple[float, list[float]]:
    """Layer weights softmax(w) learned jointly with a linear classifier on sum_l softmax(w)_l * z_l,
    where z_l is layer l standardized on train statistics (so no layer wins by its scale alone)."""
    num_layers = train_layers.shape[0]
    ytr, yte, num_classes = _encode_labels(train_y, test_y)
    if num_classes == 1:
        return float(np.mean(yte == 0)), [1.0 / num_layers] * num_layers
    ztr, zte = _standardize(train_layers, test_layers)
    xtr = torch.from_numpy(ztr.astype(np.float32))
    xte = torch.from_numpy(zte.astype(np.float32))
    target = torch.from_numpy(ytr.astype(np.int64))

    gen = torch.Generator().manual_seed(seed)  # a private generator: the global RNG stays untouched
    dim = xtr.shape[-1]
    logits_w = torch.zeros(num_layers, requires_grad=True)  # start from the uniform mix
    weight = (torch.randn(dim, num_classes, generator=gen) * 0.01).requires_grad_()
    bias = torch.zeros(num_classes, requires_grad=True)
    params = [logits_w, weight, bias]
    # Weight decay on the classifier only, as s3prl's featurizer weights are not decayed: the mix is
    # then pushed towards the layers that separate the classes with the smallest classifier norm.
    decay = [0.0, WEIGHTED_DECAY, WEIGHTED_DECAY]

    def forward(x: torch.Tensor) -> torch.Tensor:
        mixed = torch.einsum("l,lnd->nd", torch.softmax(logits_w, dim=0), x)
        return mixed @ weight + bias

    # One thread: on a busy 2-core machine OpenMP's waiting threads made this 10x slower, and a fixed
    # thread count keeps the float sums (so the result) the same on every machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _adam(lambda: torch.nn.functional.cross_entropy(forward(xtr), target), params, decay)
        with torch.no_grad():
            pred = forward(xte).argmax(dim=1).numpy()
            weights = torch.softmax(logits_w, dim=0).tolist()
    finally:
        torch.set_num_threads(threads)
    return float(np.mean(pred == yte)), weights


def _adam(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor], decay: list[float]) -> None:
    """WEIGHTED_STEPS full-batch steps of Adam (L2 decay added to the gradient, as torch.optim.Adam).
    Written out because torch.optim's first step imports torch._dynamo: seconds for 200 tiny steps."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    first = [torch.zeros_like(p) for p in params]
    second = [torch.zeros_like(p) for p in params]
    for step in range(1, WEIGHTED_STEPS + 1):
        grads = torch.autograd.grad(loss_fn(), params)
        with torch.no_grad():
            for p, g, m, v, wd in zip(params, grads, first, second, decay):
                g = g + wd * p if wd else g
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v / (1 - beta2 ** step)).sqrt_().add_(eps)
                p.addcdiv_(m, denom, value=-WEIGHTED_LR / (1 - beta1 ** step))


# ----------------------------------------------------------------------------- verification

def equal_error_rate(scores: np.ndarray, is_target: np.ndarray) -> float:
    """EER of trials (higher score = same): where the ROC's miss rate equals its false-alarm rate,
    interpolated linearly between ROC points (tied scores form one diagonal ROC segment)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    is_target = np.asarray(is_target, dtype=bool).ravel()
    if len(scores) != len(is_target):
        raise ValueError(f"{len(scores)} scores but {len(is_target)} labels")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or Inf")
    num_target, num_nontarget = int(is_target.sum()), int((~is_target).sum())
    if num_target == 0 or num_nontarget == 0:
        raise ValueError(f"EER needs target and non-target trials, got {num_target} and {num_nontarget}")
    order = np.argsort(-scores, kind="stable")
    scores, is_target = scores[order], is_target[order]
    # One ROC point per distinct threshold: accept everything scoring >= it.
    last_of_group = np.r_[scores[1:] != scores[:-1], True]
    tp = np.cumsum(is_target)[last_of_group]
    fp = np.cumsum(~is_target)[last_of_group]
    far = np.r_[0.0, fp / num_nontarget]
    frr = np.r_[1.0, 1.0 - tp / num_target]
    diff = frr - far  # starts at 1, ends at -1 (or 0), never increases
    i = int(np.argmax(diff <= 0))  # first point at or past the crossing (i >= 1)
    d0, d1 = diff[i - 1], diff[i]
    t = d0 / (d0 - d1)
    return float(far[i - 1] + t * (far[i] - far[i - 1]))


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; zero rows stay zero (their cosine with anything is 0, not NaN)."""
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"expected embeddings [N, D], got {emb.shape}")
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or Inf")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return np.divide(emb, norms, out=np.zeros_like(emb), where=norms > 0)


def verification_eer(embeddings: np.ndarray, speakers: np.ndarray) -> float:
    """EER over all unordered pairs i < j, scored by cosine similarity, target = same speaker."""
    speakers = np.asarray(speakers)
    if len(speakers) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embeddings but {len(speakers)} speakers")
    unit = _unit_rows(embeddings)
    if not unit.any() or np.all(unit == unit[0]):  # all zero or all pointing the same way: no information
        return 0.5
    i, j = np.triu_indices(len(unit), k=1)
    scores = np.round((unit @ unit.T)[i, j] / SCORE_RESOLUTION) * SCORE_RESOLUTION
    return equal_error_rate(scores, speakers[i] == speakers[j])


def mean_cosine_similarity(embeddings: np.ndarray) -> float:
    """Mean cosine similarity over pairs of different items (near 1 = collapsed embeddings)."""
    unit = _unit_rows(embeddings)
    n = len(unit)
    if n < 2:
        raise ValueError("mean cosine similarity needs at least two embeddings")
    # sum over i != j of u_i . u_j = |sum_i u_i|^2 - sum_i |u_i|^2, without the N x N matrix.
    total = unit.sum(axis=0)
    return float((total @ total - np.sum(unit * unit)) / (n * (n - 1)))


# ----------------------------------------------------------------------------- collapse figures

def _entropy(counts: np.ndarray) -> float:
    """Shannon entropy (nats) of a distribution given by non-negative weights; 0 log 0 = 0."""
    p = np.asarray(counts, dtype=np.float64).ravel()
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def effective_rank(features: np.ndarray) -> float:
    """exp(entropy of the normalized singular values) of centered [N, D] features (Roy & Vetterli,
    2007): between 1 and min(N, D); near 1 means collapse. All-equal rows give 0."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"expected finite features [N, D], got shape {x.shape}")
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    if s[0] <= 1e-12 * np.linalg.norm(x):  # only rounding noise left after centering
        return 0.0
    return float(np.exp(_entropy(s)))


def label_perplexity(labels: np.ndarray, num_clusters: int | None = None) -> float:
    """exp(entropy) of the cluster usage distribution: K for K equally used clusters.

    With ``num_clusters`` the labels must be integers in [0, num_clusters) (unused clusters add nothing)."""
    labels = np.asarray(labels).ravel()
    if len(labels) == 0:
        raise ValueError("label perplexity of no labels")
    if num_clusters is None:
        _, counts = np.unique(labels, return_counts=True)
    else:
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= num_clusters:
            raise ValueError(f"labels must be integers in [0, {num_clusters})")
        counts = np.bincount(labels, minlength=num_clusters)
    return float(np.exp(_entropy(counts)))


# ----------------------------------------------------------------------------- unit quality

def read_alignments(path: Path) -> dict[str, np.ndarray]:
    """Frame-level phone labels in the format of fairseq's examples/hubert/measure_teacher_quality.py:
    one line per utterance, ``uid<TAB>p1,p2,...`` (100 Hz). Stress digits are stripped from
    ARPAbet phones (AH0 -> AH) as fairseq does; a file of integer ids gives int64 arrays."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read alignments ({e})") from e
    rows: dict[str, list[str]] = {}
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines: it also splits on \f, \x1c...
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise DataError(f"{path}:{lineno}: expected 'uid<TAB>p1,p2,...', got {line[:80]!r}")
        uid, tokens = parts[0].strip(), [t.strip() for t in parts[1].split(",")]
        if not all(tokens):
            raise DataError(f"{path}:{lineno}: empty phone label in {uid!r}")
        if uid in rows:
            raise DataError(f"{path}:{lineno}: utterance {uid!r} appears twice")
        rows[uid] = tokens
    if not rows:
        raise DataError(f"{path}: no alignments in the file")
    if all(t.isdigit() for tokens in rows.values() for t in tokens):
        return {uid: np.asarray(tokens, dtype=np.int64) for uid, tokens in rows.items()}
    return {uid: np.asarray([_STRESS.sub("", t) for t in tokens]) for uid, tokens in rows.items()}


def _to_rate(labels: np.ndarray, rate: float, target_rate: float) -> np.ndarray:
    """Labels resampled to ``target_rate`` (>= rate) by holding each frame: frame i at the target rate
    takes the label of source frame floor(i * rate / target_rate). For an integer ratio k this is
    fairseq's ``upsample`` (np.repeat by k)."""
    if target_rate == rate:
        return labels
    n = int(round(len(labels) * target_rate / rate))
    idx = np.minimum((np.arange(n) * rate / target_rate).astype(np.int64), len(labels) - 1)
    return labels[idx]


def unit_quality(phones: dict[str, np.ndarray], units: dict[str, np.ndarray], *,
                 phone_rate: float = 100.0, unit_rate: float = 50.0,
                 max_frame_diff: int = 2) -> dict[str, float]:
    """Phone purity, cluster purity and PNMI of discrete units against frame-level phone labels, as
    defined in the HuBERT paper (Hsu et al. 2021, "Analysis") and fairseq's
    examples/hubert/measure_teacher_quality.py, over the utterances present in both dicts.

    With p(y, z) the joint distribution of phone y and unit z over frames:
    phone purity = E_z[max_y p(y|z)], cluster purity = E_y[max_z p(z|y)], PNMI = I(y; z) / H(y).
    Both streams are brought to the finer of the two rates by holding frames (fairseq repeats the
    units ``upsample`` times), then cut to the shorter length, as fairseq does. An utterance whose
    durations differ by more than ``max_frame_diff`` frames of the coarser rate is an error: that is
    a misalignment, not the usual frame or two lost at the edges by different window conventions.
    ``frames`` counts the frames scored, at the finer rate (fairseq's "frm tot")."""
    common = [uid for uid in phones if uid in units]
    if not common:
        raise DataError("unit quality: no utterance has both phone alignments and units")
    if phone_rate <= 0 or unit_rate <= 0:
        raise ValueError(f"rates must be positive, got phone_rate={phone_rate}, unit_rate={unit_rate}")
    rate = max(phone_rate, unit_rate)
    tolerance = max_frame_diff / min(phone_rate, unit_rate) + 1e-9  # seconds
    ys, zs = [], []
    for uid in common:
        y, z = np.asarray(phones[uid]).ravel(), np.asarray(units[uid]).ravel()
        gap = abs(len(y) / phone_rate - len(z) / unit_rate)
        if gap > tolerance:
            raise DataError(f"unit quality: utterance {uid!r} has {len(y)} phone frames ({phone_rate:g} Hz) "
                            f"but {len(z)} unit frames ({unit_rate:g} Hz): {gap:.3f} s apart")
        if len(y) == 0 or len(z) == 0:
            continue
        y, z = _to_rate(y, phone_rate, rate), _to_rate(z, unit_rate, rate)
        n = min(len(y), len(z))
        ys.append(y[:n]), zs.append(z[:n])
    if not ys:
        raise DataError("unit quality: the common utterances have no frames")
    _, y_idx = np.unique(np.concatenate(ys), return_inverse=True)
    _, z_idx = np.unique(np.concatenate(zs), return_inverse=True)
    joint = np.zeros((y_idx.max() + 1, z_idx.max() + 1))
    np.add.at(joint, (y_idx, z_idx), 1.0)
    scores = joint_quality(joint)
    scores["frames"] = float(len(y_idx))
    return scores


def joint_quality(joint: np.ndarray) -> dict[str, float]:
    """Phone purity, cluster purity, PNMI and unit perplexity from a joint count or probability
    table [phones, units] (rows y = phones, columns z = units)."""
    p = np.asarray(joint, dtype=np.float64)
    p = p / p.sum()
    p_y, p_z = p.sum(axis=1), p.sum(axis=0)
    # E_z[max_y p(y|z)] = sum_z max_y p(y, z), and likewise for cluster purity.
    phone_purity = float(p.max(axis=0).sum())
    cluster_purity = float(p.max(axis=1).sum())
    nz = p > 0
    mutual_info = float((p[nz] * np.log(p[nz] / np.outer(p_y, p_z)[nz])).sum())
    h_y = _entropy(p_y)
    # One phone class: H(y) = 0 and PNMI is 0/0; report 0 (the units explain no phone uncertainty).
    pnmi = mutual_info / h_y if h_y > 0 else 0.0
    return {"phone_purity": phone_purity, "cluster_purity": cluster_purity,
            "pnmi": float(min(max(pnmi, 0.0), 1.0)), "unit_perplexity": float(np.exp(_entropy(p_z)))}
