"""Client-level differential privacy of the shared weights (``privacy.*``), valid with every server
optimizer, FedAdam included.

Each round (the Gaussian mechanism of DP-FedAvg, McMahan et al., ICLR 2018):

1. every sampled client's update ``u_i = w_i - x_t`` (its weights minus the global weights it received) is
   clipped to flat L2 norm C over all shared arrays: on the client by Flower's ``fixedclipping_mod`` with
   ``privacy.clipping: client``, and on the server in any case (Flower's ``clip_inputs_inplace``), so no
   reply, honest or not, contributes more than C;
2. the clipped updates are summed with equal weights (a ``num-examples`` weight would let one client move
   the average by more than C/n), Gaussian noise of std z*C is added to the sum and the sum is divided by
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

Accounting: Flower's ``RdpAccountant`` (Google's dp-accounting behind it). Flower samples a fixed number
m of the N clients without replacement, so with m < N the round is a ``WITHOUT_REPLACEMENT`` event under
the replace-one relation, where swapping one client's update moves the clipped sum by up to 2C (the event's
noise multiplier is z/2); with m = N there is no sampling to amplify and the relation is add-or-remove-one
(sensitivity C, multiplier z). The guarantee covers the model (every global checkpoint and everything the
clients receive); the clients' reported metrics (losses, accuracies, num-examples, representation health)
and the choice of the best round from them are not protected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, SamplingMethod
from flwr.serverapp import PrivacyConfig as AccountingConfig
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, clip_inputs_inplace, compute_stdv, get_norm

from fedhubert.config import Config, PrivacyConfig
from fedhubert.errors import FederationError

CLIP_TOLERANCE = 1e-3  # relative: a client-side clip that arrives a float32 rounding above C is not "clipped on server"


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


class PrivateAggregation:
    """The private mean of one round and the run's privacy ledger (Flower's RdpAccountant)."""

    def __init__(self, p: PrivacyConfig, population: int, sampled: int,
                 rng: np.random.Generator | None = None) -> None:
        from flwr.serverapp import RdpAccountant  # needs dp-accounting (flwr[dp]): only when privacy is on

        self.clipping_norm, self.noise_multiplier, self.clipping = p.clipping_norm, p.noise_multiplier, p.clipping
        self.max_epsilon, self.population, self.sampled = p.max_epsilon, population, sampled
        self.amplified = sampled < population  # only then does a secret sample hide who took part
        # Noise from the OS's entropy, never from the config's seed: noise anyone can regenerate protects nothing.
        self.rng = rng if rng is not None else np.random.default_rng()
        relation, method = ((NeighboringRelation.REPLACE_ONE, SamplingMethod.WITHOUT_REPLACEMENT) if self.amplified
                            else (NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION))
        self.accountant = RdpAccountant(AccountingConfig(target_delta=p.delta, population_size=population,
                                                         neighboring_relation=relation, sampling_method=method))
        self.last_round: dict[str, float] = {}

    def event(self) -> GaussianPrivacyEvent:
        """One round: the noise std over the clipped sum's sensitivity (2C when one client is swapped, C when added)."""
        multiplier = self.noise_multiplier / 2 if self.amplified else self.noise_multiplier
        return GaussianPrivacyEvent(noise_multiplier=multiplier, sample_size=self.sampled,
                                    population_size=self.population)

    @property
    def epsilon(self) -> float:
        return self.accountant.get_privacy_spent().epsilon if self.accountant.num_releases else 0.0

    def next_round_exceeds_budget(self) -> bool:
        """True when ``privacy.max_epsilon`` is set and one more round would spend more than it."""
        return self.max_epsilon > 0 and self.accountant.would_exceed(self.event(), max_epsilon=self.max_epsilon)

    def aggregate(self, models: list[dict[str, np.ndarray]], global_arrays: dict[str, np.ndarray],
                  num_sampled: int) -> dict[str, np.ndarray]:
        """The noised mean update added to ``global_arrays``; composes the round into the ledger."""
        if num_sampled != self.sampled:
            raise FederationError(f"privacy accounting assumes {self.sampled} of {self.population} clients sampled per "
                                  f"round (partition.num_clients, federation.fraction_fit, min_fit_clients), but the "
                                  f"server sampled {num_sampled}: the connected nodes differ from partition.num_clients")
        combined, norms = private_mean(models, global_arrays, self.clipping_norm, self.noise_multiplier,
                                       num_sampled, self.rng)
        self.accountant.compose(self.event())
        self.last_round = {
            "epsilon": self.epsilon, "delta": self.accountant.config.target_delta,
            "noise_multiplier": self.noise_multiplier, "clipping_norm": self.clipping_norm,
            "noise_std": compute_stdv(self.noise_multiplier, self.clipping_norm, num_sampled),
            "sample_rate": self.sampled / self.population, "clients_summed": len(models),
            # diagnostics of the updates as they arrived (server-side log, outside the guarantee like client metrics)
            "clipped_on_server": sum(n > self.clipping_norm * (1 + CLIP_TOLERANCE) for n in norms),
            "update_norm_max": max(norms, default=0.0)}
        return combined

    def state_dict(self) -> dict[str, Any]:
        """The ledger as plain types (torch.load(weights_only=True)-safe)."""
        return self.accountant.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.accountant.load_state_dict(state)
        except ValueError as exc:  # e.g. another privacy.delta or partition.num_clients than the checkpoint's
            raise FederationError(f"--resume: the checkpoint's privacy ledger does not fit the config ({exc}): "
                                  "privacy.delta, partition.num_clients and the sampling must stay as they were") from None


def client_clipping_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's ``fixedclipping_mod`` for a train message whose config carries a clipping norm
    (``privacy.clipping: client``); any other message passes untouched."""
    config = next(iter(msg.content.config_records.values()), None)
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    return fixedclipping_mod(msg, context, call_next)
