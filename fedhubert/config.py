"""Every config key, defined once: a typed dataclass field with its default, a one-line meaning and
its valid range. YAML files and ``--set section.key=value`` overrides are validated against it.

A YAML file may start with ``extends: other.yaml`` (relative to itself) to take another file as its
base; its own keys then override the base's, section by section. Every other relative path (the
``--config`` file, and path keys in a file or a ``--set``) is relative to the folder the command runs in.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedhubert.config_files import parse_override, read_layers
from fedhubert.errors import ConfigError

# The model's frame geometry, fixed by the CNN feature encoder (receptive field 400 samples, stride
# 320 = 20 ms at 16 kHz). MFCC frames use the same window and hop so that label i describes frame i.
FRAME_LENGTH = 400
FRAME_STRIDE = 320
# fairseq dictionaries start with <s>, <pad>, </s>, <unk>: cluster id c is target c + 4.
NUM_SPECIAL_SYMBOLS = 4
MAX_INT = 2**63 - 1  # an integer key must fit int64
# The repository: its configs/ hold every script's default config, whatever folder the script runs in.
REPO_ROOT = Path(__file__).resolve().parents[1]


def knob(default: Any, help: str, *, low: float | None = None, high: float | None = None,
         choices: tuple | None = None) -> Any:
    """A config field: its default, its one-line meaning and its valid range or choices."""
    meta = {"help": help, "low": low, "high": high, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def num_frames(num_samples: int) -> int:
    """Frames the model (and the MFCC front end) produce for ``num_samples`` samples of audio."""
    return max(0, (num_samples - FRAME_LENGTH) // FRAME_STRIDE + 1)


@dataclass
class DataConfig:
    librispeech_root: str = knob("corpus/LibriSpeech", "LibriSpeech root in the released layout (holds SPEAKERS.TXT and the subset folders), or a Libri-Light root (holds small/, medium/, ...)")
    subsets: list[str] = knob([], "subset folders to scan, e.g. [train-clean-100]; empty = every subset folder except LibriSpeech's dev-*/test-* evaluation sets (named, they are scanned with a warning)")
    require_transcripts: bool = knob(False, "reject utterances without a transcript line (false: keep them with an empty transcript; pretraining needs none)")
    partitions_dir: str = knob("data/partitions", "where partition_data.py writes manifests and client folders")
    sample_rate: int = knob(16000, "model sample rate in Hz; other rates are resampled on load", low=8000, high=48000)
    max_audio_length: int = knob(40000, "training crop length in samples (40000 = 2.5 s at 16 kHz)", low=FRAME_LENGTH)
    min_audio_length: int = knob(FRAME_LENGTH, "shorter utterances are rejected (need at least one frame)", low=FRAME_LENGTH)
    mask_length: int = knob(10, "frames per masked span", low=1)
    mask_prob: float = knob(0.08, "per-frame chance of starting a masked span (HuBERT paper's p; fairseq's mask_prob = p * mask_length)", low=0.0, high=1.0)
    scan_workers: int = knob(8, "threads reading audio headers once the reads wait on the storage (cached files: one)",
                             low=1, high=256)


@dataclass
class PartitionConfig:
    method: str = knob("speaker_based", "how utterances go to clients", choices=("speaker_based", "iid", "dirichlet"))
    num_clients: int = knob(3, "number of federated clients", low=1)
    valid_fraction: float = knob(0.1, "share of each client's utterances held out for validation", low=0.0, high=0.9)
    dirichlet_alpha: float = knob(0.5, "Dirichlet concentration for method=dirichlet (small = more skew)", low=1e-6)
    heldout_per_speaker: int = knob(0, "utterances per speaker kept out of every client for evaluation (heldout.tsv)", low=0)


@dataclass
class KMeansConfig:
    n_clusters: int = knob(100, "clusters per client, or of the shared codebook with codebook=federated (upper bound; see min_frames_per_cluster)", low=2)
    min_frames_per_cluster: int = knob(20, "a client fits min(n_clusters, fitting frames // this) clusters: its train frames, or kmeans.percent of them (codebook=federated: all clients' together)", low=1)
    n_mfcc: int = knob(13, "MFCC coefficients", low=1, high=40)
    n_mels: int = knob(40, "mel filterbank channels behind the MFCC", low=1, high=128)
    use_deltas: bool = knob(True, "append delta and delta-delta MFCC (39 dims, as HuBERT's first iteration)")
    batch_size: int = knob(10000, "frames per MiniBatchKMeans partial_fit step", low=1)
    fit_passes: int = knob(2, "passes over the client's training frames while fitting", low=1)
    workers: int = knob(0, "codebook=local with mfcc: clients fitted and labelled in this many parallel processes, one thread each (0 = the CPU cores from 2 hours of audio on, else 1; 1 = one client after another in this process)", low=0)
    codebook: str = knob("federated", "local: a k-means per client (ids mean something on that client only, heads stay local); "
                         "federated: one codebook for all clients, fitted by federated k-means, and a federated head",
                         choices=("local", "federated"))
    max_rounds: int = knob(20, "codebook=federated: most federated k-means rounds after the k-FED initialisation", low=1)
    tol: float = knob(1e-4, "codebook=federated: stop once the relative change of the inertia per frame between rounds is below this", low=0.0)
    k_local: int = knob(0, "codebook=federated: centres of each client's local k-means for the k-FED initialisation (0 = n_clusters)", low=0)
    update: str = knob("lloyd", "codebook=federated: lloyd (exact Lloyd step on the sampled clients' pooled statistics) or minibatch (running-mean step)", choices=("lloyd", "minibatch"))
    features: str = knob("mfcc", "what is clustered: mfcc (HuBERT's first iteration) or hubert (the layer-kmeans.layer output of the model in kmeans.checkpoint: the next iteration)", choices=("mfcc", "hubert"))
    checkpoint: str = knob("", "features=hubert: the checkpoint whose features are clustered, e.g. the last iteration's best_global_model.pt (ignored with mfcc)")
    layer: int = knob(0, "features=hubert: 1-based transformer layer whose output is clustered; 0 = ceil(num_hidden_layers / 2), layer 6 of a 12-layer Base as in the paper", low=0)
    percent: float = knob(1.0, "share of each client's training frames that fits k-means: whole utterances, drawn uniformly (seeded) until they hold this share (fairseq: 0.1); every frame is still labelled", low=0.0, high=1.0)


@dataclass
class ModelConfig:
    hidden_size: int = knob(768, "transformer width", low=8)
    num_hidden_layers: int = knob(12, "transformer layers", low=1)
    num_attention_heads: int = knob(12, "attention heads (must divide hidden_size)", low=1)
    intermediate_size: int = knob(3072, "feed-forward width", low=1)
    conv_dim: int = knob(512, "channels of the 7-layer CNN feature encoder", low=1)
    hidden_dropout: float = knob(0.1, "dropout after attention and feed-forward blocks", low=0.0, high=1.0)
    attention_dropout: float = knob(0.1, "dropout on attention weights", low=0.0, high=1.0)
    activation_dropout: float = knob(0.0, "dropout inside the feed-forward block", low=0.0, high=1.0)
    feat_proj_dropout: float = knob(0.1, "dropout on projected CNN features (fairseq dropout_input)", low=0.0, high=1.0)
    dropout_features: float = knob(0.1, "fairseq HubertConfig key, exported as is; fairseq's HuBERT (and ours) never applies it", low=0.0, high=1.0)
    layerdrop: float = knob(0.05, "probability of skipping a transformer layer in training", low=0.0, high=1.0)
    vocab_size: int = knob(504, "target symbols: clusters + fairseq's 4 special symbols", low=NUM_SPECIAL_SYMBOLS + 2)
    final_dim: int = knob(256, "dimension of final_proj and the label embeddings", low=1)
    logit_temp: float = knob(0.1, "temperature of the cosine-similarity logits", low=1e-6)
    layer_norm_first: bool = knob(False, "pre-norm transformer (Large/X-Large) instead of post-norm (Base)")
    feature_grad_mult: float = knob(0.1, "gradient scale into the CNN feature encoder", low=0.0, high=1.0)
    conv_pos: int = knob(128, "kernel of the convolutional positional embedding", low=2)
    conv_pos_groups: int = knob(16, "groups of the convolutional positional embedding", low=1)


@dataclass
class TrainingConfig:
    batch_size: int | str = knob(8, "utterance crops per step, or 'auto' (largest that fits memory)", low=1, choices=("auto",))
    local_epochs: int = knob(1, "passes over the client's train split per round", low=1)
    max_local_steps: int = knob(0, "cap on optimizer steps per round (0 = no cap)", low=0)
    learning_rate: float = knob(5e-4, "client AdamW peak learning rate (FedAdam's eta_l)", low=0.0)
    weight_decay: float = knob(0.01, "AdamW weight decay", low=0.0)
    warmup_steps: int = knob(0, "linear warm-up steps of the client learning rate, each round", low=0)
    grad_clip_norm: float = knob(10.0, "gradient norm clip (0 = off)", low=0.0)
    precision: str = knob("fp32", "autocast precision", choices=("fp32", "bf16", "fp16"))
    gradient_checkpointing: bool = knob(False, "recompute transformer activations in backward to save memory")
    pred_masked_weight: float = knob(1.0, "loss weight of masked frames", low=0.0)
    pred_nomask_weight: float = knob(0.0, "loss weight of unmasked frames", low=0.0)
    feature_pen_weight: float = knob(10.0, "weight of the CNN feature L2 penalty", low=0.0)
    device: str = knob("auto", "'auto' (cuda when available), 'cpu' or 'cuda[:N]'")
    memory_budget_gb: float = knob(0.0, "memory for batch_size=auto (0 = half the free RAM / GPU memory)", low=0.0)
    loader_workers: int = knob(0, "DataLoader processes per client reading and cropping audio while it trains (0 = in the training process)", low=0, high=64)


@dataclass
class FederationConfig:
    num_rounds: int = knob(2, "federated rounds", low=1)
    fraction_fit: float = knob(1.0, "share of clients sampled for training each round", low=0.0, high=1.0)
    fraction_evaluate: float = knob(1.0, "share of clients sampled for evaluation each round", low=0.0, high=1.0)
    min_fit_clients: int = knob(2, "fewest clients that must train (and succeed) for a round", low=1)
    min_evaluate_clients: int = knob(2, "fewest clients sampled for evaluation", low=1)
    min_available_clients: int = knob(2, "fewest connected clients before a round starts", low=1)
    strategy: str = knob("fedadam", "server optimizer: Flower's fedavg (weighted mean), fedavgm, fedadam or fedyogi", choices=("fedavg", "fedavgm", "fedadam", "fedyogi"))
    eta: float = knob(1e-2, "server learning rate (FedAdam/FedYogi eta, FedAvgM server_learning_rate)", low=0.0)
    server_momentum: float = knob(0.9, "FedAvgM server momentum", low=0.0, high=1.0)
    beta_1: float = knob(0.9, "FedAdam/FedYogi first-moment decay", low=0.0, high=1.0)
    beta_2: float = knob(0.99, "FedAdam/FedYogi second-moment decay", low=0.0, high=1.0)
    tau: float = knob(1e-3, "FedAdam/FedYogi adaptivity (epsilon)", low=0.0)
    aggregation: str = knob("mean", "statistic of the client models that every server optimizer steps from: mean (weighted by num-examples), median or trimmed_mean (coordinate-wise, one vote per client)", choices=("mean", "median", "trimmed_mean"))
    trim_fraction: float = knob(0.2, "trimmed_mean: share of the clients cut from each end per coordinate, int(trim_fraction x clients) each (0.2 cuts nothing below 5 clients)", low=0.0, high=0.5)
    round_timeout: float = knob(3600.0, "seconds to wait for client replies in a round", low=1.0)
    client_num_cpus: float = knob(1.0, "CPU cores reserved per simulated client", low=0.0)
    client_num_gpus: float | str = knob("auto", "GPUs reserved per simulated client: a fraction shares one (0.5: two clients per GPU, each batch_size=auto budgeting half of it); auto = 1 when CUDA is visible and training.device is not cpu, else 0", low=0.0, high=1.0, choices=("auto",))
    wire_dtype: str = knob("float32", "dtype of weights on the wire", choices=("float32", "float16", "bfloat16"))
    checkpoint_dir: str = knob("checkpoints/pretraining", "server/ and clients/ checkpoints, metrics and plots")
    keep_last_checkpoints: int = knob(3, "round_<r>.pt files kept", low=1)
    collapse_rank_ratio: float = knob(0.1, "a round whose effective rank (first, middle or last layer) falls below this share of round 0's is collapsed (0 = off)", low=0.0, high=1.0)
    collapse_max_cosine: float = knob(0.9999, "a round whose mean cosine of 0.5 s embeddings exceeds this is collapsed (1 = off)", low=0.0, high=1.0)
    stop_on_collapse: bool = knob(False, "stop the run at a collapsed round instead of going on (the best model is never a collapsed one)")
    init_checkpoint: str = knob("", "pretraining: round 0 starts from this checkpoint's encoder (e.g. the last iteration's best_global_model.pt) with a fresh seeded head, unless both heads are federated on the same codebook.npy; empty = the seeded random init")


@dataclass
class PrivacyConfig:
    enabled: bool = knob(False, "client-level differential privacy of the shared weights: clipped updates, their uniform mean noised before the server optimizer's step, epsilon accounted each round")
    clipping_norm: float = knob(1.0, "C: bound on the flat L2 norm of each client's update (its weights minus the global weights it received); with adaptive_clipping, its first value", low=0.0)
    noise_multiplier: float = knob(1.0, "z: Gaussian noise of std z * C / (clients sampled) on the averaged update (the z accounted; see target_epsilon, adaptive_clipping)", low=0.0)
    clipping: str = knob("server", "where updates are clipped: server, or client (Flower's fixedclipping_mod, or adaptiveclipping_mod with adaptive_clipping; needs wire_dtype float32); the server re-clips either way", choices=("server", "client"))
    delta: float = knob(1e-5, "delta of the (epsilon, delta) guarantee reported every round", low=0.0, high=1.0)
    max_epsilon: float = knob(0.0, "privacy budget: the run stops, its last checkpoint kept, before a round that would take epsilon above this (0 = no budget)", low=0.0)
    target_epsilon: float = knob(0.0, "derive z instead: the smallest for which the run's rounds (federation.num_rounds; distillation.num_rounds) spend at most this epsilon at delta (0 = use noise_multiplier)", low=0.0)
    adaptive_clipping: bool = knob(False, "C follows the target_unclipped_quantile of the update norms (Andrew et al. 2021): C <- C exp(-clip_norm_lr (b - gamma)), b the noised share of unclipped updates")
    target_unclipped_quantile: float = knob(0.5, "gamma: adaptive_clipping aims C at this quantile of the clients' update norms (the share left unclipped)", low=0.0, high=1.0)
    clip_norm_lr: float = knob(0.2, "eta_C: adaptive_clipping's geometric step size", low=0.0)
    clipped_count_stddev: float = knob(0.0, "sigma_b: std of the noise on the count of unclipped updates; the update's noise then rises to z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2; 0 = max(clients sampled / 20, z)", low=0.0)


@dataclass
class DistillationConfig:
    teacher_model_path: str = knob("checkpoints/pretraining/server/best_global_model.pt", "the teacher: a checkpoint written by run_pretraining.sh (or any s3prl HuBERT checkpoint for losses [hidden])")
    teacher_heads_dir: str = knob("", "folder of the clients' pretraining heads (client_<k>/head_round_<r>.pt; a "
                                  "kmeans.codebook=local teacher only); empty = clients/ beside the teacher's server/ folder")
    teacher_frozen: bool = knob(True, "the teacher is never updated (false is rejected: a trained teacher would need a federation of its own)")
    losses: list[str] = knob(["logits", "hidden"], "losses to combine: logits (KD on masked frames + CE on the labels), hidden (DistilHuBERT layer prediction)", choices=("logits", "hidden"))
    alpha: float = knob(0.5, "logits loss: alpha * T^2 * KL(softmax(teacher/T), softmax(student/T)) + (1 - alpha) * CE(student, labels)", low=0.0, high=1.0)
    temperature: float = knob(2.0, "softmax temperature T of the KD term", low=1e-3)
    hidden_weight: float = knob(1.0, "weight of the hidden loss next to the logits loss", low=0.0)
    cos_weight: float = knob(1.0, "hidden loss: L1 + cos_weight * (-log sigmoid(cosine)), as DistilHuBERT", low=0.0)
    target_layers: list[int] = knob([], "teacher layers (1 = first transformer layer) the hidden heads regress; empty = 1/3, 2/3 and all of the teacher's depth")
    student_hidden_size: int = knob(384, "student transformer width", low=8)
    student_num_layers: int = knob(6, "student transformer layers", low=1)
    student_num_attention_heads: int = knob(6, "student attention heads (must divide student_hidden_size)", low=1)
    student_intermediate_size: int = knob(1536, "student feed-forward width", low=1)
    student_conv_dim: int = knob(0, "student CNN channels; 0 = the teacher's (required to copy the teacher's CNN)", low=0)
    init_from_teacher: list[str] = knob(["cnn"], "what the student copies from the teacher: cnn (CNN encoder), layers (front end + every k-th transformer layer; widths must match)", choices=("cnn", "layers"))
    num_rounds: int = knob(2, "federated distillation rounds", low=1)
    checkpoint_dir: str = knob("checkpoints/distillation", "server/ and clients/ checkpoints, metrics and plots of the distillation")


@dataclass
class EvaluationConfig:
    output_dir: str = knob("evaluation", "evaluation.json/.md/.png, the baselines' checkpoints and caches")
    rows: list[str] = knob(["federated", "centralized", "student", "random-init", "mfcc"], "models in the table (student: when distillation has run)", choices=("federated", "centralized", "student", "random-init", "mfcc"))
    segment_seconds: float = knob(2.0, "speaker probes: held-out utterances are cut into segments of this length", low=0.1)
    keywords: list[str] = knob(["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"], "words of the espeak-ng keyword probe")
    keyword_voices: int = knob(16, "espeak-ng voices speaking the keywords", low=2)
    keyword_test_voices: int = knob(4, "of them, voices the keyword classifier never trains on", low=1)
    keyword_rates: list[int] = knob([140, 180], "espeak-ng speaking rates (words per minute) of every voice")
    alignments: str = knob("", "frame-level phone alignment file (uid<TAB>p1,p2,... at 100 Hz) for PNMI and purity; empty = none")
    centralized_init: str = knob("", "centralized row of a next-iteration run (kmeans.features hubert or federation.init_checkpoint): the last iteration's centralized model (its evaluation folder's centralized/model.pt), clustered and started from as the federated run uses its federated model; empty = MFCC targets and the seeded init")


@dataclass
class Config:
    seed: int = knob(42, "seed of partitioning, k-means, initialisation and training", low=0)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def validate(self) -> "Config":
        """Checks that span keys (a single field's range is checked while loading): config_checks.py."""
        from fedhubert.config_checks import check_config

        check_config(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML- and torch.load(weights_only=True)-safe)."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any, meta: dict) -> Any:
    """Returns ``value`` as type ``tp`` or raises ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option, meta)
            except ConfigError:
                continue
        allowed = " or ".join(_type_name(a) for a in typing.get_args(tp))
        raise ConfigError(f"config key '{key}' must be {allowed}"
                          + (f" (strings: {', '.join(meta['choices'])})" if meta.get("choices") else "")
                          + f", got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        item_meta = {"choices": meta.get("choices")}  # a list's choices constrain each item
        return [_coerce(f"{key}[{i}]", v, item_tp, item_meta) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        value = int(value)
        if not -MAX_INT <= value <= MAX_INT:  # numpy, torch and the checkpoints hold it as int64
            raise ConfigError(f"config key '{key}' must be an integer within +-(2**63 - 1), got {value!r}")
    elif tp is float:
        if isinstance(value, str):  # YAML reads 5e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float range
            value = math.inf
        if not math.isfinite(value):  # NaN passes every range check below; no key means anything by inf
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        if "\0" in value:  # no path, word or device name holds one; os and libsndfile calls reject it
            raise ConfigError(f"config key '{key}' must not contain a NUL character, got {value!r}")
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(meta['choices'])}; got {value!r}")
        return value
    low, high = meta.get("low"), meta.get("high")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ConfigError(f"config key '{key}' must be in {bounds}, got {value!r}")
    return value


def _apply(obj: Any, values: dict, prefix: str, source: str) -> None:
    """Sets the fields of dataclass ``obj`` from ``values``, validating every key."""
    hints = typing.get_type_hints(type(obj))
    known = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in known:
            raise ConfigError(f"unknown config key '{key}' in {source}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config section '{key}' in {source} must be a mapping, got {value!r}")
            _apply(getattr(obj, name), value, f"{key}.", source)
        else:
            setattr(obj, name, _coerce(key, value, tp, dict(known[name].metadata)))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (and its bases), then ``--set`` overrides; validated."""
    cfg = Config()
    if path is not None:
        for doc, source in read_layers(Path(path)):
            _apply(cfg, doc, "", source)
    for text in overrides:
        _apply(cfg, parse_override(text), "", f"--set {text}")
    return cfg.validate()


def config_from_dict(values: dict) -> Config:
    """Rebuilds a Config saved with ``Config.to_dict`` (e.g. from a checkpoint), validated."""
    cfg = Config()
    _apply(cfg, values, "", "saved config")
    return cfg.validate()


def describe_keys() -> list[tuple[str, str, Any, str, str]]:
    """(key, type, default, meaning, valid values) of every key, for the README and ``--help-config``."""
    rows: list[tuple[str, str, Any, str, str]] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                rows.append((prefix + f.name, _type_name(hints[f.name]), default, f.metadata["help"],
                             _valid_values(f.metadata)))

    walk(Config, "")
    return rows


def _valid_values(meta: Any) -> str:
    """A key's choices or range as text ("" when any value of its type is valid)."""
    if meta.get("choices"):
        return "one of " + ", ".join(meta["choices"])
    low, high = meta.get("low"), meta.get("high")
    if low is not None and high is not None:
        return f"[{low}, {high}]"
    return f">= {low}" if low is not None else f"<= {high}" if high is not None else ""
