"""Client-level differential privacy of the shared weights (``privacy.*``), valid with every server
optimizer, FedAdam included.

Each round (the Gaussian mechanism of DP-FedAvg, McMahan et al., ICLR 2018):

1. every sampled client's update ``u_i = w_i - x_t`` (its weights minus the global weights it received) is
   clipped to flat L2 norm C over all shared arrays: on the client by Flower's ``fixedclipping_mod`` with
   ``privacy.clipping: client``, and on the server in any case (Flower's ``clip_inputs_inplace``), so no
   reply, honest or not, contributes more than C;
2. the clipped updates are summed with equal weights (a ``num-examples`` weight would let one client move
   the average by more than C/n), Gaussian noise of std z*C (z_delta*C with adaptive clipping) is added to
   the sum and the sum is divided by
   n, the number of clients *sampled* (Flower's ``compute_stdv``: std z*C/n on the average). A client that
   fails or is dropped adds nothing, which lies inside the clipping ball: the guarantee holds and n stays
   the sampled count (the average only shrinks);
3. only then does the server optimizer see it: FedAdam's ``delta_t`` is this noised average, and m_t, v_t
   and the step are post-processing of it.

Flower's ``DifferentialPrivacy{Server,Client}SideFixedClipping`` wrappers instead add the noise to the model
the wrapped strategy returns, after FedAdam's step: FedAdam divides by sqrt(v_t) + tau, so one client can move
its step by about eta per coordinate, far more than the C/n the noise is calibrated to, and m_t, v_t keep
un-noised updates (Flower's own accountant refuses any strategy but FedAvg for that reason). So the noise is
added here, before the step, by the aggregation hook every strategy shares (aggregation.py).

Adaptive clipping (``privacy.adaptive_clipping``; Andrew et al., NeurIPS 2021): C starts at
``privacy.clipping_norm`` and after each round moves toward the ``target_unclipped_quantile`` gamma of the
update norms, C <- C exp(-eta_C (b - gamma)), b the share of sampled clients whose update was not clipped,
released with Gaussian noise of std sigma_b on its count. The bits come from the server's own norms with
``clipping: server``, and from Flower's ``adaptiveclipping_mod`` (a ``norm_bit`` metric, 1 = clipped) with
``clipping: client``; they never reach the logged client metrics. Flower's own
``DifferentialPrivacy*AdaptiveClipping`` wrappers are not used: besides noising after the step, Flower 1.42
feeds the *clipped* share into the paper's update for the *unclipped* one, which drives C away from the
quantile (to 0 when most updates are clipped). The noise split and the accounting: privacy_accounting.py.

Accounting: Flower's ``RdpAccountant`` (privacy_accounting.py: replace-one without replacement when fewer
clients are sampled than there are, else add-or-remove-one), z from ``privacy.noise_multiplier`` or derived
from ``privacy.target_epsilon``. The guarantee covers the model (every global checkpoint and everything the
clients receive) and C; the clients' reported metrics (losses, accuracies, num-examples, representation health)
and the choice of the best round from them are not protected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp import GaussianPrivacyEvent
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, clip_inputs_inplace, compute_stdv, get_norm

from fedhubert.config import Config, PrivacyConfig
from fedhubert.errors import FederationError
from fedhubert.federation.privacy_accounting import new_accountant, noise_plan, privacy_event

CLIP_TOLERANCE = 1e-3  # relative: a client-side clip that arrives a float32 rounding above C is not "clipped on server"
KEY_ADAPTIVE_CLIPPING = "adaptive_clipping"  # in the train config: the client clips with adaptiveclipping_mod


def sample_size(cfg: Config) -> int:
    """Clients Flower's FedAvg.configure_train samples per round: max(int(N x fraction_fit), min_fit_clients)."""
    return max(int(cfg.partition.num_clients * cfg.federation.fraction_fit), cfg.federation.min_fit_clients)


def private_mean(models: list[dict[str, np.ndarray]], global_arrays: dict[str, np.ndarray], clipping_norm: float,
                 noise_multiplier: float, num_sampled: int, rng: np.random.Generator
                 ) -> tuple[dict[str, np.ndarray], list[float]]:
    """``x_t + (sum_i clip(w_i - x_t, C) + N(0, (zC)^2 I)) / n`` in float32, and each update's norm before
    clipping. One update is held at a time next to the running sum."""
    keys = list(global_arrays)
    total = {k: np.zeros(global_arrays[k].shape, dtype=np.float32) for k in keys}
    norms = []
    for model in models:
        update = [np.asarray(model[k], dtype=np.float32) - global_arrays[k] for k in keys]
        norm = get_norm(update)  # Flower's flat L2 norm over all arrays
        norms.append(norm)
        if norm > clipping_norm:
            clip_inputs_inplace(update, clipping_norm)  # Flower's FlatClip: scales every array by C / norm
        for k, u in zip(keys, update, strict=True):
            total[k] += u
    std = compute_stdv(noise_multiplier, clipping_norm, num_sampled)  # z*C/n
    combined = {}
    for k in keys:
        mean = total[k] / np.float32(num_sampled)
        if std > 0:
            mean += np.float32(std) * rng.standard_normal(mean.shape, dtype=np.float32)
        combined[k] = global_arrays[k] + mean
    return combined, norms


def noised_unclipped_share(clipped: Sequence[bool], num_sampled: int, count_stddev: float,
                           rng: np.random.Generator) -> float:
    """b = 1/2 + (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / n, b_i = 1 for an update left unclipped: the centred
    sum has sensitivity 1/2 under add-or-remove, and a client that sent nothing counts 0 in it."""
    centred = sum(0.5 - bool(c) for c in clipped) + rng.normal(0.0, count_stddev)
    return 0.5 + centred / num_sampled


def geometric_update(clipping_norm: float, unclipped_share: float, quantile: float, lr: float) -> float:
    """The paper's C <- C exp(-eta_C (b - gamma)): too many updates unclipped (b > gamma) shrink C."""
    return clipping_norm * math.exp(-lr * (unclipped_share - quantile))


class PrivateAggregation:
    """The private mean of one round, the adaptive clipping norm and the run's privacy ledger."""

    def __init__(self, p: PrivacyConfig, population: int, sampled: int, rounds: int,
                 rng: np.random.Generator | None = None) -> None:
        self.plan = noise_plan(p, population, sampled, rounds)  # z accounted; z_delta on the update
        self.noise_multiplier = self.plan.noise_multiplier
        self.clipping_norm, self.clipping, self.adaptive = p.clipping_norm, p.clipping, p.adaptive_clipping
        self.quantile, self.clip_norm_lr = p.target_unclipped_quantile, p.clip_norm_lr
        self.max_epsilon, self.population, self.sampled = p.max_epsilon, population, sampled
        self.amplified = sampled < population  # only then does a secret sample hide who took part
        # Noise from the OS's entropy, never from the config's seed: noise anyone can regenerate protects nothing.
        self.rng = rng if rng is not None else np.random.default_rng()
        self.accountant = new_accountant(p.delta, population, sampled)
        self.last_round: dict[str, float] = {}

    @property
    def bits_from_clients(self) -> bool:
        """Adaptive clipping on the clients: only they see their unclipped norm, so they report the bit."""
        return self.adaptive and self.clipping == "client"

    def train_config(self) -> dict[str, float | bool]:
        """What a train message carries for Flower's clipping mods (privacy.clipping=client), else nothing."""
        if self.clipping != "client":
            return {}
        return {KEY_CLIPPING_NORM: self.clipping_norm, **({KEY_ADAPTIVE_CLIPPING: True} if self.adaptive else {})}

    def event(self) -> GaussianPrivacyEvent:
        return privacy_event(self.noise_multiplier, self.population, self.sampled)

    @property
    def epsilon(self) -> float:
        return self.accountant.get_privacy_spent().epsilon if self.accountant.num_releases else 0.0

    def next_round_exceeds_budget(self) -> bool:
        """True when ``privacy.max_epsilon`` is set and one more round would spend more than it."""
        return self.max_epsilon > 0 and self.accountant.would_exceed(self.event(), max_epsilon=self.max_epsilon)

    def aggregate(self, models: list[dict[str, np.ndarray]], global_arrays: dict[str, np.ndarray],
                  num_sampled: int, clipped: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
        """The noised mean update added to ``global_arrays``; composes the round into the ledger and, with
        adaptive clipping, moves C. ``clipped``: the clients' own norm bits (``bits_from_clients``), in
        ``models``' order; otherwise the server's norms decide."""
        if num_sampled != self.sampled:
            raise FederationError(f"privacy accounting assumes {self.sampled} of {self.population} clients sampled per "
                                  f"round (partition.num_clients, federation.fraction_fit, min_fit_clients), but the "
                                  f"server sampled {num_sampled}: the connected nodes differ from partition.num_clients")
        c, z_update = self.clipping_norm, self.plan.update_noise_multiplier
        combined, norms = private_mean(models, global_arrays, c, z_update, num_sampled, self.rng)
        self.accountant.compose(self.event())
        self.last_round = {
            "epsilon": self.epsilon, "delta": self.accountant.config.target_delta,
            "noise_multiplier": self.noise_multiplier, "clipping_norm": c,
            "noise_std": compute_stdv(z_update, c, num_sampled),
            "sample_rate": self.sampled / self.population, "clients_summed": len(models),
            # diagnostics of the updates as they arrived (server-side log, outside the guarantee like client metrics)
            "clipped_on_server": sum(n > c * (1 + CLIP_TOLERANCE) for n in norms),
            "update_norm_max": max(norms, default=0.0)}
        if self.adaptive:
            if clipped is None:
                clipped = [n > c for n in norms]
            share = noised_unclipped_share(clipped, num_sampled, self.plan.count_stddev, self.rng)
            self.clipping_norm = geometric_update(c, share, self.quantile, self.clip_norm_lr)
            self.last_round.update(update_noise_multiplier=z_update, clipped_count_stddev=self.plan.count_stddev,
                                   unclipped_share=share, next_clipping_norm=self.clipping_norm)
        return combined

    def state_dict(self) -> dict[str, Any]:
        """The ledger as plain types (torch.load(weights_only=True)-safe), and the adaptive C to go on from."""
        state = self.accountant.state_dict()
        return {**state, "clipping_norm": self.clipping_norm} if self.adaptive else state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        saved_norm = state.pop("clipping_norm", None)  # absent: a fixed-clipping run, or one from before
        try:
            self.accountant.load_state_dict(state)
        except ValueError as exc:  # e.g. another privacy.delta or partition.num_clients than the checkpoint's
            raise FederationError(f"--resume: the checkpoint's privacy ledger does not fit the config ({exc}): "
                                  "privacy.delta, partition.num_clients and the sampling must stay as they were") from None
        if self.adaptive and saved_norm is not None:
            self.clipping_norm = float(saved_norm)


def client_clipping_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's ``fixedclipping_mod`` (or ``adaptiveclipping_mod``, which adds the ``norm_bit`` metric) for a
    train message whose config carries a clipping norm (``privacy.clipping: client``); any other message
    passes untouched."""
    config = next(iter(msg.content.config_records.values()), None)
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    mod = adaptiveclipping_mod if config.get(KEY_ADAPTIVE_CLIPPING, False) else fixedclipping_mod
    return mod(msg, context, call_next)
