"""The config checks that span keys (config.py checks each key's type and range while loading)."""

from __future__ import annotations

import math

from fedhubert.config import NUM_SPECIAL_SYMBOLS, Config
from fedhubert.errors import ConfigError


def check_config(cfg: Config) -> None:
    """Checks that span keys (a single field's range is checked while loading); one ConfigError naming
    the keys at the first that fails."""
    m, f = cfg.model, cfg.federation
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.num_attention_heads ({m.num_attention_heads}) must divide model.hidden_size ({m.hidden_size})")
    if m.vocab_size < cfg.kmeans.n_clusters + NUM_SPECIAL_SYMBOLS:
        raise ConfigError(f"model.vocab_size ({m.vocab_size}) must be at least kmeans.n_clusters + 4 "
                          f"({cfg.kmeans.n_clusters + NUM_SPECIAL_SYMBOLS})")
    if m.hidden_size % m.conv_pos_groups:
        raise ConfigError(f"model.conv_pos_groups ({m.conv_pos_groups}) must divide model.hidden_size ({m.hidden_size})")
    for key in ("min_fit_clients", "min_evaluate_clients", "min_available_clients"):
        if getattr(f, key) > cfg.partition.num_clients:
            raise ConfigError(f"federation.{key} ({getattr(f, key)}) exceeds partition.num_clients "
                              f"({cfg.partition.num_clients})")
    if f.trim_fraction >= 0.5:
        raise ConfigError(f"config key 'federation.trim_fraction' must be in [0.0, 0.5), got {f.trim_fraction!r}")
    sampled = max(int(cfg.partition.num_clients * f.fraction_fit), f.min_fit_clients)  # Flower's sample size
    if f.aggregation == "trimmed_mean" and int(f.trim_fraction * sampled) == 0:
        raise ConfigError(f"federation.trim_fraction ({f.trim_fraction}) cuts no client of the {sampled} sampled per "
                          f"round (int(trim_fraction x {sampled}) = 0): raise it to at least "
                          f"{math.ceil(1000 / sampled) / 1000} or use federation.aggregation=median")
    k = cfg.kmeans
    if k.codebook == "federated" and 0 < k.k_local * cfg.partition.num_clients < k.n_clusters:
        raise ConfigError(f"kmeans.k_local ({k.k_local}) x partition.num_clients ({cfg.partition.num_clients}) "
                          f"pools fewer local centres than kmeans.n_clusters ({k.n_clusters}) for the k-FED "
                          f"initialisation: raise kmeans.k_local (0 = n_clusters)")
    if k.percent <= 0.0:
        raise ConfigError(f"config key 'kmeans.percent' must be in (0, 1], got {k.percent!r}")
    if k.features == "hubert" and not k.checkpoint:
        raise ConfigError("kmeans.features is hubert but kmeans.checkpoint is empty: set it to the checkpoint whose "
                          "features are clustered, e.g. --set kmeans.checkpoint=<checkpoint_dir>/server/best_global_model.pt")
    if cfg.data.min_audio_length > cfg.data.max_audio_length:
        raise ConfigError("data.min_audio_length must not exceed data.max_audio_length")
    _check_privacy(cfg)
    _check_distillation(cfg)
    e = cfg.evaluation
    if e.keyword_test_voices >= e.keyword_voices:
        raise ConfigError(f"evaluation.keyword_test_voices ({e.keyword_test_voices}) must be below "
                          f"evaluation.keyword_voices ({e.keyword_voices}): some voices must train the probe")
    if len(set(e.keywords)) < 2:
        raise ConfigError("evaluation.keywords must hold at least two different words")


def _check_privacy(cfg: Config) -> None:
    p = cfg.privacy
    if not p.enabled:
        return
    # z = 0 or C = 0 promise nothing; with a target_epsilon, z is derived from it (privacy_accounting.py)
    for key in ("clipping_norm",) if p.target_epsilon > 0 else ("clipping_norm", "noise_multiplier"):
        if getattr(p, key) <= 0:
            raise ConfigError(f"config key 'privacy.{key}' must be above 0 with privacy.enabled, got {getattr(p, key)!r}")
    if p.adaptive_clipping:
        if not 0 < p.target_unclipped_quantile < 1:  # 0 or 1 drives C to 0 or to infinity
            raise ConfigError(f"config key 'privacy.target_unclipped_quantile' must be in (0, 1) with "
                              f"privacy.adaptive_clipping, got {p.target_unclipped_quantile!r}")
        if p.clip_norm_lr <= 0:
            raise ConfigError(f"config key 'privacy.clip_norm_lr' must be above 0 with privacy.adaptive_clipping, "
                              f"got {p.clip_norm_lr!r}")
        # the count's noise takes a share of z's budget: z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2 needs z < 2 sigma_b
        if p.target_epsilon == 0 and 0 < p.clipped_count_stddev <= p.noise_multiplier / 2:
            raise ConfigError(f"config key 'privacy.clipped_count_stddev' ({p.clipped_count_stddev}) must exceed "
                              f"privacy.noise_multiplier / 2 ({p.noise_multiplier / 2:g}) with "
                              "privacy.adaptive_clipping (0 = max(clients sampled / 20, z))")
    if not 0 < p.delta < 1:
        raise ConfigError(f"config key 'privacy.delta' must be in (0, 1) with privacy.enabled, got {p.delta!r}")
    if cfg.federation.aggregation != "mean":
        raise ConfigError(f"federation.aggregation is {cfg.federation.aggregation}, but privacy.enabled noises the "
                          "mean of clipped updates (a robust statistic has another sensitivity): use mean")
    if p.clipping == "client" and cfg.federation.wire_dtype != "float32":
        raise ConfigError(f"privacy.clipping=client needs federation.wire_dtype=float32 (Flower's fixedclipping_mod "
                          f"subtracts the arrays as they travel), got {cfg.federation.wire_dtype}")


def _check_distillation(cfg: Config) -> None:
    d = cfg.distillation
    if not d.teacher_frozen:
        raise ConfigError("distillation.teacher_frozen: false is not supported: the teacher is the federated "
                          "global model, fixed during distillation (updating it would need its own federation)")
    if not d.losses:
        raise ConfigError("distillation.losses must name at least one loss (logits, hidden)")
    if len(set(d.losses)) != len(d.losses):
        raise ConfigError(f"distillation.losses lists a loss twice: {d.losses}")
    if d.student_hidden_size % d.student_num_attention_heads:
        raise ConfigError(f"distillation.student_num_attention_heads ({d.student_num_attention_heads}) must divide "
                          f"distillation.student_hidden_size ({d.student_hidden_size})")
    if d.student_hidden_size % cfg.model.conv_pos_groups:
        raise ConfigError(f"model.conv_pos_groups ({cfg.model.conv_pos_groups}) must divide "
                          f"distillation.student_hidden_size ({d.student_hidden_size})")
    if any(layer < 1 for layer in d.target_layers):
        raise ConfigError(f"distillation.target_layers are 1-based transformer layers, got {d.target_layers}")
