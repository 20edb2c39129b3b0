"""The arithmetic behind ``privacy.*``: the accountant's setup and each round's event (Flower's
``RdpAccountant``, Google's dp-accounting behind it), the noise multiplier derived from
``privacy.target_epsilon``, and adaptive clipping's split of z between the update and the count of
unclipped updates (privacy.py applies them).

Events. Flower samples a fixed number m of the N clients without replacement, so with m < N a round is a
``WITHOUT_REPLACEMENT`` event under the replace-one relation, where swapping one client's update moves the
clipped sum by up to 2C (the event's noise multiplier is z/2); with m = N there is no sampling to amplify
and the relation is add-or-remove-one (sensitivity C, multiplier z).

Adaptive clipping (Andrew et al., NeurIPS 2021, Theorem 1). Each round also releases the count of clients
whose update was not clipped, as the centred sum sum_i (b_i - 1/2) + N(0, sigma_b^2) with b_i in {0, 1}. Its
sensitivity is 1/2 under add-or-remove (a dropped client adds 0, inside [-1/2, 1/2]) and 1 under replace-one.
Two Gaussian releases compose in RDP as one whose multiplier satisfies z^-2 = z_delta^-2 + (2 sigma_b)^-2 in
both relations (replace-one: (z/2)^-2 = (z_delta/2)^-2 + sigma_b^-2), so the update is noised with
z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2 (Flower's ``compute_adaptive_noise_params``) and the ledger keeps
composing the configured z: the pair of releases costs exactly what one release at z would.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, SamplingMethod
from flwr.serverapp import PrivacyConfig as AccountingConfig
from flwr.supercore.differential_privacy import compute_adaptive_noise_params

from fedhubert.config import PrivacyConfig
from fedhubert.errors import ConfigError

log = logging.getLogger(__name__)

Z_MAX = 1e4  # noise of 10^4 C / n drowns any update: a target_epsilon that needs more is refused
Z_RTOL = 1e-4  # the derived z is within this share of the smallest z that meets the target


def accounting_config(delta: float, population: int, sampled: int) -> AccountingConfig:
    """The ledger's relation and sampling: replace-one without replacement when m < N, else add-or-remove."""
    relation, method = ((NeighboringRelation.REPLACE_ONE, SamplingMethod.WITHOUT_REPLACEMENT) if sampled < population
                        else (NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION))
    return AccountingConfig(target_delta=delta, population_size=population, neighboring_relation=relation,
                            sampling_method=method)


def privacy_event(noise_multiplier: float, population: int, sampled: int) -> GaussianPrivacyEvent:
    """One round: the noise std over the clipped sum's sensitivity (2C when one client is swapped, C when added)."""
    multiplier = noise_multiplier / 2 if sampled < population else noise_multiplier
    return GaussianPrivacyEvent(noise_multiplier=multiplier, sample_size=sampled, population_size=population)


def new_accountant(delta: float, population: int, sampled: int):
    from flwr.serverapp import RdpAccountant  # needs dp-accounting (flwr[dp]): only when privacy is on

    return RdpAccountant(accounting_config(delta, population, sampled))


def spent_epsilon(noise_multiplier: float, delta: float, population: int, sampled: int, rounds: int) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds at ``noise_multiplier``, as the run's ledger computes it."""
    accountant = new_accountant(delta, population, sampled)
    accountant.compose(privacy_event(noise_multiplier, population, sampled), count=rounds)
    return accountant.get_privacy_spent().epsilon


@functools.lru_cache(maxsize=16)  # the pre-flight check and the server derive the same z: once per process
def noise_for_target_epsilon(target: float, delta: float, population: int, sampled: int, rounds: int) -> float:
    """The smallest z (to ``Z_RTOL``) for which ``rounds`` rounds spend at most ``target`` at ``delta``.

    Epsilon falls monotonically with z, roughly as z^-1 to z^-2, so the search works on log z against
    log epsilon: steps of log(epsilon / target) bracket the root, then regula falsi with the Illinois
    correction closes the bracket (about ten accountant evaluations; one costs ~2 s with sampling)."""
    def excess(log_z: float) -> float:  # log(epsilon / target): > 0 spends too much
        return math.log(spent_epsilon(math.exp(log_z), delta, population, sampled, rounds)) - math.log(target)

    tol, top = math.log1p(Z_RTOL), math.log(Z_MAX)
    lo: tuple[float, float] | None = None  # (log z, excess > 0)
    hi: tuple[float, float] | None = None  # (log z, excess <= 0)
    x, last_side = 0.0, 0
    for _ in range(100):
        fx = excess(x)
        side = 1 if fx > 0 else -1
        if side > 0:
            lo = (x, fx)
            if last_side > 0 and hi is not None:  # Illinois: the end that stays put twice counts half
                hi = (hi[0], hi[1] / 2)
        else:
            hi = (x, fx)
            if last_side < 0 and lo is not None:
                lo = (lo[0], lo[1] / 2)
        last_side = side
        if lo is not None and hi is not None:
            if hi[0] - lo[0] <= tol:
                z = math.exp(hi[0])
                log.info("privacy.target_epsilon %g over %d rounds (%d of %d clients, delta %g): noise_multiplier "
                         "z = %.6g", target, rounds, sampled, population, delta, z)
                return z
            x = lo[0] + lo[1] * (hi[0] - lo[0]) / (lo[1] - hi[1])
            x = min(max(x, lo[0] + tol / 2), hi[0] - tol / 2)
        elif hi is None:  # every z so far spends too much; a step of log(eps / target) overshoots the root
            if x >= top:
                raise ConfigError(f"privacy.target_epsilon {target:g} cannot be met at privacy.delta {delta:g} over "
                                  f"{rounds} rounds ({sampled} of {population} clients sampled): even z = {Z_MAX:g} "
                                  f"spends epsilon {math.exp(fx) * target:.4g}; raise privacy.target_epsilon")
            x = min(x + max(fx, math.log(2)), top)
        else:  # every z so far meets it: step down as far
            x = x + min(fx, -math.log(2))
    raise ConfigError(f"privacy.target_epsilon {target:g}: no noise_multiplier found within 100 accountant evaluations")


@dataclass(frozen=True)
class NoisePlan:
    """The run's noise: z is what the ledger composes; the update gets z_delta, the unclipped count sigma_b."""
    noise_multiplier: float
    update_noise_multiplier: float
    count_stddev: float = 0.0  # 0: fixed clipping, no count released


def noise_plan(p: PrivacyConfig, population: int, sampled: int, rounds: int) -> NoisePlan:
    """z from ``privacy.noise_multiplier`` or ``privacy.target_epsilon``; with adaptive clipping, its split."""
    z = p.noise_multiplier
    if p.target_epsilon > 0:
        z = noise_for_target_epsilon(p.target_epsilon, p.delta, population, sampled, rounds)
    if not p.adaptive_clipping:
        return NoisePlan(z, z)
    # The paper's sigma_b = m/20 assumes hundreds of clients: with a few, z >= 2 sigma_b would leave no
    # budget for the update. max(m/20, z) costs the update at most 15.5% more noise (z_delta <= 1.155 z).
    sigma_b = p.clipped_count_stddev or max(sampled / 20, z)
    if z >= 2 * sigma_b:  # only with a derived z: config_checks refuses a configured one
        raise ConfigError(f"config key 'privacy.clipped_count_stddev' ({sigma_b:g}) must exceed z / 2 ({z / 2:.4g}), z "
                          f"derived from privacy.target_epsilon {p.target_epsilon:g} (0 = max(clients sampled / 20, z))")
    sigma_b, z_delta = compute_adaptive_noise_params(z, sampled, sigma_b)
    return NoisePlan(z, z_delta, sigma_b)
